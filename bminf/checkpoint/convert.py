"""Rewrite a checkpoint in another format (``python -m bminf convert SRC DST`` calls ``convert``).

>>> from bminf.checkpoint.convert import convert
>>> result = convert("~/.cache/bigmodels/cpm1-new", "out/cpm1")               # doctest: +SKIP
>>> result.format, result.path                                                 # doctest: +SKIP
('safetensors', 'out/cpm1')
"""
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from . import describe, detect_format, load_model, save_model
from .common import cast_floats_, is_quantized, state_summary
from ..quantization import quantize_

__all__ = ["convert", "Converted"]


@dataclass
class Converted:
    """What ``convert`` did: where it wrote, from and to which format, and notes on lossy steps."""
    path: str
    src_format: str
    format: str
    description: str
    notes: List[str] = field(default_factory=list)


def convert(src: str, dst: str, *, to: Optional[str] = None, preset: Optional[str] = None, quantize: bool = True,
            dtype: Optional[torch.dtype] = None) -> Converted:
    """Load ``src`` (any format) and save it at ``dst`` as ``to`` (default: bminf if ``dst`` ends in .pt,
    else safetensors). ``quantize=False`` keeps (or makes) the linears float; ``dtype`` is the float dtype
    of the output (HF: float32 unless given; bminf: float16 only).

    >>> convert("CPM-Generate", "out/cpm1-new/checkpoint.pt").notes   # doctest: +SKIP
    ['quantized the float linears to int8 (per-row absmax) while loading; --no-quantize keeps them float']
    """
    to = to or ("bminf" if str(dst).endswith(".pt") else "safetensors")
    if to == "bminf" and not quantize:
        raise ValueError("BMInf's format stores int8 linears; --no-quantize cannot be honoured with --to bminf")
    if to == "bminf" and dtype not in (None, torch.float16):
        raise ValueError("BMInf 1.x stores float tensors as float16; --dtype float32 is not possible with --to bminf")
    src_format, _ = detect_format(src)
    notes = []
    model = load_model(src, preset=preset, quantize=None if quantize else False)
    if src_format == "hf" and quantize:
        notes.append("quantized the float linears to int8 (per-row absmax) while loading; "
                     "--no-quantize keeps them float")
    if src_format != "hf" and not quantize:
        notes.append("int8 linears, if any, were dequantized (weight x scale); the float weights they were "
                     "quantized from are not recoverable")

    if to == "bminf":
        if is_quantized(model) is not True:
            quantize_(model)
            notes.append("quantized the float linears to int8: BMInf's format stores int8 linears")
        floats = {t.dtype for n, t in model.state_dict().items() if t.is_floating_point() and not n.endswith(".scale")}
        if floats - {torch.float16}:
            notes.append("cast float tensors to float16, as BMInf 1.x stores them")
        cast_floats_(model, torch.float16)
        written = save_model(model, dst, format="bminf")
    elif to == "hf":
        dtype = dtype or torch.float32
        if is_quantized(model) is not False:
            notes.append(f"wrote the int8 linears dequantized to {str(dtype)[6:]}: loadable by transformers, but "
                         "lossy relative to the original float model (int8 rounding is not undone)")
        written = save_model(model, dst, format="hf", dtype=dtype)
    else:
        if dtype is not None:
            cast_floats_(model, dtype)
        written = save_model(model, dst, format="safetensors")
    return Converted(str(written), src_format, to, f"{describe(model)}, {state_summary(model.state_dict())}", notes)
