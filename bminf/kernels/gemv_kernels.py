"""The Triton kernel of ``triton_gemv`` (imported on first use: it imports triton)."""
import triton
import triton.language as tl

from . import triton_gemv
from .gdc import wait_then_release

# int8 -> fp32 without a conversion instruction (I2F runs at a quarter of the FMA rate, near the
# HBM byte rate on an H200): flip the sign bit (u = v + 128), place u under the exponent of 2^23
# with one byte permute (the float 2^23 + u, exact), subtract 2^23 + 128. Four bytes in, four
# floats out, each exactly v.
WIDEN_PRMT = tl.constexpr("""{
.reg .b32 t;
xor.b32 t, $4, 0x80808080;
prmt.b32 $0, t, 0x4B000000, 0x7540;
prmt.b32 $1, t, 0x4B000000, 0x7541;
prmt.b32 $2, t, 0x4B000000, 0x7542;
prmt.b32 $3, t, 0x4B000000, 0x7543;
sub.f32 $0, $0, 0f4B000080;
sub.f32 $1, $1, 0f4B000080;
sub.f32 $2, $2, 0f4B000080;
sub.f32 $3, $3, 0f4B000080;
}""")


# int8 -> fp16 the same way for tl.dot's operands: v + 128 under the exponent of 1024 (the half 1024 + u,
# exact: fp16 holds every integer up to 2048), then one subtraction of 1024 + 128 for two halves at once
WIDEN16_PRMT = tl.constexpr("""{
.reg .b32 t, c;
xor.b32 t, $2, 0x80808080;
mov.b32 c, 0x64806480;
prmt.b32 $0, t, 0x64646464, 0x4140;
prmt.b32 $1, t, 0x64646464, 0x4342;
sub.f16x2 $0, $0, c;
sub.f16x2 $1, $1, c;
}""")


@triton.jit
def widen16(w, PRMT: tl.constexpr):
    """int8 -> fp16, exact either way: a conversion instruction per value, or byte permutes."""
    if PRMT:
        return tl.inline_asm_elementwise(WIDEN16_PRMT, "=r,=r,r", [w], dtype=tl.float16, is_pure=True, pack=4)
    else:
        return w.to(tl.float16)


@triton.jit
def widen(w, PRMT: tl.constexpr):
    """int8 -> fp32, exact either way: through fp16 with conversion instructions, or by byte permutes."""
    if PRMT:
        return tl.inline_asm_elementwise(WIDEN_PRMT, "=r,=r,=r,=r,r", [w], dtype=tl.float32, is_pure=True, pack=4)
    else:
        return w.to(tl.float16).to(tl.float32)


# what the kernel does to x @ (w * s).T + b before the store (triton_gemv's numbers, as constants the
# kernel can read): nothing, GELU (CPM-1's feed-forward input), T5's gated GELU (the two input
# linears, gelu(y0) * y1, in one program), or a residual add
PLAIN, GELU, GATED, ADD = (tl.constexpr(i) for i in (triton_gemv.PLAIN, triton_gemv.GELU, triton_gemv.GATED,
                                                     triton_gemv.ADD))


@triton.jit
def gelu_tanh(a):
    # torch's tanh-approximate GELU in fp32; tanh through exp, exact at +-inf (1 - 2 / (inf + 1) = 1)
    u = 0.7978845608028654 * (a + 0.044715 * a * a * a)
    return 0.5 * a * (2.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))


@triton.jit
def fp16(a):
    # round to fp16 and back: the epilogues round where the unfused torch ops store fp16 tensors
    return a.to(tl.float16).to(tl.float32)


@triton.jit
def finish(out, out1, scale, scale1, bias, bias1, r_ptr, rm, rn, ok, N, HAS_BIAS: tl.constexpr,
           EPILOGUE: tl.constexpr):
    # (BLOCK_M, BLOCK_N) fp32 sums of x @ w.T (out1: GATED's second weight) scaled, biased and through
    # the epilogue, ready to store: the GEMV and the split-K matmul both end here, so the
    # two round alike
    out *= scale
    if HAS_BIAS:
        out += bias
    if EPILOGUE == GELU:
        out = gelu_tanh(fp16(out))
    if EPILOGUE == GATED:
        out1 *= scale1
        if HAS_BIAS:
            out1 += bias1
        out = fp16(gelu_tanh(fp16(out))) * fp16(out1)
    if EPILOGUE == ADD:
        out = fp16(out) + tl.load(r_ptr + rm[:, None] * N + rn[None, :], mask=ok, other=0.0).to(tl.float32)
    return out


@triton.jit
def load_tile(w_ptr, w1, rn, n_ok, kk, K, EVEN: tl.constexpr, TWO: tl.constexpr):
    # the int8 (BLOCK_N, BLOCK_K) tile of the weight at columns kk, and of the gated weight w1 if TWO,
    # read once: evict_first keeps it from pushing x and the activations out of L2
    w_at = rn[:, None] * K + kk[None, :]
    if EVEN:
        w = tl.load(w_ptr + w_at, eviction_policy="evict_first")
        w_1 = w
        if TWO:
            w_1 = tl.load(w1 + w_at, eviction_policy="evict_first")
    else:
        w_ok = n_ok[:, None] & (kk < K)[None, :]
        w = tl.load(w_ptr + w_at, mask=w_ok, other=0, eviction_policy="evict_first")
        w_1 = w
        if TWO:
            w_1 = tl.load(w1 + w_at, mask=w_ok, other=0, eviction_policy="evict_first")
    return w, w_1


@triton.jit
def accumulate(acc, acc1, x_ptr, w, w_1, rm, kk, M, K, PRMT: tl.constexpr, TWO: tl.constexpr,
               BLOCK_M: tl.constexpr):
    # The product of each (BLOCK_N, BLOCK_K) tile is summed over K as it comes, so acc is BLOCK_N floats
    # per row and the registers go to loads in flight (measured on an H200 6.5/12.5/13.1 us on CPM-2's
    # three shapes against 8.1/14.9/13.9 with a (BLOCK_N, BLOCK_K) accumulator summed after the loop).
    # More rows: the tile is widened once, then each row's sum goes to its row of acc (BLOCK_M, BLOCK_N);
    # at 2 rows 10.1/22.5/21.4 us against 14.8/26.8/32.9 with a (BLOCK_M, BLOCK_N, BLOCK_K) accumulator
    # summed after the loop, at 4 rows 15.7/36.3/34.8 against 18.0/39.2/39.9 (h200_run37_gemv_rows.log).
    # The int8 tile is widened exactly either way.
    if BLOCK_M == 1:
        x = tl.load(x_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
        acc += tl.sum(x[None, :] * widen(w, PRMT), axis=1)
        if TWO:
            acc1 += tl.sum(x[None, :] * widen(w_1, PRMT), axis=1)
    else:
        wf = widen(w, PRMT)
        wf1 = wf
        if TWO:
            wf1 = widen(w_1, PRMT)
        for r in tl.static_range(BLOCK_M):
            # (kk * 0 + r): a vector mask, which the interpreter needs
            xr = tl.load(x_ptr + r * K + kk, mask=(kk < K) & (kk * 0 + r < M), other=0.0).to(tl.float32)
            mine = rm[:, None] == r
            acc += tl.where(mine, tl.sum(xr[None, :] * wf, axis=1)[None, :], 0.0)
            if TWO:
                acc1 += tl.where(mine, tl.sum(xr[None, :] * wf1, axis=1)[None, :], 0.0)
    return acc, acc1


@triton.jit
def int8_gemv(x_ptr, w0, w1, w2, s0, s1, s2, b0, b1, b2, y0, y1, y2, r_ptr, M, N, K,
              GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN: tl.constexpr, PRMT: tl.constexpr,
              EPILOGUE: tl.constexpr, PDL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr):
    # x (M, K); GROUP int8 weights (N, K) with scales (N,), biases (N,) and outputs (M, N): program p
    # does BLOCK_N rows of linear p // blocks. EVEN: the tiles divide N and K (no masks on w).
    # GATED: GROUP is 2 and program p does BLOCK_N rows of both, storing gelu(y0) * y1 into y0.
    # ADD: y0 = r + (x @ w0.T...), r (M, N). PDL: see dependent_launch.
    blocks = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    rn = (pid % blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    n_ok = rn < N
    which = pid // blocks
    w_ptr, s_ptr, b_ptr, y_ptr = w0, s0, b0, y0
    if GROUP > 1 and EPILOGUE != GATED:
        if which == 1:
            w_ptr, s_ptr, b_ptr, y_ptr = w1, s1, b1, y1
    if GROUP > 2:
        if which == 2:
            w_ptr, s_ptr, b_ptr, y_ptr = w2, s2, b2, y2
    if BLOCK_M == 1:
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc1 = acc
    # Before waiting for x (see dependent_launch), while the kernel before is finishing: the first
    # tile of the weight, its scales and bias
    w, w_1 = load_tile(w_ptr, w1, rn, n_ok, rk, K, EVEN, EPILOGUE == GATED)
    scale = tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    scale1 = tl.load(s1 + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    bias = tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    bias1 = tl.load(b1 + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    wait_then_release(PDL)
    # The first pass is peeled off the loop: a loop that loads the next tile behind a branch, with one
    # copy of the code, compiled faster but ran CPM-2's step at 347 tokens/s against 470 (h200_run22.log)
    acc, acc1 = accumulate(acc, acc1, x_ptr, w, w_1, rm, rk, M, K, PRMT, EPILOGUE == GATED, BLOCK_M)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        kk = k0 + rk
        w, w_1 = load_tile(w_ptr, w1, rn, n_ok, kk, K, EVEN, EPILOGUE == GATED)
        acc, acc1 = accumulate(acc, acc1, x_ptr, w, w_1, rm, kk, M, K, PRMT, EPILOGUE == GATED, BLOCK_M)
    if BLOCK_M == 1:
        out = acc[None, :]
        out1 = acc1[None, :]
    else:
        out = acc
        out1 = acc1
    mn_ok = (rm[:, None] < M) & n_ok[None, :]
    out = finish(out, out1, scale, scale1, bias, bias1, r_ptr, rm, rn, mn_ok, N, HAS_BIAS, EPILOGUE)
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], out.to(y0.dtype.element_ty), mask=mn_ok)
