"""The Triton kernels of ``triton_norm`` (imported on first use: it imports triton)."""
import triton
import triton.language as tl

from .gdc import wait_then_release


@triton.jit
def rms_norm(x_ptr, w_ptr, y_ptr, D, eps, PDL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < D
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(y_ptr.dtype.element_ty).to(tl.float32)
    wait_then_release(PDL)  # the gain before, x (the previous kernel's output) after (see dependent_launch)
    x = tl.load(x_ptr + row * D + cols, mask=ok, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    normed = (x * r).to(y_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + row * D + cols, (normed * w).to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def residual_norm(x_ptr, h_ptr, w_ptr, s_ptr, y_ptr, D, eps, limit,
                  CLAMP: tl.constexpr, NORM: tl.constexpr, PDL: tl.constexpr, BLOCK: tl.constexpr):
    # s = x + h rounded as torch rounds it; in fp16, a row holding an inf is clamped to
    # +-limit; y = RMSNorm(s) as rms_norm above computes it
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < D
    if NORM:
        w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(y_ptr.dtype.element_ty).to(tl.float32)
    wait_then_release(PDL)  # the gain before, x and h after (see dependent_launch)
    x = tl.load(x_ptr + row * D + cols, mask=ok, other=0.0).to(tl.float32)
    h = tl.load(h_ptr + row * D + cols, mask=ok, other=0.0).to(tl.float32)
    s = (x + h).to(s_ptr.dtype.element_ty).to(tl.float32)
    if CLAMP:
        has_inf = tl.max(tl.where(ok & (tl.abs(s) == float("inf")), 1, 0), axis=0) > 0
        s = tl.where(has_inf & (s > limit), limit, tl.where(has_inf & (s < -limit), -limit, s))
    tl.store(s_ptr + row * D + cols, s.to(s_ptr.dtype.element_ty), mask=ok)
    if NORM:
        s = tl.where(ok, s, 0.0)
        r = 1.0 / tl.sqrt(tl.sum(s * s, axis=0) / D + eps)
        normed = (s * r).to(y_ptr.dtype.element_ty).to(tl.float32)
        tl.store(y_ptr + row * D + cols, (normed * w).to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def layer_norm(x_ptr, h_ptr, w_ptr, b_ptr, s_ptr, y_ptr, D, eps, ADD: tl.constexpr, PDL: tl.constexpr,
               BLOCK: tl.constexpr):
    # s = x (+ h, the sum rounded as torch rounds it; stored); y = LayerNorm(s) as torch computes
    # it in fp16: mean and variance in fp32, the affine result rounded once
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < D
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    wait_then_release(PDL)  # the affine parameters before, x and h after (see dependent_launch)
    s = tl.load(x_ptr + row * D + cols, mask=ok, other=0.0).to(tl.float32)
    if ADD:
        h = tl.load(h_ptr + row * D + cols, mask=ok, other=0.0).to(tl.float32)
        s = (s + h).to(s_ptr.dtype.element_ty).to(tl.float32)
        tl.store(s_ptr + row * D + cols, s.to(s_ptr.dtype.element_ty), mask=ok)
    centred = tl.where(ok, s - tl.sum(s, axis=0) / D, 0.0)
    r = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / D + eps)
    tl.store(y_ptr + row * D + cols, (centred * r * w + b).to(y_ptr.dtype.element_ty), mask=ok)
