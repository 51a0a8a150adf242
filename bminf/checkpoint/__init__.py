"""Checkpoints in three formats, one entry point each way.

- ``bminf``: BMInf 1.x's binary ``checkpoint.pt`` tree (cpm1-new, cpm2.1-new, eva-int8-new), int8;
- ``safetensors``: ours, a directory with ``model.safetensors`` + ``config.json``;
- ``hf``: HuggingFace-format CPM-1 (``GPT2LMHeadModel``, as published for CPM-Generate).

Every reader is strict (missing, unexpected, mis-shaped tensors are named) and reads each tensor
straight into a model built on the meta device, so loading needs about the checkpoint's size in RAM.

>>> from bminf.checkpoint import load_model, save_model
>>> model = load_model("~/.cache/bigmodels/cpm2.1-new")           # doctest: +SKIP
>>> save_model(model, "out/cpm2-int8", format="safetensors")      # doctest: +SKIP
"""
import json
import os
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn

from . import bminf_format
from .common import (CheckpointError, architecture_of, cast_floats_, check_preset, dequantize_, float_dtype,
                     is_quantized)
from .hf import is_hf_dir, load_hf_gpt, save_hf_gpt
from .safetensors_format import CONFIG_NAME, WEIGHTS_NAME, load_pretrained, save_pretrained
from ..quantization import quantize_
from ..units import parse_dtype

__all__ = ["load_model", "save_model", "detect_format", "CheckpointError", "FORMATS", "load_pretrained",
           "save_pretrained", "load_hf_gpt", "save_hf_gpt", "bminf_format"]

FORMATS = ("bminf", "safetensors", "hf")
BMINF_FILE = "checkpoint.pt"


def _our_config(directory: str) -> Optional[bool]:
    """True if ``config.json`` is ours, False if it is someone else's, None if absent or unreadable."""
    try:
        with open(os.path.join(directory, CONFIG_NAME), encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return isinstance(doc, dict) and doc.get("format") == "bminf"


def detect_format(path: Union[str, os.PathLike]) -> Tuple[str, str]:
    """``(format, path to load)`` for a checkpoint file or directory.

    A directory is ours if its ``config.json`` says ``"format": "bminf"``, HF if that file has a
    ``model_type``, BMInf's if it holds ``checkpoint.pt``, and ours (weights only, needs a preset)
    if it holds just ``model.safetensors``. A file ``*.bin``/``*.safetensors`` goes by its directory;
    any other file is read as BMInf's tree (which says clearly if it is not one).

    >>> detect_format("~/.cache/bigmodels/cpm1-new")              # doctest: +SKIP
    ('bminf', '/home/me/.cache/bigmodels/cpm1-new/checkpoint.pt')
    """
    path = os.path.expanduser(os.fspath(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}: it does not exist")
    if os.path.isfile(path):
        directory = os.path.dirname(os.path.abspath(path))
        if path.endswith(".bin") or (path.endswith(".safetensors") and is_hf_dir(directory)):
            return "hf", path
        if os.path.basename(path) == WEIGHTS_NAME:
            return "safetensors", directory
        if path.endswith(".safetensors"):
            raise ValueError(f"{path}: our format is a directory holding {WEIGHTS_NAME} and {CONFIG_NAME}; "
                             "pass the directory")
        return "bminf", path
    ours = _our_config(path)
    if ours:
        return "safetensors", path
    if is_hf_dir(path):
        return "hf", path
    if os.path.isfile(os.path.join(path, BMINF_FILE)):
        return "bminf", os.path.join(path, BMINF_FILE)
    if os.path.isfile(os.path.join(path, WEIGHTS_NAME)):
        return "safetensors", path  # a config.json we cannot read is reported by the loader
    raise ValueError(f"{path}: no checkpoint found; looked for {BMINF_FILE} (BMInf), {WEIGHTS_NAME} + "
                     f"{CONFIG_NAME} with \"format\": \"bminf\" (ours), and {CONFIG_NAME} with a model_type + "
                     "pytorch_model.bin or model.safetensors (HF CPM-1)")


def load_model(path: Union[str, os.PathLike], preset: Optional[str] = None, quantize: Optional[bool] = None,
               dtype: Optional[torch.dtype] = None, config=None) -> nn.Module:
    """Load a GPT (CPM-1) or T5 (CPM-2, EVA) from any supported checkpoint, detecting the format.

    ``preset`` (``cpm1``/``cpm2``/``eva`` or ``cpm1-new``/...) supplies what a BMInf file or a bare
    ``model.safetensors`` cannot tell, and is checked against what the checkpoint does tell;
    ``config`` (a ``GPTConfig``/``T5Config``) does the same for BMInf files of other sizes.
    ``quantize``: None keeps the checkpoint's linears (HF ones are quantized, as the models run
    int8), True makes them int8, False float. ``dtype`` (a ``torch.dtype`` or a name such as
    ``"float16"``, ``"bf16"``) casts float tensors afterwards (e.g. ``torch.float32`` on a CPU);
    int8 weights and fp16 scales stay.

    >>> model = load_model("CPM-Generate", quantize=False, dtype=torch.float32)   # doctest: +SKIP
    """
    if dtype is not None:
        dtype = parse_dtype(dtype)
    if quantize not in (None, True, False):
        raise TypeError(f"quantize must be None, True or False, got {type(quantize).__name__} {quantize!r}")
    fmt, target = detect_format(path)
    if config is not None and fmt != "bminf":
        raise ValueError(f"{target}: config= is for BMInf files, which carry none; this is {fmt}")
    if fmt == "bminf":
        model = bminf_format.load(target, preset, config)
    elif fmt == "safetensors":
        model = load_pretrained(target, preset)
    else:
        model = load_hf_gpt(target, quantize=quantize is not False)
        if preset is not None:
            check_preset("gpt", model.config, preset, target)
    if quantize is True and is_quantized(model) is not True:
        quantize_(model)
    elif quantize is False and is_quantized(model) is not False:
        dequantize_(model, dtype)
    if dtype is not None:
        cast_floats_(model, dtype)
    return model.eval()


def save_model(model: nn.Module, path: Union[str, os.PathLike], format: str = "safetensors", **kwargs) -> str:
    """Write ``model`` as ``format`` and return the path written.

    ``bminf``: ``path`` ending in ``.pt`` is the file, otherwise the directory for ``checkpoint.pt``;
    the linears must be int8 (``quantize_``). ``safetensors``: a directory. ``hf``: a directory,
    GPT only; ``dtype=`` (a ``torch.dtype`` or its name) picks the dequantized weights' dtype
    (float32, exact, by default).

    >>> save_model(model, "out/cpm1-new", format="bminf")         # doctest: +SKIP
    'out/cpm1-new/checkpoint.pt'
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; known: {', '.join(FORMATS)}")
    if kwargs.get("dtype") is not None:
        kwargs["dtype"] = parse_dtype(kwargs["dtype"])
    path = os.path.expanduser(os.fspath(path))
    if format == "bminf":
        if is_quantized(model) is not True:
            raise ValueError("BMInf's format stores int8 linears: quantize_(model) first")
        target = path if path.endswith(".pt") else os.path.join(path, BMINF_FILE)
        bminf_format.save(model, target, **kwargs)
        return target
    if format == "safetensors":
        save_pretrained(model, path, **kwargs)
    elif format == "hf":
        save_hf_gpt(model, path, **kwargs)
    else:
        raise ValueError(f"unknown format {format!r}; known: {', '.join(FORMATS)}")
    return path


def describe(model: nn.Module) -> str:
    """``"gpt, int8 linears, float16"`` for reports."""
    q = is_quantized(model)
    return f"{architecture_of(model)}, {'int8' if q else 'float' if q is False else 'mixed'} linears, " \
           f"{str(float_dtype(model)).replace('torch.', '')}"
