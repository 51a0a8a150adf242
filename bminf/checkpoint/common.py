"""What the checkpoint formats share: the error type, architectures and presets, building a model
without spending memory (meta device), and the strict name/shape/dtype check that fills it.

Every loader takes the same three steps, so each tensor is read once, straight into place:

>>> model = build_model("gpt", GPTConfig(**GPT_PRESETS["cpm1"]), quantize=True)   # meta: no memory
>>> found = {"token_embedding.weight": ((30000, 2560), torch.float16), ...}      # doctest: +SKIP
>>> dest = materialize_(model, found, "cpm1-new/checkpoint.pt")  # doctest: +SKIP  (check, then allocate)
>>> reader.read_into(dest["token_embedding.weight"])             # doctest: +SKIP  (the format's own step)
"""
import dataclasses
import os
import uuid
from typing import Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn

from ..models.gpt import GPT, GPT_PRESETS, GPTConfig
from ..models.t5 import T5, T5_PRESETS, T5Config
from ..quantization import QuantizedLinear, quantize_

Shape = Tuple[int, ...]
Found = Dict[str, Tuple[Shape, torch.dtype]]

ARCHITECTURES = {"gpt": (GPT, GPTConfig, GPT_PRESETS), "t5": (T5, T5Config, T5_PRESETS)}
# BMInf 1.x's version names (download directories) for the same presets
PRESET_ALIASES = {"cpm1-new": "cpm1", "cpm2.1-new": "cpm2", "eva-int8-new": "eva"}
PRESET_NAMES = sorted(set(GPT_PRESETS) | set(T5_PRESETS))
INT8_SCHEME = "int8-rowwise-absmax"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as asked: the message names the file and what is wrong."""


def preset_config(name: str) -> Tuple[str, object]:
    """``(architecture, config)`` of a preset, e.g. ``preset_config("cpm2") -> ("t5", T5Config(...))``."""
    key = PRESET_ALIASES.get(name, name)
    for arch, (_, config_cls, presets) in ARCHITECTURES.items():
        if key in presets:
            return arch, config_cls(**presets[key])
    raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESET_NAMES + sorted(PRESET_ALIASES))}")


def architecture_of(model: nn.Module) -> str:
    for arch, (model_cls, _, _) in ARCHITECTURES.items():
        if isinstance(model, model_cls):
            return arch
    raise TypeError(f"expected a bminf GPT or T5 model, got {type(model).__name__}")


# config fields added after format_version 1 files were first written: their absence means the default
ADDED_FIELDS = {"t5": {"max_length"}, "gpt": set()}


def config_from_dict(arch: str, fields: dict, path: str):
    """The config dataclass of ``arch`` from ``fields``; unknown, missing or invalid fields are errors
    naming ``path``."""
    config_cls = ARCHITECTURES[arch][1]
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown, missing = sorted(set(fields) - names), sorted(names - set(fields) - ADDED_FIELDS[arch])
    if unknown or missing:
        raise CheckpointError(f"{path}: {arch} config has unknown fields {unknown} and lacks {missing}")
    try:
        return config_cls(**fields)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid {arch} config: {e}") from None


def check_config(config, expected, path: str, what: str) -> None:
    """Raise naming every field where ``config`` differs from ``expected`` (another config or a dict)."""
    expected = expected if isinstance(expected, dict) else dataclasses.asdict(expected)
    diff = [f"{k}: {what} has {v!r}, checkpoint has {getattr(config, k)!r}"
            for k, v in expected.items() if getattr(config, k) != v]
    if diff:
        raise CheckpointError(f"{path}: config differs from the {what}: " + "; ".join(diff))


def check_preset(arch: str, config, preset: str, path: str) -> None:
    """Raise unless ``preset`` is of architecture ``arch`` and equals ``config`` field by field."""
    preset_arch, preset_cfg = preset_config(preset)
    if preset_arch != arch:
        raise CheckpointError(f"{path}: holds a {arch} model, but preset {preset!r} is {preset_arch}")
    check_config(config, preset_cfg, path, f"preset {preset!r}")


def resolve_config(arch: str, inferred: dict, path: str, preset: Optional[str] = None, config=None):
    """Complete the fields a checkpoint's shapes tell (``inferred``) from ``config``, a preset, or
    the one preset of ``arch`` they match; any disagreement is an error naming the field."""
    if config is not None or preset is not None:
        if config is not None:
            what = "given config"
            if not isinstance(config, ARCHITECTURES[arch][1]):
                raise CheckpointError(f"{path}: holds a {arch} model, but a {type(config).__name__} was given")
        else:
            what = f"preset {preset!r}"
            preset_arch, config = preset_config(preset)
            if preset_arch != arch:
                raise CheckpointError(f"{path}: holds a {arch} model, but preset {preset!r} is {preset_arch}")
        diff = [f"{k}: {what} has {getattr(config, k)!r}, checkpoint has {v!r}"
                for k, v in inferred.items() if getattr(config, k) != v]
        if diff:
            raise CheckpointError(f"{path}: does not match the {what}: " + "; ".join(diff))
        return config
    config_cls, presets = ARCHITECTURES[arch][1:]
    matches = [name for name, kw in presets.items() if all(kw.get(k) == v for k, v in inferred.items())]
    if len(matches) != 1:
        raise CheckpointError(f"{path}: no single preset matches the checkpoint's shapes {inferred}; "
                              "pass preset= (--preset), or config= for other sizes")
    return config_cls(**presets[matches[0]])


def build_model(arch: str, config, quantize: Union[bool, Callable[[str, nn.Linear], bool]] = False) -> nn.Module:
    """Build ``arch`` on the meta device (no memory, no init) and swap in ``QuantizedLinear``s:
    all of them for ``quantize=True``, those ``quantize(name, linear)`` accepts for a callable."""
    with torch.device("meta"):
        model = ARCHITECTURES[arch][0](config)
    if quantize:
        quantize_(model, None if quantize is True else quantize)
    return model


def _owner(model: nn.Module, name: str) -> Tuple[nn.Module, str]:
    prefix, _, leaf = name.rpartition(".")
    return (model.get_submodule(prefix) if prefix else model), leaf


def _names(items, limit: int = 8) -> str:
    items = sorted(items)
    return ", ".join(items[:limit]) + (f" ... ({len(items)} in all)" if len(items) > limit else "")


def materialize_(model: nn.Module, found: Found, path: str) -> Dict[str, torch.Tensor]:
    """Check ``found`` (name -> (shape, dtype) of a checkpoint) against ``model``'s state dict, then
    return each destination tensor, name -> tensor, for the loader to fill.

    Strict: missing, unexpected, mis-shaped and mis-typed entries are all named in one error. An int8
    tensor must meet an int8 one; float tensors may differ in width. Tensors still on the meta device
    are allocated on the CPU with the checkpoint's dtype (so nothing is cast, or held twice); tensors
    already allocated stay where they are, and the loader casts into them.
    """
    expected = dict(model.named_parameters(remove_duplicate=False))
    expected.update(model.named_buffers(remove_duplicate=False))
    missing = set(expected) - set(found)
    unexpected = set(found) - set(expected)
    problems = []
    for name in sorted(set(expected) & set(found)):
        shape, dtype = found[name]
        have = expected[name]
        if tuple(have.shape) != tuple(shape):
            problems.append(f"{name} has shape {tuple(shape)} in the checkpoint, {tuple(have.shape)} in the model")
        elif (have.dtype == torch.int8) != (dtype == torch.int8) or not (dtype.is_floating_point or dtype == torch.int8):
            problems.append(f"{name} is {dtype} in the checkpoint, {have.dtype} in the model")
    if missing or unexpected or problems:
        parts = ([f"missing: {_names(missing)}"] if missing else []) + \
                ([f"unexpected: {_names(unexpected)}"] if unexpected else []) + problems[:8]
        if len(problems) > 8:
            parts.append(f"... {len(problems)} mis-shaped or mis-typed in all")
        raise CheckpointError(f"{path}: does not fit the {type(model).__name__} model: " + "; ".join(parts))

    dest = {}
    for name, tensor in expected.items():
        if tensor.is_meta:
            owner, leaf = _owner(model, name)
            new = torch.empty(tuple(found[name][0]), dtype=found[name][1])
            if leaf in owner._parameters:
                new = nn.Parameter(new, requires_grad=tensor.requires_grad and new.is_floating_point())
                owner._parameters[leaf] = new
            else:
                owner._buffers[leaf] = new
            tensor = new
        dest[name] = tensor
    return dest


def copy_into(dest: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        dest.copy_(value)


def is_quantized(model: nn.Module) -> Optional[bool]:
    """True if every linear is int8, False if none is, None if mixed."""
    kinds = {isinstance(m, QuantizedLinear) for m in model.modules() if isinstance(m, (nn.Linear, QuantizedLinear))}
    return None if len(kinds) > 1 else kinds == {True}


def float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first float tensor that is not a quantization scale."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not name.endswith(".scale"):
            return p.dtype
    return torch.float32


def cast_floats_(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast float parameters and buffers to ``dtype``; int8 weights and fp16 scales stay as they are."""
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for leaf, t in store.items():
                if t is None or not t.is_floating_point() or t.dtype == dtype:
                    continue
                if isinstance(module, QuantizedLinear) and leaf == "scale":
                    continue
                t.data = t.data.to(dtype)
    return model


def dequantize_(model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Swap every ``QuantizedLinear`` back for an ``nn.Linear`` holding ``weight * scale`` in
    ``dtype`` (default: the model's float dtype; float32 makes the swap exact)."""
    dtype = dtype or float_dtype(model)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, QuantizedLinear):
                linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                   device="meta")
                linear.weight = nn.Parameter(child.dequantize(dtype))
                if child.bias is not None:
                    linear.bias = nn.Parameter(child.bias.detach().to(dtype))
                setattr(module, child_name, linear)
    return model


def state_summary(state: Dict[str, torch.Tensor]) -> str:
    """``"123 tensors, 45.6 MB"`` for one-line reports."""
    total = sum(t.numel() * t.element_size() for t in state.values())
    return f"{len(state)} tensors, {total / 1e6:.1f} MB"


def write_atomic(path: str, write) -> None:
    """``write(tmp_path)``, then rename over ``path``: readers see the old file or the new one.

    The temporary name is fresh and left for ``write`` to create, so the file gets the usual
    permissions (``mkstemp`` would make it private to the owner).
    """
    directory, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{base}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
