"""The Triton kernels of ``triton_int8``'s split-K matmul (imported on first use: it imports triton)."""
import triton
import triton.language as tl

from .gdc import wait_then_release
from .gemv_kernels import GATED, finish


@triton.jit
def int8_matmul_split(x_ptr, w0, w1, w2, p_ptr, M, N, K, K_SPLIT, GROUP: tl.constexpr, SPLIT: tl.constexpr,
                      EVEN: tl.constexpr, PDL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    # x (M, K) fp16, GROUP int8 weights (N, K); p (GROUP, SPLIT, M, N) fp32 partial sums. Program
    # (i, s, j) sums K_SPLIT columns, from s * K_SPLIT on, of rows j * BLOCK_M... of x against BLOCK_N
    # rows of weight i // blocks. EVEN: the tiles divide N and the splits' stretches of K.
    blocks = tl.cdiv(N, BLOCK_N)
    pid, split, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    which = pid // blocks
    w_ptr = w0
    if GROUP > 1:
        if which == 1:
            w_ptr = w1
    if GROUP > 2:
        if which == 2:
            w_ptr = w2
    rn = (pid % blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    wait_then_release(PDL)  # x is the kernel before's output
    k_lo = split * K_SPLIT
    for k0 in range(k_lo, k_lo + K_SPLIT, BLOCK_K):
        kk = k0 + rk
        # a (BLOCK_K, BLOCK_N) tile of w^T, widened to fp16 in registers (every int8 is exact there)
        if EVEN:
            x = tl.load(x_ptr + rm[:, None] * K + kk[None, :], mask=m_ok[:, None], other=0.0)
            w = tl.load(w_ptr + rn[None, :] * K + kk[:, None])
        else:
            k_ok = kk < K
            x = tl.load(x_ptr + rm[:, None] * K + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptr + rn[None, :] * K + kk[:, None], mask=(rn < N)[None, :] & k_ok[:, None], other=0)
        acc += tl.dot(x, w.to(tl.float16))
    at = p_ptr + ((which * SPLIT + split) * M + rm[:, None]) * N + rn[None, :]
    tl.store(at, acc, mask=m_ok[:, None] & (rn < N)[None, :])


@triton.jit
def _summed(p_ptr, which, rm, rn, ok, M, N, SPLIT: tl.constexpr):
    # the SPLIT partial sums of weight `which`, always added in the same order (deterministic)
    at = p_ptr + (which * SPLIT * M + rm[:, None]) * N + rn[None, :]
    acc = tl.load(at, mask=ok, other=0.0)
    for s in tl.static_range(1, SPLIT):
        acc += tl.load(at + s * M * N, mask=ok, other=0.0)
    return acc


@triton.jit
def int8_matmul_epilogue(p_ptr, s0, s1, s2, b0, b1, b2, y0, y1, y2, r_ptr, M, N, GROUP: tl.constexpr,
                         SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr, PDL: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Sums int8_matmul_split's partials, then scales, adds the bias and applies the epilogue as the
    # GEMV does (gemv_kernels.finish): y_i = partials_i * s_i + b_i for each weight, or for GATED
    # (GROUP 2) y0 = gelu(y_0) * y_1.
    blocks = tl.cdiv(N, BLOCK_N)
    pid, pid_m = tl.program_id(0), tl.program_id(1)
    which = pid // blocks
    s_ptr, b_ptr, y_ptr = s0, b0, y0
    if GROUP > 1 and EPILOGUE != GATED:
        if which == 1:
            s_ptr, b_ptr, y_ptr = s1, b1, y1
    if GROUP > 2:
        if which == 2:
            s_ptr, b_ptr, y_ptr = s2, b2, y2
    rn = (pid % blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok = rn < N
    ok = (rm < M)[:, None] & n_ok[None, :]
    scale = tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    bias = tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    scale1, bias1 = scale, bias
    if EPILOGUE == GATED:  # the second weight's
        scale1 = tl.load(s1 + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        bias1 = tl.load(b1 + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    wait_then_release(PDL)
    out = _summed(p_ptr, which, rm, rn, ok, M, N, SPLIT)
    out1 = out
    if EPILOGUE == GATED:
        out1 = _summed(p_ptr, 1, rm, rn, ok, M, N, SPLIT)
    out = finish(out, out1, scale, scale1, bias, bias1, r_ptr, rm, rn, ok, N, HAS_BIAS, EPILOGUE)
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], out.to(y0.dtype.element_ty), mask=ok)
