"""Device kernels behind one small interface.

``int8_linear`` is the only entry point the rest of the package calls. The portable path below
is plain PyTorch; faster device kernels plug in here without touching callers.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from . import cpm_kernels_bridge, triton_int8, w8a8

__all__ = ["int8_linear"]


class _FusedInt8Linear(torch.autograd.Function):
    """A device kernel's forward, with the input (and bias) gradient from the dequantized weight."""

    @staticmethod
    def forward(ctx, kernel, x, weight, scale, bias):
        ctx.save_for_backward(weight, scale)
        ctx.has_bias = bias is not None
        return kernel(x, weight, scale, bias)

    @staticmethod
    def backward(ctx, grad):
        weight, scale = ctx.saved_tensors
        grad_x = grad @ (weight.to(grad.dtype) * scale.to(grad.dtype)[:, None]) if ctx.needs_input_grad[1] else None
        grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[4] else None
        return None, grad_x, None, None, grad_b


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ (weight * scale[:, None]).T + bias`` for an int8 ``weight`` (out, in) and fp16 ``scale`` (out,).

    The kernel is chosen by device, dtype and shape alone, never by grad mode, so that a block
    recomputed for backward sees the numbers its forward saw.
    """
    # fused int8 decode kernel: weight-only, the weight read once (the memory-bandwidth limit)
    if triton_int8.supports(x, weight):
        return _FusedInt8Linear.apply(triton_int8.int8_linear, x, weight, scale, bias)
    # cpm_kernels (W8A8) where it loaded and passed its self-check on this device
    if x.is_cuda and cpm_kernels_bridge.usable(x.device) and cpm_kernels_bridge.supports(x, weight):
        return _FusedInt8Linear.apply(cpm_kernels_bridge.int8_linear, x, weight, scale, bias)
    # one kernel reads the int8 weight and writes it dequantized: int8 * float promotes to the float
    # dtype, and the product of an int8 and a 16-bit scale is exact in the fp32 it is computed in, so
    # this equals widening first, then scaling
    # opt-in W8A8 for long inputs (BMINF_PREFILL=w8a8): int8 tensor cores, activations rounded too
    if w8a8.supports(x, weight):
        return w8a8.int8_linear(x, weight, scale, bias)
    w = weight * scale.to(x.dtype)[:, None]
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))
