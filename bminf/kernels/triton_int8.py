"""Weight-only int8 matmul for CUDA in Triton: ``y = x @ (weight * scale[:, None]).T + bias``.

The portable path dequantizes the int8 weight to fp16 in memory (one kernel) before cuBLAS runs,
so it moves five bytes per weight. Here the int8 tiles are widened in registers and the row scale
is applied to the fp32 accumulator, so the weight is read once. 1-4 rows (decode) go to the GEMV
in ``triton_gemv`` (no tensor cores); 5 to ``MAX_ROWS`` rows to the ``tl.dot`` kernel below;
larger inputs are compute-bound, where the portable path's cuBLAS GEMM wins.
"""
import contextlib
import contextvars
import functools
import os
from typing import Optional

import torch

from . import triton_gemv
from .compile_ahead import launch

MAX_ROWS = 64
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
def _kernel():
    # built on first use: importing triton costs time, and CPU-only installs lack it
    import triton
    import triton.language as tl

    @triton.jit
    def int8_matmul(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K,
                    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # x (M, K), w (N, K) int8, s (N,), b (N,), y (M, N); all contiguous
        pid_n, pid_m = tl.program_id(0), tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            x = tl.load(x_ptr + rm[:, None] * K + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
            # (BLOCK_K, BLOCK_N) tile of w^T, widened to x's dtype in registers (int8 values are exact)
            w = tl.load(w_ptr + rn[None, :] * K + kk[:, None], mask=(rn[None, :] < N) & (kk[:, None] < K), other=0)
            acc += tl.dot(x, w.to(x.dtype))
        acc *= tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))

    return int8_matmul, triton.cdiv


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


def _block_n(n: int, device: torch.device) -> int:
    """The widest tile of output rows that still gives every multiprocessor a program: decode is a
    stream over the weight, and idle multiprocessors are idle memory bandwidth."""
    for block in (128, 64):
        if n // block >= triton_gemv.multiprocessors(device):
            return block
    return 32


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    rows = x.numel() // max(x.shape[-1], 1)
    # fp16 only: bf16 has not been checked on a GPU yet
    big_enough = _ALWAYS.get() or weight.numel() >= min_numel()
    # the kernels index the weight in 32 bits: larger weights take the portable path
    return (x.is_cuda and x.dtype == torch.float16 and 0 < rows <= MAX_ROWS and big_enough
            and weight.is_cuda and weight.is_contiguous() and weight.numel() < 2**31 and available())


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                bias: Optional[torch.Tensor] = None, block_k: Optional[int] = None) -> torch.Tensor:
    n, k = weight.shape
    if block_k is None and x.numel() // k <= triton_gemv.MAX_ROWS:
        return triton_gemv.int8_gemv(x, weight, scale, bias)  # decode: no tensor cores, the weight streamed
    kernel, cdiv = _kernel()
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)  # tl.dot needs at least 16 rows
    block_n = _block_n(n, x.device)
    # narrow tiles get longer strips of K, so that each program keeps enough bytes in flight
    # (64 rows x 512 of fp16 x plus the int8 tile, 3 stages, overflows shared memory: cap K there)
    block_k = block_k or (128 if block_n == 128 else 256 if block_n == 64 or block_m == 64 else 512)
    b = bias.to(x.dtype).contiguous() if bias is not None else scale  # a placeholder pointer when absent
    launch(kernel, (cdiv(n, block_n), cdiv(m, block_m)), x2, weight, scale.contiguous(), b, y, m, n, k,
           HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, num_stages=3)
    return y.reshape(*x.shape[:-1], n)
