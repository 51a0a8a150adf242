"""``bminf.wrapper``: fit an arbitrary PyTorch model into a GPU memory budget.

(The module is ``bminf.wrapping`` so that ``bminf.wrapper`` stays the function.)

It converts in place and returns the model:
  * ``nn.Linear`` -> ``QuantizedLinear`` (int8 weight, fp16 row scale), and HF's ``Conv1D``
    (GPT-2; weight stored (in, out)) -> ``QuantizedLinear`` of the transposed weight;
  * every ``nn.ModuleList`` of blocks of one type -> ``TransformerBlockList``, all lists sharing
    one budget; lists whose path names a decoder (a part starting with "dec": ``decoder.block``,
    ``dec_layers``) stay resident first, since decode runs once per token;
  * every other parameter and buffer -> the device.

What it cannot convert it leaves as it was (resident, unquantized) and reports in one warning
(or raises, with ``strict=True``), naming each module path: ModuleLists of mixed types or of
ModuleLists, Linears whose weight is tied to another module, Linear subclasses whose owner reads
the weight directly (e.g. ``nn.MultiheadAttention.out_proj``), blocks sharing weights.
"""
import functools
import itertools
import re
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .kernels import compile_ahead
from .offload import DeviceSpec, TransformerBlockList, place_block_lists
from .offload.place import Size, parse_reserve, parse_slots, resolve_devices
from .quantization import QuantizedLinear, quantize_weight
from .units import parse_dtype

__all__ = ["wrapper", "WrapperWarning"]

_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)


class WrapperWarning(UserWarning):
    """What ``bminf.wrapper`` left unconverted, and why."""


def _is_conv1d(m: nn.Module) -> bool:
    # HF's transformers.pytorch_utils.Conv1D, recognised without importing transformers
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None \
        and m.weight.dim() == 2 and m.weight.shape[1] == m.nf


def _quantize_conv1d(m: nn.Module) -> QuantizedLinear:
    q, scale = quantize_weight(m.weight.detach().t())   # (in, out) -> (out, in)
    layer = QuantizedLinear.from_quantized(q, scale)
    layer.bias = m.bias                                  # shared, as from_linear shares it
    layer.nf, layer.nx = m.nf, m.weight.shape[0]         # what code inspecting a Conv1D reads
    return layer


def _tied(model: nn.Module) -> Dict[int, List[str]]:
    """id(parameter) -> every path it is registered under."""
    paths: Dict[int, List[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        for pn, p in mod._parameters.items():
            if p is not None:
                paths.setdefault(id(p), []).append(f"{name}.{pn}" if name else pn)
    return {k: v for k, v in paths.items() if len(v) > 1}


def _quantize(model: nn.Module, report: List[str], undo: List[Callable[[], None]]) -> int:
    # a module registered twice has its weight under two paths, so it is reported as tied below
    tied = _tied(model)
    count = 0
    for name, parent in list(model.named_modules(remove_duplicate=False)):
        for child_name, child in list(parent.named_children()):
            path = f"{name}.{child_name}" if name else child_name
            is_linear, is_conv = type(child) is nn.Linear, _is_conv1d(child)
            if not (is_linear or is_conv):
                if isinstance(child, nn.Linear):
                    report.append(f"{path}: {type(child).__name__} (a Linear subclass) left unquantized: "
                                  f"its owner may read the weight directly")
                continue
            if not child.weight.is_floating_point():
                continue
            if id(child.weight) in tied:
                others = [p for p in tied[id(child.weight)] if p != f"{path}.weight"]
                report.append(f"{path}: weight tied to {', '.join(others)}; left unquantized")
                continue
            try:
                new = QuantizedLinear.from_linear(child) if is_linear else _quantize_conv1d(child)
            except ValueError as e:  # inf/NaN weights, rows too large for an fp16 scale
                raise ValueError(f"{path}: cannot quantize this {type(child).__name__}: {e}") from e
            setattr(parent, child_name, new)
            undo.append(functools.partial(setattr, parent, child_name, child))
            count += 1
    return count


def _find_lists(module: nn.Module, prefix: str, report: List[str]) -> List[Tuple[str, nn.Module, str, nn.ModuleList]]:
    """(path, parent, attribute, list) for each convertible ModuleList, outermost first."""
    found = []
    for name, child in module.named_children():
        path = f"{prefix}.{name}" if prefix else name
        if isinstance(child, TransformerBlockList):
            continue
        if type(child) is nn.ModuleList and len(child) > 0:
            kinds = {type(b) for b in child}
            if any(isinstance(b, _CONTAINERS) for b in child):
                report.append(f"{path}: ModuleList of containers (nested ModuleList) is not a block list; "
                              f"left resident")
            elif len(kinds) > 1:
                report.append(f"{path}: ModuleList of mixed types ({', '.join(sorted(k.__name__ for k in kinds))}) "
                              f"is not a block list; left resident")
            elif sum(p.numel() for p in child.parameters()) > 0:
                found.append((path, module, name, child))
                continue  # lists inside its blocks are part of the blocks
        found.extend(_find_lists(child, path, report))
    return found


def _shared_between_blocks(lst: nn.ModuleList) -> Optional[Tuple[int, int]]:
    """The first two blocks of ``lst`` that hold the same tensor (ALBERT-style sharing), if any."""
    owner: Dict[int, int] = {}
    for i, block in enumerate(lst):
        for t in itertools.chain(block.parameters(), block.buffers()):
            if owner.setdefault(id(t), i) != i:
                return owner[id(t)], i
    return None


def _is_decoder(path: str) -> bool:
    """``decoder.block``, ``model.decoder.layers``, ``dec_layers``: a name part starting with "dec"."""
    return any(part.lower().startswith("dec") for part in re.split(r"[._]", path))


def _move_rest(model: nn.Module, device: torch.device, skip: set, undo: List[Callable[[], None]]) -> None:
    """Move every parameter and buffer outside the block lists, keeping tensor identity (ties)."""
    def visit(mod: nn.Module):
        if id(mod) in skip:
            return
        for t in list(mod._parameters.values()) + list(mod._buffers.values()):
            if t is not None and t.device != device:
                undo.append(functools.partial(setattr, t, "data", t.data))
                t.data = t.data.to(device)
        for child in mod.children():
            visit(child)
    visit(model)


def _check_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def _check_not_wrapped(model: nn.Module) -> None:
    placed = [(path or type(model).__name__, m) for path, m in model.named_modules()
              if isinstance(m, TransformerBlockList) and m._weights]
    if placed:
        path, lst = placed[0]
        raise ValueError(f"model is already wrapped: {path} is a TransformerBlockList placed on {lst._home}; "
                         "bminf.wrapper converts a model once (call it on the original model)")


def _cast(model: nn.Module, dtype: torch.dtype, undo: List[Callable[[], None]]) -> None:
    """Cast every float parameter and buffer in place, keeping tensor identity (ties)."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.is_floating_point() and t.dtype != dtype:
            undo.append(functools.partial(setattr, t, "data", t.data))
            t.data = t.data.to(dtype)


def wrapper(model: nn.Module, quantization: bool = True, memory_limit: Size = None, *,
            device: DeviceSpec = None, reserve: Size = None, slots: int = 2, dtype=None,
            strict: bool = False) -> nn.Module:
    """Convert ``model`` in place to run within ``memory_limit`` per device; returns it.

    ``memory_limit`` (bytes, or a string such as ``"6GiB"``/``"6GB"``) covers everything allocated
    on the device (non-block weights, resident blocks, streaming slots, activations and KV cache):
    ``reserve`` bytes are kept for the last two (see ``bminf.offload.plan.default_reserve`` for the
    default). ``device`` may list several devices to split the blocks across. ``dtype`` ("fp16",
    ``torch.float16``, ...) casts the float weights first; otherwise cast the model to its run dtype
    before wrapping.

    Every argument is checked before anything changes, and a call that fails part-way (a block
    another library hooked, a weight that cannot be quantized, pinned memory running out) puts the
    model back exactly as it was, so it can be wrapped again. A model is wrapped once.

    >>> net = nn.Sequential(nn.Linear(8, 8), nn.ModuleList([nn.Linear(8, 8) for _ in range(3)]))
    >>> net = wrapper(net, device="cpu", memory_limit="1GiB")
    >>> type(net[0]).__name__, type(net[1]).__name__, len(net[1])
    ('QuantizedLinear', 'TransformerBlockList', 3)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__} {model!r:.60}")
    _check_bool(quantization, "quantization")
    _check_bool(strict, "strict")
    devices = resolve_devices(device, memory_limit)
    reserve, slots = parse_reserve(reserve), parse_slots(slots)
    dtype = None if dtype is None else parse_dtype(dtype)
    _check_not_wrapped(model)
    compile_ahead.set_up_in_background(devices[0][0])  # Triton's own setup, while the model converts

    report: List[str] = []
    undo: List[Callable[[], None]] = []  # how to put the model back if a later step fails
    message = ""
    try:
        _convert(model, quantization, devices, reserve, slots, dtype, report, undo)
        if report:
            message = "bminf.wrapper left some modules unconverted:\n  " + "\n  ".join(report)
            if strict:  # an error like any other: the model goes back to what it was
                raise ValueError(message + "\n(strict=True: the model was left as it was)")
    except BaseException as e:
        for step in reversed(undo):
            step()
        if isinstance(e, ValueError) and not str(e).startswith("bminf.wrapper"):
            raise ValueError(f"bminf.wrapper: {e} (the model was left as it was)") from e
        raise
    if message:
        warnings.warn(message, WrapperWarning, stacklevel=2)
    return model


def _convert(model: nn.Module, quantization: bool, devices, reserve: Optional[int], slots: int,
             dtype: Optional[torch.dtype], report: List[str], undo: List[Callable[[], None]]) -> None:
    """The conversion itself; each change appends how to revert it to ``undo``."""
    lists = _find_lists(model, "", report)
    # a block another library hooked (an instance-level forward) cannot be offloaded: say which, first
    for path, _, _, lst in lists:
        for i, block in enumerate(lst):
            if "forward" in block.__dict__:
                raise ValueError(f"{path}.{i} already has an instance-level forward (another library's hook?); "
                                 "wrap the model before adding such hooks, or remove them first")
    if dtype is not None:
        _cast(model, dtype, undo)
    if quantization and _quantize(model, report, undo) == 0:
        report.append("quantization=True but no nn.Linear (or Conv1D) was found to quantize")
    # blocks must not share tensors with the rest of the model: such lists stay resident
    outside = {}
    skip = {id(lst) for _, _, _, lst in lists}

    def collect(mod: nn.Module, path: str):
        if id(mod) in skip:
            return
        for t in list(mod._parameters.values()) + list(mod._buffers.values()):
            if t is not None:
                outside[id(t)] = path
        for n, c in mod.named_children():
            collect(c, f"{path}.{n}" if path else n)
    collect(model, "")
    kept = []
    for path, parent, name, lst in lists:
        shared = [outside[id(t)] for t in list(lst.parameters()) + list(lst.buffers()) if id(t) in outside]
        between = _shared_between_blocks(lst)
        if shared:
            report.append(f"{path}: blocks share weights with {shared[0]}; left resident")
            skip.discard(id(lst))
        elif between:
            report.append(f"{path}: blocks {between[0]} and {between[1]} share weights; left resident")
            skip.discard(id(lst))
        else:
            kept.append((path, parent, name, lst))

    _move_rest(model, devices[0][0], skip, undo)
    converted = []
    for path, parent, name, lst in kept:
        tbl = TransformerBlockList(list(lst), place=False)
        setattr(parent, name, tbl)
        undo.append(functools.partial(setattr, parent, name, lst))
        converted.append((path, tbl))
    if converted:
        priorities = [1 if _is_decoder(path) else 0 for path, _ in converted]
        tables = [t for _, t in converted]
        saved = [(t, t.data, t.requires_grad)
                 for tbl in tables for t in itertools.chain(tbl.parameters(), tbl.buffers())]
        place_block_lists(tables, devices, reserve=reserve, slots=slots, priorities=priorities)
        undo.append(functools.partial(_unplace, tables, saved))


def _unplace(tables: List[TransformerBlockList], saved) -> None:
    """Undo a placement that succeeded (a later step failed): tensors back where they were."""
    for tbl in tables:
        tbl._unplace()
    for t, data, requires_grad in saved:
        t.data = data
        t.requires_grad_(requires_grad)
