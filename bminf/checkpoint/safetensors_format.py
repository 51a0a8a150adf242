"""Our own format: a directory with ``model.safetensors`` and ``config.json``.

``config.json`` is what lets any size load through one path (tiny test models, future sizes)::

    {"format": "bminf", "format_version": 1, "architecture": "gpt" | "t5",
     "config": {...the GPTConfig / T5Config fields...}, "quantization": null | "int8-rowwise-absmax"}

Tensor names are our state-dict names, which are BMInf's tree paths. A directory without
``config.json`` (weights only) loads with a preset.

>>> save_pretrained(model, "out/cpm1-int8")                   # doctest: +SKIP
>>> model = load_pretrained("out/cpm1-int8")                  # doctest: +SKIP
"""
import dataclasses
import json
import os
from contextlib import contextmanager
from typing import Optional, Union

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .common import (ARCHITECTURES, INT8_SCHEME, CheckpointError, architecture_of, build_model, check_preset,
                     config_from_dict, copy_into, is_quantized, materialize_, preset_config, write_atomic)

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "FORMAT_VERSION", "save_pretrained", "load_pretrained", "read_config"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1

# safetensors' dtype names -> torch; anything else in a file is reported, not guessed at
_ST_DTYPES = {"I8": torch.int8, "U8": torch.uint8, "F16": torch.float16, "BF16": torch.bfloat16,
              "F32": torch.float32, "F64": torch.float64, "I32": torch.int32, "I64": torch.int64,
              "BOOL": torch.bool}


def save_pretrained(model: nn.Module, directory: Union[str, os.PathLike]) -> None:
    """Write ``model`` (a bminf GPT or T5, float or int8) as ``model.safetensors`` + ``config.json``.

    Each file is written under a temporary name and renamed into place, the weights first and the
    config last, so an interrupted save never leaves a config describing weights that are not there.

    >>> save_pretrained(quantize_(tiny_model), "/tmp/tiny")       # doctest: +SKIP
    """
    directory = os.fspath(directory)
    arch = architecture_of(model)
    quantized = is_quantized(model)
    if quantized is None:
        raise ValueError("cannot save a partly quantized model: config.json records one scheme for all linears")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": "pt", "bminf_architecture": arch}
    config = {"format": "bminf", "format_version": FORMAT_VERSION, "architecture": arch,
              "config": dataclasses.asdict(model.config), "quantization": INT8_SCHEME if quantized else None}
    os.makedirs(directory, exist_ok=True)
    write_atomic(os.path.join(directory, WEIGHTS_NAME), lambda tmp: save_file(state, tmp, metadata=meta))

    def write_config(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
    write_atomic(os.path.join(directory, CONFIG_NAME), write_config)


def read_config(directory: Union[str, os.PathLike]):
    """``(architecture, config, quantization)`` from a directory's ``config.json``, validated."""
    path = os.path.join(os.fspath(directory), CONFIG_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != "bminf":
        raise CheckpointError(f"{path}: not a bminf config (no \"format\": \"bminf\")")
    version = doc.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version!r}; this bminf reads version {FORMAT_VERSION}")
    arch = doc.get("architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{path}: architecture {arch!r} is not one of {sorted(ARCHITECTURES)}")
    quantization = doc.get("quantization")
    if quantization not in (None, INT8_SCHEME):
        raise CheckpointError(f"{path}: unknown quantization {quantization!r} (known: null, {INT8_SCHEME!r})")
    if not isinstance(doc.get("config"), dict):
        raise CheckpointError(f"{path}: \"config\" must be an object of {arch} config fields")
    return arch, config_from_dict(arch, doc["config"], path), quantization


@contextmanager
def open_safetensors(path: str):
    """``safe_open`` whose errors (truncated, corrupt header) name the file."""
    try:
        with safe_open(path, framework="pt") as f:
            yield f
    except SafetensorError as e:
        raise CheckpointError(f"{path}: not a readable safetensors file: {e}") from None


def tensor_specs(f, path: str) -> dict:
    """name -> (shape, dtype) from a safetensors header, without reading data."""
    specs = {}
    for name in f.keys():
        piece = f.get_slice(name)
        dtype = _ST_DTYPES.get(piece.get_dtype())
        if dtype is None:
            raise CheckpointError(f"{path}: {name} has unsupported dtype {piece.get_dtype()}")
        specs[name] = (tuple(piece.get_shape()), dtype)
    return specs


def load_pretrained(directory: Union[str, os.PathLike], preset: Optional[str] = None) -> nn.Module:
    """Load a directory written by ``save_pretrained``, strictly, each tensor straight into place.

    Without ``config.json`` the ``preset`` gives the config (an error if none is given) and linears
    are int8 where the file stores their ``scale``. With both, a preset that disagrees with
    ``config.json`` is an error naming the field.

    >>> model = load_pretrained("out/cpm1-int8")                  # doctest: +SKIP
    """
    directory = os.fspath(directory)
    weights = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{directory}: no {WEIGHTS_NAME}")
    with open_safetensors(weights) as f:
        specs = tensor_specs(f, weights)
        if os.path.isfile(os.path.join(directory, CONFIG_NAME)):
            arch, config, quantization = read_config(directory)
            if preset is not None:
                check_preset(arch, config, preset, os.path.join(directory, CONFIG_NAME))
            quantize = quantization == INT8_SCHEME
        elif preset is None:
            raise CheckpointError(f"{directory}: no {CONFIG_NAME}; pass a preset (cpm1, cpm2 or eva) to load it")
        else:
            arch, config = preset_config(preset)
            quantize = lambda name, _: f"{name}.scale" in specs  # noqa: E731
        model = build_model(arch, config, quantize)
        dest = materialize_(model, specs, weights)
        try:
            for name, target in dest.items():
                copy_into(target, f.get_tensor(name))  # one tensor at a time: peak is the model + one tensor
        except SafetensorError as e:
            raise CheckpointError(f"{weights}: reading {name} failed: {e}") from None
    return model.eval()
