"""The Triton kernel of ``triton_gemv`` (imported on first use: it imports triton)."""
import triton
import triton.language as tl

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


@triton.jit
def widen(w, PRMT: tl.constexpr):
    """int8 -> fp32, exact either way: through fp16 with conversion instructions, or by byte permutes."""
    if PRMT:
        return tl.inline_asm_elementwise(WIDEN_PRMT, "=r,=r,=r,=r,r", [w], dtype=tl.float32, is_pure=True, pack=4)
    else:
        return w.to(tl.float16).to(tl.float32)


@triton.jit
def int8_gemv(x_ptr, w0, w1, w2, s0, s1, s2, b0, b1, b2, y0, y1, y2, M, N, K,
              GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN: tl.constexpr, PRMT: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # x (M, K); GROUP int8 weights (N, K) with scales (N,), biases (N,) and outputs (M, N): program p
    # does BLOCK_N rows of linear p // blocks. EVEN: the tiles divide N and K (no masks on w).
    blocks = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    rn = (pid % blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    n_ok = rn < N
    which = pid // blocks
    w_ptr, s_ptr, b_ptr, y_ptr = w0, s0, b0, y0
    if GROUP > 1:
        if which == 1:
            w_ptr, s_ptr, b_ptr, y_ptr = w1, s1, b1, y1
    if GROUP > 2:
        if which == 2:
            w_ptr, s_ptr, b_ptr, y_ptr = w2, s2, b2, y2
    # The weight is read once per step: evict_first keeps it from pushing x and the activations out
    # of L2. One row: the product of each (BLOCK_N, BLOCK_K) tile is summed over K as it comes, so
    # the accumulator is BLOCK_N floats and the registers go to loads in flight (measured on an H200
    # 6.5/12.5/13.1 us on CPM-2's three shapes against 8.1/14.9/13.9 with a (BLOCK_N, BLOCK_K)
    # accumulator summed after the loop). More rows: partial sums over (rows, BLOCK_N, BLOCK_K),
    # summed over K after the loop. The int8 tile is widened exactly either way.
    if BLOCK_M == 1:
        out = tl.zeros((BLOCK_N,), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        if EVEN:
            w = tl.load(w_ptr + rn[:, None] * K + kk[None, :], eviction_policy="evict_first")
        else:
            w = tl.load(w_ptr + rn[:, None] * K + kk[None, :], mask=n_ok[:, None] & (kk < K)[None, :], other=0,
                        eviction_policy="evict_first")
        w = widen(w, PRMT)
        if BLOCK_M == 1:
            x = tl.load(x_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
            out += tl.sum(x[None, :] * w, axis=1)
        else:
            x = tl.load(x_ptr + rm[:, None] * K + kk[None, :], mask=(rm[:, None] < M) & (kk < K)[None, :], other=0.0)
            acc += x.to(tl.float32)[:, None, :] * w[None, :, :]
    if BLOCK_M == 1:
        out = out[None, :]
    else:
        out = tl.sum(acc, axis=2)
    out *= tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        out += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], out.to(y0.dtype.element_ty), mask=(rm[:, None] < M) & n_ok[None, :])
