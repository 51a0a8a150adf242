"""Weight-only int8 matmul for CUDA in Triton: ``y = x @ (weight * scale[:, None]).T + bias``.

The portable path dequantizes the int8 weight to fp16 in memory (one kernel) before cuBLAS runs,
so it moves five bytes per weight. Here the int8 tiles are widened in registers and the row scale
is applied to the fp32 accumulator, so the weight is read once. 1-2 rows (decode) go to the GEMV
in ``triton_gemv`` (no tensor cores); 3 to ``MAX_ROWS`` rows (batched decode, the server's steps) to
the split-K ``tl.dot`` kernels of ``matmul_kernels``; larger inputs are compute-bound, where the
portable path's cuBLAS GEMM wins.

A program per tile of outputs over the whole of K kept too few bytes in flight: at 32 rows CPM-2's
weights streamed at 24-30% of HBM read on an H200, and tile sweeps moved that by under 10%
(h200_run8_int8_matmul_sweep.log). Splitting K over more programs, whose fp32 partial sums a second
kernel adds up before the epilogue, took 4096x4096 from 16.2 to 12.5 us, 10240x4096 from 32.8 to
22.7 and 4096x10240 from 36.3 to 22.3 (h200_run51_splitk.log; the splits alone 10.6/20.2/19.7 us,
37-50%). Loading the tiles through TMA descriptors instead gained 1-5% (h200_run52_splitk_tma.log),
not enough for a second code path.

The split-K matmul takes about the same time for 1 to 32 rows, so it replaced the GEMV from 3 rows
on: at 3-4 rows the GEMV took 1.4-1.7x as long on CPM-2's shapes; at 2 rows each was faster on some
shapes; at 1 row the GEMV is 1.5-2x faster (h200_run57_gemv_rows.log). Decoding 4 rows went from 809
to 1284 tokens/s for CPM-2, 1770 to 2301 for EVA and 1073 to 1881 for CPM-1; at 2 rows the GEMV gave
CPM-2 666 against 653 and EVA 1486 against 1377, CPM-1 919 against 1024 (the same run).
"""
import contextlib
import contextvars
import functools
import os
from typing import List, Optional, Sequence, Tuple

import torch

from . import dependent_launch, triton_gemv
from .compile_ahead import launch

MAX_ROWS = 64
GEMV_ROWS = 2  # up to this many rows take the GEMV (it can take 4), more the split-K matmul: see above
# Each launch of a Triton kernel costs tens of microseconds of Python on the host, more than the
# few eager kernels of the portable path; below this many weight elements the GPU time it saves
# does not pay for that. BMINF_TRITON_MIN_NUMEL overrides it (0: always; a huge number: never).
MIN_NUMEL = None  # read from the environment on first use
# Inside ``always_fused()`` (a CUDA graph's warm-up and capture) there is no per-launch host cost to
# pay for, so every eligible weight takes the fused kernel whatever its size.
_ALWAYS = contextvars.ContextVar("bminf_always_fused", default=False)


@contextlib.contextmanager
def always_fused():
    """Use the fused kernels for every eligible weight, small ones too (for CUDA-graph capture)."""
    token = _ALWAYS.set(True)
    try:
        yield
    finally:
        _ALWAYS.reset(token)


def min_numel() -> int:
    global MIN_NUMEL
    if MIN_NUMEL is None:
        value = os.environ.get("BMINF_TRITON_MIN_NUMEL", str(1 << 24))
        try:
            MIN_NUMEL = int(value)
        except ValueError:
            raise ValueError(f"BMINF_TRITON_MIN_NUMEL must be an integer, got {value!r}") from None
    return MIN_NUMEL


@functools.lru_cache(maxsize=None)
def available() -> bool:
    try:
        import triton  # noqa: F401
        return True
    except ImportError:
        return False


@functools.lru_cache(maxsize=None)
def _kernels():
    # imported on first use: importing triton costs time, and CPU-only installs may lack it
    from . import matmul_kernels
    return matmul_kernels.int8_matmul_split, matmul_kernels.int8_matmul_epilogue, matmul_kernels.triton.cdiv


@functools.lru_cache(maxsize=None)
def _dequantize_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def dequantize(w_ptr, s_ptr, y_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # y = w * s[:, None], each product in fp32 rounded once to y's dtype: what torch computes
        # for an int8 tensor times a 16-bit one (the int8 widened exactly, the product in opmath)
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        ok = (rn < N)[:, None] & (rk < K)[None, :]
        at = rn.to(tl.int64)[:, None] * K + rk[None, :]
        w = tl.load(w_ptr + at, mask=ok, other=0, eviction_policy="evict_first").to(tl.float32)
        s = tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
        tl.store(y_ptr + at, (w * s[:, None]).to(y_ptr.dtype.element_ty), mask=ok)

    return dequantize, triton.cdiv


def can_dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> bool:
    return (weight.is_cuda and weight.dtype == torch.int8 and weight.dim() == 2 and weight.is_contiguous()
            and dtype == torch.float16 and not scale.requires_grad and available())  # bf16: unchecked on a GPU


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight * scale.to(dtype)[:, None]`` bit for bit, in one kernel that reads each int8 byte once:
    torch's mixed-dtype multiply ran at ~240 GB/s of int8 on an H200 (70 us for 4096x4096), most of
    a 256-token CPM-2 encode."""
    kernel, cdiv = _dequantize_kernel()
    n, k = weight.shape
    y = torch.empty(n, k, dtype=dtype, device=weight.device)
    launch(kernel, (cdiv(n, 16), cdiv(k, 512)), weight, scale.to(dtype).contiguous(), y, n, k, BLOCK_N=16,
           BLOCK_K=512, num_warps=4)
    return y


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    rows = x.numel() // max(x.shape[-1], 1)
    # fp16 only: bf16 has not been checked on a GPU yet
    big_enough = _ALWAYS.get() or weight.numel() >= min_numel()
    # the kernels index the weight in 32 bits: larger weights take the portable path
    return (x.is_cuda and x.dtype == torch.float16 and 0 < rows <= MAX_ROWS and big_enough
            and weight.is_cuda and weight.is_contiguous() and weight.numel() < 2**31 and available())


def matmul_config(m: int, n: int, k: int, programs_per_row_tile: int, device: torch.device,
                  block_k: Optional[int] = None) -> Tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT)`` for an (m, k) x (n, k)^T problem whose weights give
    ``programs_per_row_tile`` tiles of BLOCK_N outputs per tile of BLOCK_M rows.

    K is split until there are about five programs per multiprocessor: a program has a few tiles in
    flight, and more programs are more bytes in flight, as a weight streamed once needs. On CPM-2's
    shapes at 8-32 rows (H200, h200_run51_splitk.log) these tiles and splits were within 4% of the
    best in a sweep, and with the sums' kernel 22-39% faster than one program per output tile over
    the whole of K.
    """
    block_m, block_n, bk = (16, 32, 256) if m <= 16 else (32, 64, 128) if m <= 32 else (64, 64, 128)
    block_k = block_k or bk
    programs = programs_per_row_tile * -(-n // block_n) * -(-m // block_m)
    split = 1
    # each split at least four K tiles: its partial sums (4 * m bytes per output) stay a small part
    # of what it reads (k_split bytes of weight per output)
    while split < 16 and programs * split * 2 <= 5 * triton_gemv.multiprocessors(device) and \
            k >= 2 * split * 4 * block_k:
        split *= 2
    return block_m, block_n, block_k, split


def _matmul(x2: torch.Tensor, weights: Sequence[torch.Tensor], scales: Sequence[torch.Tensor],
            biases: Sequence[Optional[torch.Tensor]], epilogue: int = triton_gemv.PLAIN,
            residual: Optional[torch.Tensor] = None, block_k: Optional[int] = None) -> List[torch.Tensor]:
    """``int8_linear`` of (m, k) rows by 1-3 weights of one shape, with ``triton_gemv``'s epilogues: one
    launch sums stretches of K for every weight into fp32 partials, a second adds them up, scales,
    adds the bias and applies the epilogue."""
    split_kernel, epilogue_kernel, cdiv = _kernels()
    n, k = weights[0].shape
    m = x2.shape[0]
    gated = epilogue == triton_gemv.GATED
    block_m, block_n, block_k, split = matmul_config(m, n, k, len(weights), x2.device, block_k)
    k_split = cdiv(cdiv(k, split), block_k) * block_k  # each split a whole number of K tiles
    split = cdiv(k, k_split)
    partials = torch.empty(len(weights), split, m, n, dtype=torch.float32, device=x2.device)
    pdl = dependent_launch.options(x2.device)
    pad = triton_gemv.padded
    launch(split_kernel, (cdiv(n, block_n) * len(weights), split, cdiv(m, block_m)), x2, *pad(weights), partials,
           m, n, k, k_split, GROUP=len(weights), SPLIT=split, EVEN=n % block_n == 0 and k == split * k_split,
           BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, num_stages=3, **pdl)
    outs = [torch.empty(m, n, dtype=x2.dtype, device=x2.device) for _ in weights[:1 if gated else None]]
    has_bias = biases[0] is not None
    s = [t.contiguous() for t in scales]
    b = [t.to(x2.dtype).contiguous() for t in biases] if has_bias else s  # placeholders when absent
    r = x2 if residual is None else residual.reshape(m, n).contiguous()
    launch(epilogue_kernel, (cdiv(n, 64) * len(outs), cdiv(m, 16)), partials, *pad(s), *pad(b), *pad(outs), r,
           m, n, GROUP=len(weights), SPLIT=split, HAS_BIAS=has_bias, EPILOGUE=epilogue, BLOCK_M=16, BLOCK_N=64,
           num_warps=4, **pdl)
    return outs


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                bias: Optional[torch.Tensor] = None, block_k: Optional[int] = None) -> torch.Tensor:
    """``x @ (weight * scale[:, None]).T + bias`` for up to ``MAX_ROWS`` rows (any leading shape): the
    GEMV for 1-2 rows, the split-K matmul for more (or whenever ``block_k`` picks its K tile)."""
    return int8_linear_many(x, [weight], [scale], [bias], block_k=block_k)[0]


def int8_linear_many(x: torch.Tensor, weights: Sequence[torch.Tensor], scales: Sequence[torch.Tensor],
                     biases: Optional[Sequence[Optional[torch.Tensor]]] = None, epilogue: int = triton_gemv.PLAIN,
                     residual: Optional[torch.Tensor] = None, block_k: Optional[int] = None) -> List[torch.Tensor]:
    """``triton_gemv``'s grouped linears and epilogues (``int8_gemv_many``, ``_gated``, ``_gelu``, ``_add``)
    for any row count up to ``MAX_ROWS``: 1-2 rows (``GEMV_ROWS``) take the GEMV, more the split-K matmul.

    >>> # on a GPU: q, k, v = int8_linear_many(x_fp16[40, 4096], [wq, wk, wv], [sq, sk, sv])
    """
    n, k = weights[0].shape
    biases = list(biases) if biases is not None else [None] * len(weights)
    if block_k is None and x.numel() // k <= GEMV_ROWS:
        return triton_gemv._launch(x, list(weights), list(scales), biases, None, epilogue, residual)
    triton_gemv.check_group(weights, scales, biases)
    x2 = x.reshape(-1, k).contiguous()
    if not 0 < x2.shape[0] <= MAX_ROWS:
        raise ValueError(f"int8_linear takes 1 to {MAX_ROWS} rows, got {x2.shape[0]}")
    outs = _matmul(x2, weights, scales, biases, epilogue, residual, block_k)
    return [y.reshape(*x.shape[:-1], n) for y in outs]


def int8_linear_gelu(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                     bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``triton_gemv.int8_gemv_gelu`` for up to ``MAX_ROWS`` rows."""
    return int8_linear_many(x, [weight], [scale], [bias], triton_gemv.GELU)[0]


def int8_linear_gated(x: torch.Tensor, weight_in: torch.Tensor, scale_in: torch.Tensor, weight_gated: torch.Tensor,
                      scale_gated: torch.Tensor) -> torch.Tensor:
    """``triton_gemv.int8_gemv_gated`` for up to ``MAX_ROWS`` rows."""
    return int8_linear_many(x, [weight_in, weight_gated], [scale_in, scale_gated], [None, None], triton_gemv.GATED)[0]


def int8_linear_add(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                    residual: torch.Tensor) -> torch.Tensor:
    """``triton_gemv.int8_gemv_add`` for up to ``MAX_ROWS`` rows."""
    triton_gemv.check_residual(x, weight, residual)
    return int8_linear_many(x, [weight], [scale], [bias], triton_gemv.ADD, residual.to(x.dtype))[0]
