"""T5's RMSNorm and GPT's LayerNorm as one Triton kernel each, for CUDA fp16/bf16 rows.

In PyTorch the norm is eight small kernels (widen, square, mean, add, rsqrt, multiply, narrow,
gain); a decode step of CPM-2 runs 73 of them, and in a CUDA graph each costs a launch slot that
is worth more than its arithmetic. The kernel follows the same order of rounding as
``bminf.layers.RMSNorm``: statistics in fp32, the normalized row rounded to the input dtype, then
multiplied by the gain (rounded once more), so results match to the last bit except where the fp32
sum over the row is added up in another order.

``residual`` is T5's residual step in one kernel: the add, the fp16 overflow clamp and the norm
that follows it, which in PyTorch are seven or more kernels. ``layer_norm`` does the same for GPT's
pre-norm blocks: the residual add and the LayerNorm after it in one kernel.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import dependent_launch
from .compile_ahead import launch
from .triton_int8 import available

MAX_DIM = 16384


def _kernels():
    from . import norm_kernels  # imported on first use: it imports triton
    return norm_kernels


def _whole_rows(x: torch.Tensor) -> dict:
    """Launch options of the kernels here, one program per row of ``x``: the row's width rounded up to a
    power of two, a warp per 256 of it (1 to 16), and dependent launch where the GPU has it."""
    import triton
    block = triton.next_power_of_2(x.shape[-1])
    return dict(BLOCK=block, num_warps=min(16, max(1, block // 256)), **dependent_launch.options(x.device))


# fp16's largest value less 1000, on fp16's grid: where HF's T5 clamps an overflowing residual
FP16_CLAMP = float(torch.tensor(torch.finfo(torch.float16).max - 1000, dtype=torch.float16))


def clamp_rows(x: torch.Tensor) -> torch.Tensor:
    """fp16 only: each row (last dimension) that holds an inf is clamped to +-``FP16_CLAMP``, as HF's
    T5 clamps a residual that outgrew fp16 (one inf becomes NaN in the next RMSNorm). HF clamps the
    whole tensor when any value is inf; per row, one sequence's overflow does not change the numbers
    of the others in its batch. Other dtypes, and rows without an inf, pass through unchanged."""
    if x.dtype != torch.float16:
        return x
    has_inf = torch.isinf(x).any(-1, keepdim=True)  # on the device: no host sync
    limit = torch.where(has_inf, FP16_CLAMP, float(torch.finfo(torch.float16).max)).to(x.dtype)
    return torch.clamp(x, -limit, limit)


def residual(x: torch.Tensor, h: torch.Tensor, weight: Optional[torch.Tensor] = None,
             eps: float = 1e-6) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """T5's residual step: ``s = clamp_rows(x + h)`` and, given a norm ``weight``, ``RMSNorm(s)``.

    Returns ``(s, normed or None)``. On CUDA in fp16/bf16 without autograd it is one kernel (in
    PyTorch: an add, the clamp's five kernels and the norm's); the same rounding steps either way.
    """
    if x.shape != h.shape:
        raise ValueError(f"residual: shapes {tuple(x.shape)} and {tuple(h.shape)} differ")
    if not supports(x) or x.dtype != h.dtype:
        return _residual_reference(x, h, weight, eps)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, h, weight))):
        return _residual_kernel_call(x, h, weight, eps)  # the same numbers, without autograd's cost
    out = _Residual.apply(x, h, weight, eps)
    return (out, None) if weight is None else out


def _residual_reference(x, h, weight, eps):
    s = clamp_rows(x + h)
    return s, (reference(s, weight, eps) if weight is not None else None)


def _reference_grads(needs, inputs, outputs_of, grads):
    """Gradients of the PyTorch formula ``outputs_of(*inputs)``, recomputed: the kernel is chosen by
    device and dtype alone, so a block recomputed for backward sees its forward's numbers."""
    with torch.enable_grad():
        leaves = [None if t is None else t.detach().requires_grad_(need) for t, need in zip(inputs, needs)]
        outs = [o for o in outputs_of(*leaves) if o is not None]
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None]
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        found = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
                     if wanted and pairs else ())
    return [next(found) if t is not None and t.requires_grad else None for t in leaves]


class _Residual(torch.autograd.Function):
    """The kernel's forward, ``s`` (and ``RMSNorm(s)`` given a weight); backward through the PyTorch
    formula."""

    @staticmethod
    def forward(ctx, x, h, weight, eps):
        ctx.save_for_backward(x, h, weight)
        ctx.eps = eps
        s, y = _residual_kernel_call(x, h, weight, eps)
        return s if weight is None else (s, y)

    @staticmethod
    def backward(ctx, *grads):  # without a weight, the formula's second output is None and skipped
        return (*_reference_grads(ctx.needs_input_grad[:3], ctx.saved_tensors,
                                  lambda a, b, w: _residual_reference(a, b, w, ctx.eps), grads), None)


def _residual_kernel_call(x, h, weight, eps):
    kernel = _kernels().residual_norm
    d = x.shape[-1]
    x2, h2 = x.reshape(-1, d).contiguous(), h.reshape(-1, d).contiguous()
    s = torch.empty_like(x2)
    y = torch.empty_like(x2) if weight is not None else s
    w = weight.contiguous() if weight is not None else s  # a placeholder pointer when absent
    launch(kernel, (x2.shape[0],), x2, h2, w, s, y, d, eps, FP16_CLAMP, CLAMP=x.dtype == torch.float16,
           NORM=weight is not None, **_whole_rows(x))
    return s.reshape(x.shape), (y.reshape(x.shape) if weight is not None else None)


def supports(x: torch.Tensor) -> bool:
    return (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and x.shape[-1] <= MAX_DIM
            and x.numel() > 0 and available())


def reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The same norm in PyTorch (what ``bminf.layers.RMSNorm`` computes off CUDA)."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return normed.to(x.dtype) * weight.to(x.dtype)


class _RMSNorm(torch.autograd.Function):
    """The kernel's forward; backward through the PyTorch formula (the kernel choice never depends
    on grad mode, so a block recomputed for backward sees its forward's numbers)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return _forward(x, weight, eps)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        return (*_reference_grads(ctx.needs_input_grad[:2], (x, weight), lambda a, w: (reference(a, w, ctx.eps),),
                                  (grad,)), None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``(x * rsqrt(mean(x^2) + eps)).to(x.dtype) * weight`` over the last dimension.

    >>> # on a GPU: rms_norm(torch.randn(2, 4096, device="cuda").half(), gain, 1e-6).shape == (2, 4096)
    """
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _RMSNorm.apply(x, weight, eps)
    return _forward(x, weight, eps)


def _forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    kernel = _kernels().rms_norm
    d = x.shape[-1]
    x2 = x.reshape(-1, d).contiguous()
    y = torch.empty_like(x2)
    launch(kernel, (x2.shape[0],), x2, weight.contiguous(), y, d, eps, **_whole_rows(x))
    return y.reshape(x.shape)


def layer_norm_reference(x, h, weight, bias, eps):
    """``(x + h, F.layer_norm(x + h))``, or ``F.layer_norm(x)`` when ``h`` is None."""
    s = x if h is None else x + h
    y = F.layer_norm(s, (s.shape[-1],), weight, bias, eps)
    return y if h is None else (s, y)


class _LayerNorm(torch.autograd.Function):
    """The kernel's forward; backward through ``F.layer_norm``, recomputed."""

    @staticmethod
    def forward(ctx, x, h, weight, bias, eps):
        ctx.save_for_backward(x, h, weight, bias)
        ctx.eps = eps
        return _layer_norm_call(x, h, weight, bias, eps)

    @staticmethod
    def backward(ctx, *grads):
        def outputs(a, b, w, c):  # (s, y) with the add, y alone without
            out = layer_norm_reference(a, b, w, c, ctx.eps)
            return out if b is not None else (out,)
        return (*_reference_grads(ctx.needs_input_grad[:4], ctx.saved_tensors, outputs, grads), None)


def _layer_norm_call(x, h, weight, bias, eps):
    kernel = _kernels().layer_norm
    d = x.shape[-1]
    x2 = x.reshape(-1, d).contiguous()
    h2 = h.reshape(-1, d).contiguous() if h is not None else x2  # a placeholder pointer when absent
    s = torch.empty_like(x2) if h is not None else x2
    y = torch.empty_like(x2)
    launch(kernel, (x2.shape[0],), x2, h2, weight.contiguous(), bias.contiguous(), s, y, d, eps, ADD=h is not None,
           **_whole_rows(x))
    return y.reshape(x.shape) if h is None else (s.reshape(x.shape), y.reshape(x.shape))


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               h: Optional[torch.Tensor] = None):
    """``F.layer_norm(x)`` over the last dimension, or with ``h`` the residual step before it in the
    same kernel: ``(x + h, F.layer_norm(x + h))``. One Triton kernel on CUDA fp16/bf16 (torch's own
    layer-norm kernel took 5.6 us a row of 2560 on an H200, a whole row per launch on one block);
    ``F.layer_norm`` elsewhere."""
    if h is not None and h.shape != x.shape:
        raise ValueError(f"layer_norm: shapes {tuple(x.shape)} and {tuple(h.shape)} differ")
    if (not supports(x) or weight is None or bias is None or (h is not None and h.dtype != x.dtype)):
        return layer_norm_reference(x, h, weight, bias, eps)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, h, weight, bias)):
        return _LayerNorm.apply(x, h, weight, bias, eps)
    return _layer_norm_call(x, h, weight, bias, eps)
