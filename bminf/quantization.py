"""Int8 weight quantization: one fp16 scale per output row, as BMInf's checkpoints store it.

Quantization is a module swap after construction: model code builds plain ``nn.Linear``s and
``quantize_`` replaces them, so no model imports this module.
"""
from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn

from .kernels import int8_linear

__all__ = ["QuantizedLinear", "quantize_weight", "quantize_", "dequantize_state_dict"]


def quantize_weight(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row absmax quantization of a 2-D weight.

    Returns ``(q, scale)`` with ``q`` int8 of the same shape and ``scale`` fp16 of shape
    ``(out_features,)`` such that ``weight ~= q.float() * scale.float()[:, None]``.
    The scale is rounded to fp16 first and ``q`` is computed against the rounded scale, so the
    stored pair dequantizes with the error of int8 rounding alone.

    >>> q, s = quantize_weight(torch.tensor([[1.0, -2.0], [0.0, 0.0]]))
    >>> q.tolist(), s.tolist()
    ([[64, -127], [0, 0]], [0.0157470703125, 0.0])
    """
    if weight.dim() != 2:
        raise ValueError(f"quantize_weight expects a 2-D weight, got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    if not torch.isfinite(w).all():
        raise ValueError("cannot quantize a weight that holds inf or NaN")
    scale = (w.abs().amax(dim=1) / 127).to(torch.float16)
    if torch.isinf(scale).any():
        raise ValueError("weight rows too large for an fp16 scale (absmax > 127 * 65504)")
    s = scale.float()[:, None]
    # rows whose scale is 0 (all zeros, or too small for fp16) quantize to 0 instead of NaN
    q = torch.where(s > 0, torch.round(w / torch.where(s > 0, s, 1.0)), 0.0)
    return q.clamp_(-127, 127).to(torch.int8), scale


class QuantizedLinear(nn.Module):
    """Drop-in for ``nn.Linear`` holding an int8 weight and one fp16 scale per output row.

    ``y = x @ (weight * scale[:, None]).T + bias``, computed in ``x``'s dtype. The weight and
    scale are frozen parameters (so ``model.parameters()`` and ``.to()`` see them); gradients
    flow to the input, and to the bias if it requires them.

    >>> layer = QuantizedLinear.from_linear(nn.Linear(8, 4))
    >>> layer(torch.randn(2, 8)).shape
    torch.Size([2, 4])
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device=None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8, device=device),
                                   requires_grad=False)
        self.scale = nn.Parameter(torch.empty(out_features, dtype=torch.float16, device=device),
                                  requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "QuantizedLinear":
        """Quantize an ``nn.Linear``; the bias Parameter is shared, not copied."""
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, bias=False, device=w.device)
        if not w.is_meta:
            q, scale = quantize_weight(w)
            layer.weight.data, layer.scale.data = q, scale
        layer.bias = linear.bias
        return layer

    @classmethod
    def from_quantized(cls, weight: torch.Tensor, scale: torch.Tensor,
                       bias: Optional[torch.Tensor] = None) -> "QuantizedLinear":
        """Wrap a stored int8 weight ``(out, in)`` and fp16 scale ``(out,)``."""
        if weight.dtype != torch.int8 or weight.dim() != 2:
            raise ValueError(f"weight must be a 2-D int8 tensor, got {weight.dtype} {tuple(weight.shape)}")
        if scale.shape != (weight.shape[0],):
            raise ValueError(f"scale must have shape ({weight.shape[0]},), got {tuple(scale.shape)}")
        if bias is not None and bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        layer = cls(weight.shape[1], weight.shape[0], bias=False, device=weight.device)
        layer.weight.data = weight
        layer.scale.data = scale.to(torch.float16)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return layer

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight ``(out, in)`` this layer computes with."""
        return (self.weight.float() * self.scale.float()[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input with last dimension {self.in_features}, got {tuple(x.shape)}")
        return int8_linear(x, self.weight, self.scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


def quantize_(model: nn.Module, predicate: Optional[Callable[[str, nn.Linear], bool]] = None) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (for which ``predicate(name, linear)`` holds) in place.

    >>> net = quantize_(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    >>> type(net[0]).__name__
    'QuantizedLinear'
    """
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and (predicate is None or predicate(full, child)):
                setattr(module, child_name, QuantizedLinear.from_linear(child))
    return model


def dequantize_state_dict(state: dict, dtype: torch.dtype = torch.float32) -> dict:
    """Turn every int8 ``<name>.weight`` + ``<name>.scale`` pair into one float ``<name>.weight``.

    Other entries pass through, so the result loads into the unquantized model.
    """
    out = {}
    for key, value in state.items():
        if key.endswith(".scale") and state.get(key[:-len("scale")] + "weight", torch.empty(0)).dtype == torch.int8:
            continue
        scale = state.get(key[:-len("weight")] + "scale") if key.endswith(".weight") else None
        if value.dtype == torch.int8 and scale is not None:
            value = (value.float() * scale.float()[:, None]).to(dtype)
        out[key] = value
    return out
