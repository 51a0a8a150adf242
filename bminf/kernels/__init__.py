"""Device kernels behind one small interface.

``int8_linear`` is the only entry point the rest of the package calls. The portable path below
is plain PyTorch; faster device kernels plug in here without touching callers.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from . import cpm_kernels_bridge, triton_int8

__all__ = ["int8_linear"]


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ (weight * scale[:, None]).T + bias`` for an int8 ``weight`` (out, in) and fp16 ``scale`` (out,)."""
    # fused int8 decode kernel: weight-only, read once: the memory-bandwidth limit
    if triton_int8.supports(x, weight) and not (x.requires_grad and torch.is_grad_enabled()):
        return triton_int8.int8_linear(x, weight, scale, bias)
    # cpm_kernels (W8A8, forward only) where it loaded and passed its self-check on this device
    if x.is_cuda and not (x.requires_grad and torch.is_grad_enabled()) and cpm_kernels_bridge.usable(x.device):
        out = cpm_kernels_bridge.int8_linear(x, weight, scale, bias)
        if out is not None:
            return out
    w = weight.to(x.dtype) * scale.to(x.dtype)[:, None]
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))
