"""The Triton kernel of ``triton_int8``'s split-K matmul (imported on first use: it imports triton)."""
import triton
import triton.language as tl

from .gdc import wait_then_release
from .gemv_kernels import GATED, finish, widen16


@triton.jit
def _summed(p_ptr, which, rm, rn, ok, M, N, SPLIT: tl.constexpr):
    # the SPLIT partial sums of weight `which`, always added in the same order (deterministic)
    at = p_ptr + (which * SPLIT * M + rm[:, None]) * N + rn[None, :]
    # .cg: other programs wrote them, through L2; this multiprocessor's L1 may hold older lines
    acc = tl.load(at, mask=ok, other=0.0, cache_modifier=".cg")
    for s in tl.static_range(1, SPLIT):
        acc += tl.load(at + s * M * N, mask=ok, other=0.0, cache_modifier=".cg")
    return acc


@triton.jit
def int8_matmul(x_ptr, w0, w1, w2, s0, s1, s2, b0, b1, b2, y0, y1, y2, r_ptr, p_ptr, t_ptr, M, N, K, K_SPLIT,
                GROUP: tl.constexpr, SPLIT: tl.constexpr, EVEN: tl.constexpr, PRMT: tl.constexpr,
                HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr, PDL: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # y_i = x @ (w_i * s_i).T + b_i through the GEMV's epilogues (gemv_kernels.finish), for x (M, K)
    # fp16 and GROUP int8 weights (N, K). Program (i, s, j) sums K_SPLIT columns of x, from s * K_SPLIT
    # on, for rows j * BLOCK_M... against BLOCK_N rows of weight i // blocks, into p (GROUP, SPLIT, M, N)
    # fp32. The last program of a tile to finish, counted in t (int32, zero between launches), adds
    # the tile's SPLIT sums in a fixed order (the same numbers whichever program it is), applies the
    # epilogue, stores, and sets its count back to zero: one launch, where a second kernel for the sums
    # cost about 2 us of each 11-35 (h200_run62.log). GATED's two weights finish one tile together. With
    # SPLIT 1 (not GATED) each program finishes its own tile. EVEN: the tiles divide N and the splits'
    # stretches of K.
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
    n_ok = rn < N
    ok = m_ok[:, None] & n_ok[None, :]
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
            w = tl.load(w_ptr + rn[None, :] * K + kk[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0)
        acc += tl.dot(x, widen16(w, PRMT))
    last = True
    if SPLIT > 1 or EPILOGUE == GATED:
        tl.store(p_ptr + ((which * SPLIT + split) * M + rm[:, None]) * N + rn[None, :], acc, mask=ok)
        tl.debug_barrier()  # every thread's sums stored before the count says they are
        if EPILOGUE == GATED:
            tile = (pid % blocks) * tl.num_programs(2) + pid_m
            arrived = tl.atomic_add(t_ptr + tile, 1, sem="acq_rel") + 1
            last = arrived == 2 * SPLIT
        else:
            tile = pid * tl.num_programs(2) + pid_m
            arrived = tl.atomic_add(t_ptr + tile, 1, sem="acq_rel") + 1
            last = arrived == SPLIT
    if last:
        mine = which
        if EPILOGUE == GATED:
            mine = 0
        s_ptr, b_ptr, y_ptr = s0, b0, y0
        if GROUP > 1:
            if mine == 1:
                s_ptr, b_ptr, y_ptr = s1, b1, y1
        if GROUP > 2:
            if mine == 2:
                s_ptr, b_ptr, y_ptr = s2, b2, y2
        scale = tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        bias = tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        scale1 = tl.load(s1 + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        bias1 = tl.load(b1 + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        out = acc
        out1 = acc
        if SPLIT > 1 or EPILOGUE == GATED:
            tl.atomic_xchg(t_ptr + tile, 0, sem="relaxed")  # ready for the next launch
            out = _summed(p_ptr, mine, rm, rn, ok, M, N, SPLIT)
            if EPILOGUE == GATED:
                out1 = _summed(p_ptr, 1, rm, rn, ok, M, N, SPLIT)
        out = finish(out, out1, scale, scale1, bias, bias1, r_ptr, rm, rn, ok, N, HAS_BIAS, EPILOGUE)
        tl.store(y_ptr + rm[:, None] * N + rn[None, :], out.to(y0.dtype.element_ty), mask=ok)
