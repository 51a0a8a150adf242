"""Rewrite a checkpoint in another format (``python -m bminf convert SRC DST`` calls ``convert``).

>>> from bminf.checkpoint.convert import convert
>>> result = convert("~/.cache/bigmodels/cpm1-new", "out/cpm1")               # doctest: +SKIP
>>> result.format, result.path                                                 # doctest: +SKIP
('safetensors', 'out/cpm1')
"""
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from . import BMINF_FILE, FORMATS, bminf_format, describe, detect_format, load_model, save_model
from .common import ARCHITECTURES, cast_floats_, is_quantized, state_summary
from ..quantization import quantize_

__all__ = ["convert", "Converted", "read_config", "output_path"]


@dataclass
class Converted:
    """What ``convert`` did: where it wrote, from and to which format, and notes on lossy steps."""
    path: str
    src_format: str
    format: str
    description: str
    notes: List[str] = field(default_factory=list)


def read_config(path: str, src: Optional[str] = None):
    """A ``GPTConfig`` or ``T5Config`` from a JSON object of its fields (``--config config.json``).

    The architecture is the optional ``"architecture"`` field ("gpt"/"t5"), else the one whose
    fields the keys name, else that of the BMInf checkpoint ``src``.

    >>> read_config("tiny-gpt.json")        # doctest: +SKIP
    GPTConfig(vocab_size=97, max_positions=64, d_model=32, d_ff=64, n_heads=4, d_head=8, n_layers=3, eps=1e-05)
    """
    path = os.path.expanduser(os.fspath(path))
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {path} does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"config file {path} is not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"config file {path} must hold a JSON object of config fields, got {type(doc).__name__}")
    doc = dict(doc)
    fields = {arch: {f.name for f in dataclasses.fields(cls)} for arch, (_, cls, _) in ARCHITECTURES.items()}
    arch = doc.pop("architecture", None)
    if arch is None:
        fits = [a for a, names in fields.items() if set(doc) <= names]
        if len(fits) == 1:
            arch = fits[0]
        elif fits and src is not None and detect_format(src)[0] == "bminf":  # only fields both have
            target = detect_format(src)[1]
            arch = bminf_format.infer_config(bminf_format.read_index(target), target)[0]
    if arch not in fields:
        known = " or ".join(f"{a} ({', '.join(sorted(n))})" for a, n in fields.items())
        unknown = [k for k in doc if not any(k in n for n in fields.values())]
        what = f"unknown field {unknown[0]!r}" if unknown else f"architecture {arch!r} is not known"
        raise ValueError(f"config file {path}: {what}; the fields are those of {known}")
    unknown = sorted(set(doc) - fields[arch])
    if unknown:
        raise ValueError(f"config file {path}: unknown field {unknown[0]!r} for {arch}; its fields are "
                         f"{', '.join(sorted(fields[arch]))}")
    return ARCHITECTURES[arch][1](**doc)


def output_path(dst: str, to: str) -> str:
    """The file or directory ``convert`` writes for ``dst`` in format ``to``."""
    dst = os.path.expanduser(os.fspath(dst))
    return dst if to != "bminf" or dst.endswith(".pt") else os.path.join(dst, BMINF_FILE)


def _check_destination(src: str, dst: str, to: str, force: bool) -> None:
    """Refuse to write over anything unless ``force``, and over the source always; before any work."""
    out = output_path(dst, to)
    _, src_file = detect_format(src)
    src_paths = {os.path.realpath(src_file), os.path.realpath(os.path.dirname(src_file)),
                 os.path.realpath(os.path.expanduser(os.fspath(src)))}
    if os.path.realpath(out) in src_paths or os.path.realpath(os.path.expanduser(os.fspath(dst))) in src_paths:
        raise ValueError(f"destination {dst} is the source; write the conversion somewhere else")
    taken = os.path.isfile(out) if to == "bminf" else (
        os.path.isfile(out) or (os.path.isdir(out) and bool(os.listdir(out))))
    if taken and not force:
        raise ValueError(f"destination {out} already exists; pass --force (force=True) to overwrite it")


def convert(src: str, dst: str, *, to: Optional[str] = None, preset: Optional[str] = None, quantize: bool = True,
            dtype: Optional[torch.dtype] = None, config=None, force: bool = False) -> Converted:
    """Load ``src`` (any format) and save it at ``dst`` as ``to`` (default: bminf if ``dst`` ends in .pt,
    else safetensors). ``quantize=False`` keeps (or makes) the linears float; ``dtype`` is the float dtype
    of the output (HF: float32 unless given; bminf: float16 only). ``config`` (a ``GPTConfig``/``T5Config``)
    describes a BMInf file of a size no preset has. An existing destination is refused unless ``force``.

    >>> convert("CPM-Generate", "out/cpm1-new/checkpoint.pt").notes   # doctest: +SKIP
    ['quantized the float linears to int8 (per-row absmax) while loading; --no-quantize keeps them float']
    """
    to = to or ("bminf" if str(dst).endswith(".pt") else "safetensors")
    if to not in FORMATS:
        raise ValueError(f"to={to!r} is not a format; use one of {', '.join(FORMATS)}")
    if to == "bminf" and not quantize:
        raise ValueError("BMInf's format stores int8 linears; --no-quantize cannot be honoured with --to bminf")
    if to == "bminf" and dtype not in (None, torch.float16):
        raise ValueError("BMInf 1.x stores float tensors as float16; --dtype float32 is not possible with --to bminf")
    _check_destination(src, dst, to, force)
    src_format, _ = detect_format(src)
    notes = []
    # dequantize straight into the output dtype: through float16 first would round the weights twice
    load_dtype = None if quantize else (dtype or torch.float32) if to == "hf" else dtype
    model = load_model(src, preset=preset, quantize=None if quantize else False, dtype=load_dtype, config=config)
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
