"""Attention for one query row (a decode step) as one Triton kernel for CUDA fp16.

A decode step of CPM-2 attends 48 times with a single query per row, and each call to
``F.scaled_dot_product_attention`` took ~6 us on an H200 (cuDNN's prefill kernel, its query tile
mostly padding), against ~1 us of bytes to read at batch 1. Writing the step's new key and value
into the cache was two more kernels per layer (``index_copy_``). Here one program per (row, head)
streams that head's keys and values once, with an online softmax in fp32, and, for the cache of a
graphed step, also stores the new key and value at their position.

Where the (row, head)s leave multiprocessors idle (batch 1) and there are more than 256 keys, the
keys are split across programs (flash-decoding) and a second small kernel combines the partial
softmaxes. A graphed step does not read a row's keys after the row's position (one for every row,
or one per row): they are masked, and a masked key adds exactly 0. Where it stores the step's key and value, large batches read
them back from the cache after a barrier, batch 1 takes them from registers. Launched with
programmatic dependent launch (``dependent_launch``), batch 1 loads its first tile of keys, values
and bias while the kernel before it (the query's projection) is finishing.

Measured on an H200 (``benchmark/attention.py``, keys and values rotating through more memory than
L2; benchmark/results/h200_run14.log): at batch 1 and 256 keys 4.9/5.8/4.5 us for CPM-2/CPM-1/EVA
against SDPA's 7.5/8.2/7.4 (bound by one program's load latency: 64 programs for 132
multiprocessors), at 512 keys split 7.9/7.2/6.8 us against 7.7/9.8/7.5; at batch 32 and 256 keys
CPM-2 35 us against 44.6 (88% of HBM read bandwidth).

Numerics: scores, softmax and the weighted sum in fp32 from fp16 inputs, the output rounded once to
fp16; SDPA's kernels round the probabilities to fp16 before the second product, so results agree to
fp16 rounding, not bit for bit (checked against PyTorch's formula in the tests).
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import dependent_launch, triton_gemv
from .compile_ahead import launch
from .triton_int8 import available
from .triton_norm import _reference_grads

MAX_D_HEAD = 256
UNSPLIT_KEYS = 256  # keys one program per (row, head) takes in one pass of its loop
SPLIT_KEYS = 64  # keys per program once they are split
MAX_SPLITS = 32


def _kernels():
    from . import attention_kernels  # imported on first use: it imports triton
    return attention_kernels


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernel runs this: one query row per head, fp16 on CUDA, rows of d_head contiguous.
    Chosen by device, dtype and shape alone, never by grad mode (see ``kernels.int8_linear``)."""
    return (q.is_cuda and q.dtype == torch.float16 and q.dim() == 4 and q.shape[2] == 1 and q.shape[-1] <= MAX_D_HEAD
            and k.dtype == v.dtype == q.dtype and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1 and available())


def reference(q, k, v, bias, scale):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=scale)


class _AttendOne(torch.autograd.Function):
    """The kernel's forward; backward through PyTorch's attention, recomputed."""

    @staticmethod
    def forward(ctx, q, k, v, bias, scale):
        ctx.save_for_backward(q, k, v, bias)
        ctx.scale = scale
        return _launch(q, k, v, bias, scale, k.shape[2])

    @staticmethod
    def backward(ctx, grad):
        grads = _reference_grads(ctx.needs_input_grad[:4], ctx.saved_tensors,
                                 lambda q, k, v, b: (reference(q, k, v, b, ctx.scale),), (grad,))
        return (*grads, None)


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float,
               splits: Optional[int] = None) -> torch.Tensor:
    """``softmax(q k^T * scale + bias) v`` for q (B, H, 1, D), k/v (B, H, T, D) and bias broadcastable
    to (B, H, 1, T), as ``F.scaled_dot_product_attention`` computes it. Returns (B, H, 1, D).
    ``splits`` (programs per row and head) overrides ``splits_for``, for tests and tuning."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, bias)):
        return _AttendOne.apply(q, k, v, bias, scale)
    return _launch(q, k, v, bias, scale, k.shape[2], splits=splits)


def attend_and_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float,
                     length: int, new_k: torch.Tensor, new_v: torch.Tensor, pos: torch.Tensor,
                     splits: Optional[int] = None, read_back: Optional[bool] = None) -> torch.Tensor:
    """A graphed decode step's self-attention: write ``new_k``/``new_v`` (B, H, 1, D) into the cache
    k/v (B, H, T, D) at the position held in the device tensor ``pos`` (one element: every row's; B
    elements: each row's own), then attend over the first ``length`` positions (bias broadcastable to
    (B, H, 1, length)); a row's positions after its ``pos`` are taken as masked and not read. No autograd."""
    if pos.dim() != 1 or pos.numel() not in (1, q.shape[0]):
        raise ValueError(f"pos must hold one position or one per row ({q.shape[0]}), got shape {tuple(pos.shape)}")
    return _launch(q, k, v, bias, scale, length, new_k, new_v, pos, splits=splits, read_back=read_back)


def splits_for(rows: int, length: int, device: torch.device) -> int:
    """How many programs share one (row, head)'s keys: one per ``SPLIT_KEYS`` keys where one program
    per (row, head) would loop over more than ``UNSPLIT_KEYS`` and the (row, head)s leave
    multiprocessors idle; else 1."""
    if length <= UNSPLIT_KEYS or rows >= triton_gemv.multiprocessors(device):
        return 1
    return min(MAX_SPLITS, -(-length // SPLIT_KEYS))


def _launch(q, k, v, bias, scale, length, new_k=None, new_v=None, pos=None, block_l=None, warps=None, splits=None,
            bound=True, read_back=None):
    kernels = _kernels()
    kernel, combine, next_pow2 = kernels.decode_attention, kernels.combine, kernels.triton.next_power_of_2
    batch, heads, _, d = q.shape
    bias = bias.expand(batch, heads, 1, length)
    if bias.stride(-1) != 1:
        bias = bias.contiguous()
    out = torch.empty(batch, 1, heads, d, dtype=q.dtype, device=q.device)
    write = new_k is not None
    if write:
        new_k, new_v = new_k.contiguous(), new_v.contiguous()
    else:
        new_k = new_v = q  # placeholders
        pos = q
    pos_stride = pos.stride(0) if write and pos.numel() > 1 else 0
    rows = batch * heads
    # At batch 1 each pass of a program's loop costs its load latency: one program per (row, head)
    # over 512 keys took 8.2/9.8/7.4 us for CPM-2/CPM-1/EVA's heads, split 64 keys to a program
    # (flash-decoding; a second small kernel combines the partial softmaxes) 7.9/7.2/6.8 us, but
    # 10.0/8.8/9.3 us at 128 keys to a program (h200_run14.log). Up to 256 keys one program per
    # (row, head) was as fast or faster (CPM-2: 4.9 us against 6.7 split). Large batches keep one
    # program per (row, head), 256 keys per pass (CPM-2 at batch 32: 88% of HBM read).
    splits = splits or splits_for(rows, length, q.device)
    block_l = block_l or (SPLIT_KEYS if splits > 1 else min(UNSPLIT_KEYS, max(16, next_pow2(length))))
    fills_gpu = rows >= triton_gemv.multiprocessors(q.device)  # a large batch
    # 8 warps for d_head > 64 at batch 1 (CPM-1's 256 keys: 5.5 us against 6.7), 4 for large batches
    # (CPM-1 at batch 32, 512 keys: 66 us against 85; h200_run15.log)
    warps = warps or (8 if d > 64 and block_l > 64 and not fills_gpu else 4)
    # Storing the step's key and value: in large batches the program that holds that position stores
    # it and reads it back after a barrier (CPM-2 at batch 32, 512 keys: 71.8 us against 90.6 with a
    # tl.where over every tile; CPM-1 85 against 113); at batch 1 the programs take it from registers,
    # which spares the barrier's wait (6.8 us against 7.4; h200_run19.log)
    if read_back is None:
        read_back = write and fills_gpu
    chunk = -(-length // splits)
    chunk = -(-chunk // block_l) * block_l
    splits = -(-length // chunk)
    part = torch.empty(rows, splits, d + 2, dtype=torch.float32, device=q.device) if splits > 1 else q
    block_d = max(16, next_pow2(d))
    pdl = dependent_launch.options(q.device)
    launch(kernel, (rows, splits), q, k, v, bias, out, new_k, new_v, pos, part, heads, length, chunk, scale,
           q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
           bias.stride(0), bias.stride(1), new_k.stride(0), new_k.stride(1), pos_stride, D=d, WRITE=write,
           READ_BACK=read_back, BOUND=bound, SPLIT=splits > 1, BLOCK_L=block_l, BLOCK_D=block_d, num_warps=warps,
           **pdl)
    if splits > 1:
        launch(combine, (rows,), part, out, splits, D=d, BLOCK_S=max(2, next_pow2(splits)), BLOCK_D=block_d,
               num_warps=1, **pdl)
    return out.transpose(1, 2)  # (B, H, 1, D), a view of (B, 1, H, D): merging the heads is free


STEP_BIAS_KEYS = 64  # keys per program of step_biases


def step_biases(key_mask: torch.Tensor, pos: torch.Tensor, length: int, dtype: torch.dtype,
                position: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                encoder_mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A graphed decode step's attention biases in one kernel, marking the step's key in ``key_mask``
    (B, >= length) bool; ``pos`` holds one position for every row or one per row. Returns the self-attention
    bias, T5's (B, H, 1, length) position bias plus mask from ``position`` = (the decoder's bias weight
    (H, buckets), the bucket of each distance (>= length,) int32), else the mask alone (B, 1, 1, length),
    and, given ``encoder_mask`` (B, S) bool, the cross-attention mask (B, 1, 1, S), else None. A masked
    entry holds ``finfo(dtype).min / 2``, as ``layers.additive_mask`` writes it: the same numbers as those
    torch ops, which took some twenty small kernels."""
    kernel = _kernels().step_biases
    batch, dev = key_mask.shape[0], key_mask.device
    if key_mask.dtype != torch.bool or key_mask.stride(-1) != 1 or key_mask.shape[1] < length:
        raise ValueError(f"key_mask must be (batch, >= {length}) bool with contiguous rows")
    if pos.dim() != 1 or pos.numel() not in (1, batch):
        raise ValueError(f"pos must hold one position or one per row ({batch}), got shape {tuple(pos.shape)}")
    heads = 1 if position is None else position[0].shape[0]
    self_bias = torch.empty(batch, heads, 1, length, dtype=dtype, device=dev)
    weight, buckets = position if position is not None else (self_bias, pos)  # placeholders when absent
    mask = key_mask.view(torch.uint8)
    enc = mask if encoder_mask is None else encoder_mask.view(torch.uint8)
    source = 0 if encoder_mask is None else encoder_mask.shape[1]
    cross = None if encoder_mask is None else torch.empty(batch, 1, 1, source, dtype=dtype, device=dev)
    blocks = -(-max(length, source) // STEP_BIAS_KEYS)
    launch(kernel, (batch, blocks), mask, pos, buckets, weight.contiguous(), enc, self_bias,
           self_bias if cross is None else cross, length, source, heads, weight.shape[-1], mask.stride(0),
           pos.stride(0) if pos.numel() > 1 else 0, enc.stride(0), torch.finfo(dtype).min / 2,
           POSITION=position is not None, CROSS=encoder_mask is not None,
           BLOCK_H=max(2, _kernels().triton.next_power_of_2(heads)), BLOCK_L=STEP_BIAS_KEYS)
    return self_bias, cross
