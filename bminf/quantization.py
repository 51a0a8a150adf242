"""Int8 weight quantization: one fp16 scale per output row, as BMInf's checkpoints store it.

Quantization is a module swap after construction: model code builds plain ``nn.Linear``s and
``quantize_`` replaces them, so no model imports this module.
"""
import warnings
from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn

from .kernels import int8_linear

__all__ = ["QuantizedLinear", "quantize_weight", "quantize_", "dequantize_state_dict"]


# the fp16 grid's finest step (the smallest subnormal): no nonzero scale can be smaller
_FP16_STEP = 2.0 ** -24
# rows whose largest |q| falls below this keep fewer than half the int8 levels: warned about
_FEW_LEVELS = 64


def _rows(rows: torch.Tensor) -> str:
    rows = rows.nonzero().flatten().tolist()
    return ", ".join(map(str, rows[:8])) + (f" ... ({len(rows)} rows in all)" if len(rows) > 8 else "")


def quantize_weight(weight: torch.Tensor, name: str = "weight") -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row absmax quantization of a 2-D weight.

    Returns ``(q, scale)`` with ``q`` int8 of the same shape and ``scale`` fp16 of shape
    ``(out_features,)`` such that ``weight ~= q.float() * scale.float()[:, None]``.
    The scale is ``absmax / 127`` rounded *up* to the fp16 grid (normal or subnormal), so
    ``|q| <= 127`` always holds and every element is within half a step of its row's scale.

    Rows so small that their scale sits at the bottom of fp16's subnormal range keep fewer int8
    levels: a warning names them (``name`` says which layer). A nonzero row that would quantize to
    all zeros, or one too large for an fp16 scale, is a ValueError naming the rows.

    >>> q, s = quantize_weight(torch.tensor([[1.0, -2.0], [0.0, 0.0]]))
    >>> q.tolist(), s.tolist()
    ([[63, -127], [0, 0]], [0.0157623291015625, 0.0])
    """
    if weight.dim() != 2:
        raise ValueError(f"quantize_weight expects a 2-D weight, got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    if not torch.isfinite(w).all():
        raise ValueError(f"cannot quantize {name}: it holds inf or NaN")
    absmax = w.abs().amax(dim=1)
    ideal = absmax / 127
    scale = ideal.to(torch.float16)
    # rounding to nearest may round down, and then the row's extreme lands beyond 127 and clips:
    # step such scales up once to the next fp16 value (subnormals included)
    low = scale.float() < ideal
    scale = torch.where(low, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)
    if torch.isinf(scale).any():
        raise ValueError(f"cannot quantize {name}: rows {_rows(torch.isinf(scale))} are too large for an fp16 "
                         f"scale (absmax > 127 * 65504)")
    s = torch.where(scale > 0, scale.float(), 1.0)[:, None]
    # all-zero rows have scale 0; dividing them by 1 instead quantizes them to 0, not NaN
    q = torch.round(w / s).clamp_(-127, 127)
    levels = torch.round(absmax / s[:, 0])  # each row's largest |q|, from the row's extreme
    vanished = (levels == 0) & (absmax > 0)
    if vanished.any():
        raise ValueError(f"cannot quantize {name}: rows {_rows(vanished)} have absmax below {_FP16_STEP / 2:.3g} "
                         "and would all become 0 (an fp16 scale cannot be that small); zero those rows or "
                         "keep this layer in float (quantize_'s predicate)")
    few = (levels < _FEW_LEVELS) & (absmax > 0)
    if few.any():
        worst = float((scale.float() / (2 * absmax.clamp(min=1e-30)))[few].max())
        warnings.warn(f"{name}: rows {_rows(few)} are so small (absmax < {_FEW_LEVELS * _FP16_STEP:.3g}) that "
                      f"the fp16 scale leaves them fewer than {_FEW_LEVELS} int8 levels; relative error up to "
                      f"{worst:.2%} of the row's absmax (0.39% elsewhere)", stacklevel=2)
    return q.to(torch.int8), scale


class QuantizedLinear(nn.Module):
    """Drop-in for ``nn.Linear`` holding an int8 weight and one fp16 scale per output row.

    ``QuantizedLinear(linear)`` quantizes an ``nn.Linear`` (as BMInf 2.0 did), sharing its bias;
    ``QuantizedLinear(in_features, out_features, bias=True)`` makes an empty one to load into.
    ``y = x @ (weight * scale[:, None]).T + bias``, computed in ``x``'s dtype. The weight and
    scale are frozen parameters (so ``model.parameters()`` and ``.to()`` see them); gradients
    flow to the input, and to the bias if it requires them. The scale stays fp16 through
    ``.to(dtype)``, ``.half()``, ``.bfloat16()`` (device moves still move it).

    >>> layer = QuantizedLinear(nn.Linear(8, 4))
    >>> layer(torch.randn(2, 8)).shape
    torch.Size([2, 4])
    """

    def __init__(self, in_features, out_features: Optional[int] = None, bias: bool = True,
                 device=None, dtype: torch.dtype = torch.float32):
        super().__init__()
        linear = None
        if isinstance(in_features, nn.Linear):
            if out_features is not None:
                raise TypeError("QuantizedLinear(linear) takes no out_features: the linear gives the shape")
            linear, device = in_features, in_features.weight.device
            in_features, out_features, bias = linear.in_features, linear.out_features, False
        elif isinstance(in_features, bool) or not isinstance(in_features, int):
            raise TypeError("QuantizedLinear takes an nn.Linear, or in_features and out_features as ints; got "
                            f"{type(in_features).__name__} {in_features!r}")
        elif out_features is None:
            raise TypeError("QuantizedLinear(in_features, out_features) needs out_features (or pass an nn.Linear)")
        for arg, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise TypeError(f"{arg} must be a non-negative int, got {type(value).__name__} {value!r}")
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
        if linear is not None:
            if not linear.weight.is_meta:
                q, scale = quantize_weight(linear.weight)
                self.weight.data, self.scale.data = q, scale
            self.bias = linear.bias

    @classmethod
    def from_linear(cls, linear: nn.Linear, name: Optional[str] = None) -> "QuantizedLinear":
        """Quantize an ``nn.Linear``; the bias Parameter is shared, not copied. ``name`` (the
        layer's name in its model) is what warnings and errors about its rows call it."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear takes an nn.Linear, got {type(linear).__name__}")
        if name is None or linear.weight.is_meta:
            return cls(linear)
        layer = cls(linear.in_features, linear.out_features, bias=False, device=linear.weight.device)
        layer.weight.data, layer.scale.data = quantize_weight(linear.weight, f"{name}.weight")
        layer.bias = linear.bias
        return layer

    @classmethod
    def from_quantized(cls, weight: torch.Tensor, scale: torch.Tensor,
                       bias: Optional[torch.Tensor] = None) -> "QuantizedLinear":
        """Wrap a stored int8 weight ``(out, in)`` and scale ``(out,)`` (cast to fp16, which must hold it)."""
        if weight.dtype != torch.int8 or weight.dim() != 2:
            raise ValueError(f"weight must be a 2-D int8 tensor, got {weight.dtype} {tuple(weight.shape)}")
        if scale.shape != (weight.shape[0],):
            raise ValueError(f"scale must have shape ({weight.shape[0]},), got {tuple(scale.shape)}")
        if bias is not None and bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        layer = cls(weight.shape[1], weight.shape[0], bias=False, device=weight.device)
        layer.weight.data = weight
        layer.scale.data = _fp16_scale(scale)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return layer

    def _apply(self, fn, recurse: bool = True):
        # module.to(dtype)/.half()/.bfloat16() cast every float parameter; the scale must stay fp16
        # (its format), so it is re-made from the original values on whatever device fn chose
        before = self.scale.data
        super()._apply(fn, recurse)
        if self.scale.dtype != torch.float16:
            self.scale.data = before.to(device=self.scale.device, dtype=torch.float16)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Parameter.copy_ would truncate a float weight into int8 without a word
        weight, scale = state_dict.get(prefix + "weight"), state_dict.get(prefix + "scale")
        if weight is not None and weight.dtype != torch.int8:
            raise _float_into_int8(prefix + "weight", weight)
        if scale is not None and not scale.is_floating_point():
            raise ValueError(f"{prefix}scale: expected a float scale, got {scale.dtype}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

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
                setattr(module, child_name, QuantizedLinear.from_linear(child, full))
    if not getattr(model, "_bminf_int8_guard", False) and not isinstance(model, QuantizedLinear):
        model.register_load_state_dict_pre_hook(_refuse_float_into_int8)
        model._bminf_int8_guard = True
    return model


def _refuse_float_into_int8(module: nn.Module, state_dict, prefix: str, *args) -> None:
    """Before ``load_state_dict`` loads anything: refuse float weights for any int8 layer. (Each
    QuantizedLinear refuses its own too, but only when torch reaches it, after the modules before
    it have loaded.)"""
    for name, sub in module.named_modules():
        if isinstance(sub, QuantizedLinear):
            key = f"{prefix}{name}.weight" if name else f"{prefix}weight"
            weight = state_dict.get(key)
            if weight is not None and weight.dtype != torch.int8:
                raise _float_into_int8(key, weight, " (nothing was loaded)")


def _float_into_int8(key: str, weight: torch.Tensor, note: str = "") -> ValueError:
    return ValueError(f"{key}: a {weight.dtype} tensor cannot load into this int8 QuantizedLinear; quantize it "
                      f"first (quantize_weight gives weight and scale) or load into the float model and then "
                      f"quantize_{note}")


def _sibling(key: str, leaf: str) -> str:
    """``"a.b.weight" -> "a.b.scale"`` for leaf ``scale``; a bare ``"weight"`` gives ``"scale"``."""
    prefix = key.rpartition(".")[0]
    return f"{prefix}.{leaf}" if prefix else leaf


def _is_leaf(key: str, leaf: str) -> bool:
    return key == leaf or key.endswith("." + leaf)


def dequantize_state_dict(state: dict, dtype: torch.dtype = torch.float32) -> dict:
    """Turn every int8 ``<name>.weight`` + ``<name>.scale`` pair into one float ``<name>.weight``
    (a bare ``QuantizedLinear``'s ``weight`` + ``scale`` too).

    Other entries pass through, so the result loads into the unquantized model.

    >>> dequantize_state_dict(QuantizedLinear(nn.Linear(2, 2, bias=False)).state_dict()).keys()
    dict_keys(['weight'])
    """
    out = {}
    for key, value in state.items():
        if _is_leaf(key, "scale") and getattr(state.get(_sibling(key, "weight")), "dtype", None) == torch.int8:
            continue
        scale = state.get(_sibling(key, "scale")) if _is_leaf(key, "weight") else None
        if value.dtype == torch.int8 and scale is not None:
            value = (value.float() * scale.float()[:, None]).to(dtype)
        out[key] = value
    return out


def _fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` as fp16, refusing values fp16 cannot hold (they would give inf/NaN outputs or
    silently zero a row)."""
    if not scale.is_floating_point():
        raise ValueError(f"scale must be a float tensor, got {scale.dtype}")
    s = scale.detach()
    s16 = s.to(torch.float16)
    bad = ~torch.isfinite(s16) | (s < 0) | ((s16 == 0) & (s != 0))
    if bad.any():
        rows = bad.nonzero().flatten()[:8].tolist()
        raise ValueError(f"scale holds values an fp16 scale cannot represent (rows {rows}: "
                         f"{s[rows].tolist()}); scales must be finite, >= 0, and 0 or in "
                         f"[{_FP16_STEP:.3g}, 65504]")
    return s16
