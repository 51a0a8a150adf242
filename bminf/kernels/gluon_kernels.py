"""The Gluon kernel of ``gluon_gemv`` (imported on first use: it imports Triton's experimental Gluon)."""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy

from .gdc import wait_then_release
from .gemv_kernels import ADD, GELU, WIDEN_PRMT, fp16, gelu_tanh

WIDEN = gl.constexpr(WIDEN_PRMT.value)  # int8 -> fp32 by byte permutes, as the Triton GEMV widens


@gluon.jit
def _finish(out, b_ptr, r_ptr, rn, HAS_BIAS: gl.constexpr, EPILOGUE: gl.constexpr):
    # gemv_kernels.finish's steps and roundings for one row: scaled sums, + bias, then the epilogue (PLAIN,
    # GELU or ADD; not GATED, which reads two weights)
    if HAS_BIAS:
        out += gl.load(b_ptr + rn).to(gl.float32)
    if EPILOGUE == GELU:
        out = gelu_tanh(fp16(out))
    if EPILOGUE == ADD:
        out = fp16(out) + gl.load(r_ptr + rn).to(gl.float32)
    return out


@gluon.jit
def int8_gemv(x_ptr, w_ptr, s_ptr, b_ptr, r_ptr, y_ptr, N, K, HAS_BIAS: gl.constexpr, EPILOGUE: gl.constexpr,
              PDL: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr,
              LANES_K: gl.constexpr, WARPS: gl.constexpr):
    # y (1, N) = x (1, K) @ (w (N, K) int8 * s[:, None]).T (+ b (N,)) through the epilogue (ADD: + r (1, N)),
    # the tiles dividing N and K: program p does rows p * BLOCK_N... over the whole of K, its (BLOCK_N,
    # BLOCK_K) tiles copied into a ring of STAGES slots. Each thread copies 16 contiguous bytes of a row and
    # later reads back the same bytes.
    layout: gl.constexpr = gl.BlockedLayout([1, 16], [32 // LANES_K, LANES_K], [WARPS, 1], [1, 0])
    ring_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    rn = gl.program_id(0) * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, layout))
    rk = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, layout))
    ring = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_N, BLOCK_K], ring_layout)
    w_at = w_ptr + rn[:, None] * K + rk[None, :]
    tiles = K // BLOCK_K
    # Before the wait, while the kernel before is finishing: the first STAGES tiles (no kernel of a step
    # writes a weight) and the scales. A copy past K is masked: it reads nothing and fills zeros.
    for s in gl.static_range(STAGES):
        async_copy.async_copy_global_to_shared(ring.index(s), w_at + s * BLOCK_K, mask=(rk[None, :] * 0 + s) < tiles)
        async_copy.commit_group()
    scale = gl.load(s_ptr + rn).to(gl.float32)
    wait_then_release(PDL)  # the Triton kernels' rule (see dependent_launch)
    acc = gl.zeros([BLOCK_N, BLOCK_K], gl.float32, layout)
    for i in range(tiles):
        async_copy.wait_group(STAGES - 1)  # tile i has landed (one group is committed per tile)
        slot = ring.index(i % STAGES)
        x = gl.load(x_ptr + i * BLOCK_K + rk).to(gl.float32)
        w = gl.inline_asm_elementwise(WIDEN, "=r,=r,=r,=r,r", [slot.load(layout)], dtype=gl.float32, is_pure=True,
                                      pack=4)
        acc += w * x[None, :]
        gl.thread_barrier()  # the slot is read before it is refilled
        nxt = i + STAGES
        async_copy.async_copy_global_to_shared(slot, w_at + nxt * BLOCK_K, mask=(rk[None, :] * 0 + nxt) < tiles)
        async_copy.commit_group()
    async_copy.wait_group(0)
    out = _finish(gl.sum(acc, axis=1) * scale, b_ptr, r_ptr, rn, HAS_BIAS, EPILOGUE)
    gl.store(y_ptr + rn, out.to(y_ptr.dtype.element_ty))
