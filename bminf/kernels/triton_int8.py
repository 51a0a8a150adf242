"""Weight-only int8 matmul for CUDA in Triton: ``y = x @ (weight * scale[:, None]).T + bias``.

The portable path dequantizes the int8 weight to fp16 in memory (one kernel) before cuBLAS runs,
so it moves five bytes per weight. Here the int8 tiles are widened in registers and the row scale
is applied to the fp32 accumulator, so the weight is read once. One row (decode) goes to the GEMV
in ``triton_gemv`` (no tensor cores); 2 to ``MAX_ROWS`` rows (batched decode, the server's steps) to
the split-K ``tl.dot`` kernel of ``matmul_kernels``; larger inputs are compute-bound, where the
portable path's cuBLAS GEMM wins.

A program per tile of outputs over the whole of K kept too few bytes in flight: at 32 rows CPM-2's
weights streamed at 24-30% of HBM read on an H200, and tile sweeps moved that by under 10%
(h200_run8_int8_matmul_sweep.log). Splitting K over more programs, whose fp32 partial sums a second
kernel added up before the epilogue, took 4096x4096 from 16.2 to 12.5 us, 10240x4096 from 32.8 to
22.7 and 4096x10240 from 36.3 to 22.3 (h200_run51_splitk.log). Loading the tiles through TMA
descriptors instead gained 1-5% (h200_run52_splitk_tma.log), not enough for a second code path.

Two changes then made it one launch reading 45-75% of HBM bandwidth on CPM-2's shapes at 2-16 rows
(35-55% at 32; h200_run62.log):
- The int8 tile is widened to fp16 by byte permutes (``gemv_kernels.widen16``), not one conversion
  instruction per value, which runs at a quarter of the FMA rate and held the kernel near the rate
  at which it converts: CPM-2's q/k/v at 16 rows 16.8 us against 21.2, the gated feed-forward input
  25.7 against 33.5, its output 15.3 against 19.6.
- The last program of each output tile to finish adds the splits' sums and applies the epilogue
  (counted with an atomic per tile, ``tickets``), where a second kernel did: 21.2 against 23.3 us
  for q/k/v, 33.5 against 34.6 for the feed-forward input.

The GEMV is still faster for one row (CPM-2's attention output, q/k/v, feed-forward input and output
6.6 / 14.9 / 25.8 / 13.2 us against 8.5 / 16.7 / 26.0 / 15.2); from 2 rows the split-K matmul is
(8.6 / 16.7 / 26.1 / 15.4 against 10.6 / 25.2 / 33.4 / 21.8; the same run). Decoding 2 rows went
from 665 to 791 tokens/s for CPM-2 and from 916 to 1191 for CPM-1, while EVA stayed level (1481 and
1449; h200_run62.log against h200_run63.log).
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
GEMV_ROWS = 1  # up to this many rows take the GEMV (it can take 4), more the split-K matmul: see above
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
    return matmul_kernels.int8_matmul, matmul_kernels.triton.cdiv


_TICKETS = {}  # (device, stream) -> int32 counts, zero between launches
_RETIRED = []  # outgrown counts: a CUDA graph may still hold their address


def tickets(device: torch.device, count: int) -> torch.Tensor:
    """Zeroed int32 counters for ``int8_matmul``'s tiles: one set per stream, so that launches running
    side by side on two streams never share a count (on one stream they follow each other, and each
    leaves its counts at zero). Made inside a CUDA graph's capture, the graph zeroes them too: one
    memset more in that graph, the same numbers. A set is never freed (a graph may hold its address),
    so it starts at 16 KB, for 4096 tiles (CPM-2's widest launch has 640): a program that makes a
    stream per call keeps 16 KB per stream."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    have = _TICKETS.get(key)
    if have is None or have.numel() < count:
        if have is not None:
            _RETIRED.append(have)
        have = _TICKETS[key] = torch.zeros(max(count, 4096), dtype=torch.int32, device=device)
    return have


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
    best in a sweep, and 22-39% faster than one program per output tile over the whole of K; at 32
    rows they were still the best with the sums in the kernel and fp16 widened by permutes
    (h200_run63.log), and at 8-32 rows within 2% of the best of a sweep that tried 16-row tiles
    too, but for T5's gated input at 32 rows (33.4 us with 256-wide K tiles against 36.6;
    h200_run66_matmul_sweep.log). Over 32 rows two tiles of 32 rows beat one of 64: 32.0 against
    41.3 us for CPM-2's q/k/v at 64 rows, 31.9 against 33.4 for its feed-forward output (run 63).
    """
    block_m, block_n, bk = (16, 32, 256) if m <= 16 else (32, 64, 128) if m <= 32 else (32, 128, 128)
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
    """``int8_linear`` of (m, k) rows by 1-3 weights of one shape, with ``triton_gemv``'s epilogues, in
    one launch: programs sum stretches of K for every weight into fp32 partials, and the last of each
    tile adds them up, scales, adds the bias and applies the epilogue."""
    kernel, cdiv = _kernels()
    n, k = weights[0].shape
    m = x2.shape[0]
    gated = epilogue == triton_gemv.GATED
    block_m, block_n, block_k, split = matmul_config(m, n, k, len(weights), x2.device, block_k)
    k_split = cdiv(cdiv(k, split), block_k) * block_k  # each split a whole number of K tiles
    split = cdiv(k, k_split)
    grid = (cdiv(n, block_n) * len(weights), split, cdiv(m, block_m))
    # the partial sums and each tile's count, only where a tile is summed by more than one program
    # (else placeholder pointers the kernel never reads: no allocation in every eager step)
    summed = split > 1 or gated
    partials = torch.empty(len(weights), split, m, n, dtype=torch.float32, device=x2.device) if summed else x2
    counts = tickets(x2.device, grid[0] * grid[2]) if summed else x2
    outs = [torch.empty(m, n, dtype=x2.dtype, device=x2.device) for _ in weights[:1 if gated else None]]
    has_bias = biases[0] is not None
    s = [t.contiguous() for t in scales]
    b = [t.to(x2.dtype).contiguous() for t in biases] if has_bias else s  # placeholders when absent
    r = x2 if residual is None else residual.reshape(m, n).contiguous()
    pad = triton_gemv.padded
    launch(kernel, grid, x2, *pad(weights), *pad(s), *pad(b), *pad(outs), r, partials, counts, m, n, k, k_split,
           GROUP=len(weights), SPLIT=split, EVEN=n % block_n == 0 and k == split * k_split,
           PRMT=triton_gemv.widen_by_permute(), HAS_BIAS=has_bias, EPILOGUE=epilogue, BLOCK_M=block_m,
           BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, num_stages=3, **dependent_launch.options(x2.device))
    return outs


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                bias: Optional[torch.Tensor] = None, block_k: Optional[int] = None) -> torch.Tensor:
    """``x @ (weight * scale[:, None]).T + bias`` for up to ``MAX_ROWS`` rows (any leading shape): the
    GEMV for one row, the split-K matmul for more (or whenever ``block_k`` picks its K tile)."""
    return int8_linear_many(x, [weight], [scale], [bias], block_k=block_k)[0]


def int8_linear_many(x: torch.Tensor, weights: Sequence[torch.Tensor], scales: Sequence[torch.Tensor],
                     biases: Optional[Sequence[Optional[torch.Tensor]]] = None, epilogue: int = triton_gemv.PLAIN,
                     residual: Optional[torch.Tensor] = None, block_k: Optional[int] = None) -> List[torch.Tensor]:
    """``triton_gemv``'s grouped linears and epilogues (``int8_gemv_many``, ``_gated``, ``_gelu``, ``_add``)
    for any row count up to ``MAX_ROWS``: one row (``GEMV_ROWS``) takes the GEMV, more the split-K matmul.

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
