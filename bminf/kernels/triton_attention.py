"""Attention for one query row (a decode step) as one Triton kernel for CUDA fp16.

A decode step of CPM-2 attends 48 times with a single query per row, and each call to
``F.scaled_dot_product_attention`` took ~6 us on an H200 (cuDNN's prefill kernel, its query tile
mostly padding), against ~1 us of bytes to read at batch 1. Writing the step's new key and value
into the cache was two more kernels per layer (``index_copy_``). Here one program per (row, head)
streams that head's keys and values once, with an online softmax in fp32, and, for the cache of a
graphed step, also stores the new key and value at their position.

Where the (row, head)s leave multiprocessors idle (batch 1) and there are more than 256 keys, the
keys are split across programs (flash-decoding) and a second small kernel combines the partial
softmaxes. A graphed step does not read the keys after its own position: they are masked for every
row, and a masked key adds exactly 0. Where it stores the step's key and value, large batches read
them back from the cache after a barrier, batch 1 takes them from registers.

Measured on an H200 (``benchmark/attention.py``, keys and values rotating through more memory than
L2; benchmark/results/h200_run14.log): at batch 1 and 256 keys 4.9/5.8/4.5 us for CPM-2/CPM-1/EVA
against SDPA's 7.5/8.2/7.4 (bound by one program's load latency: 64 programs for 132
multiprocessors), at 512 keys split 7.9/7.2/6.8 us against 7.7/9.8/7.5; at batch 32 and 256 keys
CPM-2 35 us against 44.6 (88% of HBM read bandwidth).

Numerics: scores, softmax and the weighted sum in fp32 from fp16 inputs, the output rounded once to
fp16; SDPA's kernels round the probabilities to fp16 before the second product, so results agree to
fp16 rounding, not bit for bit (checked against PyTorch's formula in the tests).
"""
import functools
from typing import Optional

import torch
import torch.nn.functional as F

from . import triton_gemv
from .triton_int8 import available
from .triton_norm import _reference_grads

MAX_D_HEAD = 256
UNSPLIT_KEYS = 256  # keys one program per (row, head) takes in one pass of its loop
SPLIT_KEYS = 64  # keys per program once they are split
MAX_SPLITS = 32


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def decode_attention(q_ptr, k_ptr, v_ptr, bias_ptr, o_ptr, kn_ptr, vn_ptr, pos_ptr, part_ptr, H, L, CHUNK, scale,
                         sq_b, sq_h, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sb_b, sb_h, sn_b, sn_h, D: tl.constexpr,
                         WRITE: tl.constexpr, READ_BACK: tl.constexpr, BOUND: tl.constexpr, SPLIT: tl.constexpr,
                         BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
        # q (B, H, D), k/v (B, H, >= L, D) with strides, bias (B, H, L) with strides (0 where it
        # broadcasts), o (B, H, D) contiguous; WRITE: the new kn/vn (B, H, D) go to position *pos_ptr.
        # Program (row * H + head, split) takes keys [split * CHUNK, split * CHUNK + CHUNK); with SPLIT
        # it leaves (max, sum, unnormalized output) in part (B * H, splits, D + 2) for combine().
        # D is a constant so that a row of d_head below BLOCK_D (CPM-1's 80) still loads in vectors
        pid, split = tl.program_id(0), tl.program_id(1)
        b, h = (pid // H).to(tl.int64), pid % H  # b * (a row's stride) passes 2^31 in large batches
        rd = tl.arange(0, BLOCK_D)
        d_ok = rd < D
        q = tl.load(q_ptr + b * sq_b + h * sq_h + rd, mask=d_ok, other=0.0).to(tl.float32) * scale
        k_row = k_ptr + b * sk_b + h * sk_h
        v_row = v_ptr + b * sv_b + h * sv_h
        start = split * CHUNK
        end = tl.minimum(start + CHUNK, L)
        if WRITE:
            pos = tl.load(pos_ptr).to(tl.int32)  # key indices in 32 bits, as without WRITE
            kn = tl.load(kn_ptr + b * sn_b + h * sn_h + rd, mask=d_ok, other=0.0)
            vn = tl.load(vn_ptr + b * sn_b + h * sn_h + rd, mask=d_ok, other=0.0)
            if READ_BACK:  # the program whose keys hold pos stores there, then reads it back with the rest
                at = tl.zeros((BLOCK_D,), tl.int32) + pos  # a vector: the interpreter takes no scalar mask
                mine = (at >= start) & (at < start + CHUNK)
                tl.store(k_row + pos * sk_l + rd, kn, mask=d_ok & mine)
                tl.store(v_row + pos * sv_l + rd, vn, mask=d_ok & mine)
                tl.debug_barrier()  # the program's stores are visible to all its threads after this
            else:
                if split == 0:
                    tl.store(k_row + pos * sk_l + rd, kn, mask=d_ok)
                    tl.store(v_row + pos * sv_l + rd, vn, mask=d_ok)
            if BOUND:  # keys after this step's are masked for every row (the cache fills left to right),
                # and a masked key adds exactly 0: not reading them changes no bit of the result
                end = tl.minimum(end, pos + 1)
        m = tl.max(tl.full((BLOCK_L,), float("-inf"), tl.float32), axis=0)
        total = tl.sum(tl.zeros((BLOCK_L,), tl.float32), axis=0)
        acc = tl.zeros((BLOCK_D,), tl.float32)
        for l0 in range(start, end, BLOCK_L):
            rl = l0 + tl.arange(0, BLOCK_L)
            l_ok = rl < end
            tile = l_ok[:, None] & d_ok[None, :]
            k = tl.load(k_row + rl[:, None] * sk_l + rd[None, :], mask=tile, other=0.0)
            v = tl.load(v_row + rl[:, None] * sv_l + rd[None, :], mask=tile, other=0.0)
            if WRITE and not READ_BACK:  # this step's key and value from registers (the stores above
                # are another program's, not visible yet)
                here = (rl == pos)[:, None]
                k = tl.where(here, kn[None, :], k)
                v = tl.where(here, vn[None, :], v)
            s = tl.sum(k.to(tl.float32) * q[None, :], axis=1)
            s += tl.load(bias_ptr + b * sb_b + h * sb_h + rl, mask=l_ok, other=0.0).to(tl.float32)
            s = tl.where(l_ok, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=0))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new)
            total = total * alpha + tl.sum(p, axis=0)
            acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
            m = m_new
        if SPLIT:  # a split with no keys (all after pos) leaves max -inf, sum 0: combine() weighs it 0
            part = part_ptr + (pid * tl.num_programs(1) + split) * (D + 2)
            tl.store(part + rd, acc, mask=d_ok)
            tl.store(part + D, m)
            tl.store(part + D + 1, total)
        else:
            tl.store(o_ptr + pid * D + rd, (acc / total).to(o_ptr.dtype.element_ty), mask=d_ok)

    @triton.jit
    def combine(part_ptr, o_ptr, SPLITS, D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
        # the splits of one (row, head): rescale each partial output to the largest max, then normalize
        pid = tl.program_id(0)
        rs = tl.arange(0, BLOCK_S)
        rd = tl.arange(0, BLOCK_D)
        s_ok = rs < SPLITS
        part = part_ptr + (pid * SPLITS + rs) * (D + 2)
        m = tl.load(part + D, mask=s_ok, other=float("-inf"))
        w = tl.exp(m - tl.max(m, axis=0))  # split 0 holds key 0, never after pos: the max is finite
        total = tl.sum(w * tl.load(part + D + 1, mask=s_ok, other=0.0), axis=0)
        acc = tl.load(part[:, None] + rd[None, :], mask=s_ok[:, None] & (rd < D)[None, :], other=0.0)
        out = tl.sum(w[:, None] * acc, axis=0) / total
        tl.store(o_ptr + pid * D + rd, out.to(o_ptr.dtype.element_ty), mask=rd < D)

    return decode_attention, combine, triton.next_power_of_2


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
    k/v (B, H, T, D) at the position held in the one-element device tensor ``pos``, then attend over
    the first ``length`` positions (bias broadcastable to (B, H, 1, length)); positions after ``pos``
    are taken as masked and not read. No autograd."""
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
    kernel, combine, next_pow2 = _kernel()
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
    kernel[(rows, splits)](q, k, v, bias, out, new_k, new_v, pos, part, heads, length, chunk, scale,
                           q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
                           v.stride(0), v.stride(1), v.stride(2), bias.stride(0), bias.stride(1),
                           new_k.stride(0), new_k.stride(1), D=d, WRITE=write, READ_BACK=read_back, BOUND=bound,
                           SPLIT=splits > 1, BLOCK_L=block_l, BLOCK_D=block_d, num_warps=warps)
    if splits > 1:
        combine[(rows,)](part, out, splits, D=d, BLOCK_S=max(2, next_pow2(splits)), BLOCK_D=block_d, num_warps=1)
    return out.transpose(1, 2)  # (B, H, 1, D), a view of (B, 1, H, D): merging the heads is free
