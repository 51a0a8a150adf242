"""The Triton kernels of ``triton_attention`` (imported on first use: it imports triton)."""
import triton
import triton.language as tl

from .gdc import wait_then_release


@triton.jit
def key_tile(k_row, v_row, bias_row, rl, rd, l_ok, d_ok, sk_l, sv_l):
    # keys and values (BLOCK_L, BLOCK_D) and the bias (BLOCK_L,) at positions rl
    tile = l_ok[:, None] & d_ok[None, :]
    k = tl.load(k_row + rl[:, None] * sk_l + rd[None, :], mask=tile, other=0.0)
    v = tl.load(v_row + rl[:, None] * sv_l + rd[None, :], mask=tile, other=0.0)
    return k, v, tl.load(bias_row + rl, mask=l_ok, other=0.0)


@triton.jit
def with_new(k, v, kn, vn, rl, pos):
    # this step's key and value from registers: another program stores them, not visible to this one
    here = (rl == pos)[:, None]
    return tl.where(here, kn[None, :], k), tl.where(here, vn[None, :], v)


@triton.jit
def fold(m, total, acc, q, k, v, bias, l_ok):
    # one tile of keys into the running softmax: m its max, total its sum, acc (BLOCK_D,) the values
    s = tl.sum(k.to(tl.float32) * q[None, :], axis=1)
    s += bias.to(tl.float32)
    s = tl.where(l_ok, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=0))
    alpha = tl.exp(m - m_new)
    p = tl.exp(s - m_new)
    total = total * alpha + tl.sum(p, axis=0)
    acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
    return m_new, total, acc


@triton.jit
def decode_attention(q_ptr, k_ptr, v_ptr, bias_ptr, o_ptr, kn_ptr, vn_ptr, pos_ptr, part_ptr, H, L, CHUNK, scale,
                     sq_b, sq_h, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sb_b, sb_h, sn_b, sn_h, sp_b, D: tl.constexpr,
                     WRITE: tl.constexpr, READ_BACK: tl.constexpr, BOUND: tl.constexpr, SPLIT: tl.constexpr,
                     PDL: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    # q (B, H, D), k/v (B, H, >= L, D) with strides, bias (B, H, L) with strides (0 where it
    # broadcasts), o (B, H, D) contiguous; WRITE: the new kn/vn (B, H, D) go to position pos_ptr[b * sp_b]
    # (sp_b 0: one position for every row; else each row its own, as a server's rows have).
    # Program (row * H + head, split) takes keys [split * CHUNK, split * CHUNK + CHUNK); with SPLIT
    # it leaves (max, sum, unnormalized output) in part (B * H, splits, D + 2) for combine().
    # D is a constant so that a row of d_head below BLOCK_D (CPM-1's 80) still loads in vectors.
    pid, split = tl.program_id(0), tl.program_id(1)
    b, h = (pid // H).to(tl.int64), pid % H  # b * (a row's stride) passes 2^31 in large batches
    rd = tl.arange(0, BLOCK_D)
    d_ok = rd < D
    k_row = k_ptr + b * sk_b + h * sk_h
    v_row = v_ptr + b * sv_b + h * sv_h
    bias_row = bias_ptr + b * sb_b + h * sb_h
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, L)
    if WRITE:
        pos = tl.load(pos_ptr + b * sp_b).to(tl.int32)  # key indices in 32 bits, as without WRITE
        if BOUND:  # keys after this step's are masked for every row (the cache fills left to right),
            # and a masked key adds exactly 0: not reading them changes no bit of the result
            end = tl.minimum(end, pos + 1)
    # Before the wait (see dependent_launch): the first tile of keys, values and bias. No kernel of this
    # step writes them (the position and bias were set before its first layer; this step's own key,
    # stale here, is replaced from registers), but q and the new key and value are the previous
    # kernel's outputs. Large batches store the new key before reading: they load after the wait.
    rl = start + tl.arange(0, BLOCK_L)
    l_ok = rl < end
    if not READ_BACK:
        k, v, bias = key_tile(k_row, v_row, bias_row, rl, rd, l_ok, d_ok, sk_l, sv_l)
    wait_then_release(PDL)
    q = tl.load(q_ptr + b * sq_b + h * sq_h + rd, mask=d_ok, other=0.0).to(tl.float32) * scale
    if WRITE:
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
    if READ_BACK:
        k, v, bias = key_tile(k_row, v_row, bias_row, rl, rd, l_ok, d_ok, sk_l, sv_l)
    m = tl.max(tl.full((BLOCK_L,), float("-inf"), tl.float32), axis=0)
    total = tl.sum(tl.zeros((BLOCK_L,), tl.float32), axis=0)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    if start < end:  # the first tile, peeled off as in the GEMV (a split with no keys skips it, as the loop)
        if WRITE and not READ_BACK:
            k, v = with_new(k, v, kn, vn, rl, pos)
        m, total, acc = fold(m, total, acc, q, k, v, bias, l_ok)
    for l0 in range(start + BLOCK_L, end, BLOCK_L):
        rl = l0 + tl.arange(0, BLOCK_L)
        l_ok = rl < end
        k, v, bias = key_tile(k_row, v_row, bias_row, rl, rd, l_ok, d_ok, sk_l, sv_l)
        if WRITE and not READ_BACK:
            k, v = with_new(k, v, kn, vn, rl, pos)
        m, total, acc = fold(m, total, acc, q, k, v, bias, l_ok)
    if SPLIT:  # a split with no keys (all after pos) leaves max -inf, sum 0: combine() weighs it 0
        part = part_ptr + (pid * tl.num_programs(1) + split) * (D + 2)
        tl.store(part + rd, acc, mask=d_ok)
        tl.store(part + D, m)
        tl.store(part + D + 1, total)
    else:
        tl.store(o_ptr + pid * D + rd, (acc / total).to(o_ptr.dtype.element_ty), mask=d_ok)


@triton.jit
def combine(part_ptr, o_ptr, SPLITS, D: tl.constexpr, PDL: tl.constexpr, BLOCK_S: tl.constexpr,
            BLOCK_D: tl.constexpr):
    # the splits of one (row, head): rescale each partial output to the largest max, then normalize
    wait_then_release(PDL)
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


@triton.jit
def step_biases(mask_ptr, pos_ptr, bucket_ptr, w_ptr, enc_ptr, self_ptr, cross_ptr, L, S, H, NB, sm_b, sp_b, se_b,
                low, POSITION: tl.constexpr, CROSS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_L: tl.constexpr):
    # Program (b, i): row b at step position p = pos[b * sp_b], keys [i * BLOCK_L, ...). Key j is allowed
    # where the mask (B, >= L; uint8) marks it or j = p, and j <= p; program (b, 0) marks p. self (B, H, 1, L):
    # w[h, bucket[p - j]] (POSITION; else H is 1 and the term 0) + (0 where allowed, else low), added in fp32
    # and rounded once, as torch adds fp16 tensors. cross (B, 1, 1, S) (CROSS): 0 where enc (B, S) marks
    # the source token, else low.
    b, i = tl.program_id(0).to(tl.int64), tl.program_id(1)
    p = tl.load(pos_ptr + b * sp_b).to(tl.int32)
    rj = i * BLOCK_L + tl.arange(0, BLOCK_L)
    if i == 0:
        tl.store(mask_ptr + b * sm_b + p, 1)
    ok = rj < L
    allowed = ((tl.load(mask_ptr + b * sm_b + rj, mask=ok, other=0) != 0) | (rj == p)) & (rj <= p)
    extra = tl.where(allowed, 0.0, low)
    if POSITION:
        rh = tl.arange(0, BLOCK_H)
        tile = (rh < H)[:, None] & ok[None, :]
        bucket = tl.load(bucket_ptr + tl.maximum(p - rj, 0), mask=ok, other=0)
        w = tl.load(w_ptr + rh[:, None] * NB + bucket[None, :], mask=tile, other=0.0).to(tl.float32)
        out = w + extra[None, :]
        tl.store(self_ptr + (b * H + rh[:, None]) * L + rj[None, :], out.to(self_ptr.dtype.element_ty), mask=tile)
    else:
        tl.store(self_ptr + b * L + rj, extra.to(self_ptr.dtype.element_ty), mask=ok)
    if CROSS:
        rs = i * BLOCK_L + tl.arange(0, BLOCK_L)
        s_ok = rs < S
        marked = tl.load(enc_ptr + b * se_b + rs, mask=s_ok, other=0) != 0
        tl.store(cross_ptr + b * S + rs, tl.where(marked, 0.0, low).to(cross_ptr.dtype.element_ty), mask=s_ok)
