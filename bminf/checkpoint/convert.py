"""``python -m bminf convert SRC DST``: rewrite a checkpoint in another format.

    python -m bminf convert ~/.cache/bigmodels/cpm1-new out/cpm1                # BMInf -> ours
    python -m bminf convert CPM-Generate out/cpm1-new --to bminf                # HF -> BMInf (int8)
    python -m bminf convert out/cpm1 out/cpm1-hf --to hf                        # ours -> HF (float32)
    python -m bminf convert cpm2.1-new/checkpoint.pt out/cpm2 --preset cpm2
"""
import argparse
import sys
import time

import torch

from . import FORMATS, describe, detect_format, load_model, save_model
from .common import PRESET_ALIASES, PRESET_NAMES, cast_floats_, is_quantized, state_summary
from ..quantization import quantize_

_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="checkpoint.pt or its directory (BMInf), a bminf directory, or an HF CPM-1 directory")
    p.add_argument("dst", help="output: a file ending in .pt or a directory")
    p.add_argument("--to", choices=FORMATS, help="output format (default: bminf if DST ends in .pt, else safetensors)")
    p.add_argument("--preset", choices=PRESET_NAMES + sorted(PRESET_ALIASES),
                   help="the model, for what a BMInf file cannot tell (head count, eps, max_distance)")
    p.add_argument("--no-quantize", action="store_true",
                   help="keep (or make) the linears float; not possible with --to bminf")
    p.add_argument("--dtype", choices=sorted(_DTYPES),
                   help="float dtype of the output (HF output: float32 unless given; bminf: float16 only)")


def run_convert(args: argparse.Namespace) -> int:
    """Run the conversion described by ``args``; print notes and a one-line summary; 0 on success."""
    try:
        return _convert(args)
    except (ValueError, FileNotFoundError) as e:  # CheckpointError is a ValueError
        print(f"bminf convert: error: {e}", file=sys.stderr)
        return 1


def _convert(args: argparse.Namespace) -> int:
    start = time.time()
    to = args.to or ("bminf" if args.dst.endswith(".pt") else "safetensors")
    if to == "bminf" and args.no_quantize:
        raise ValueError("BMInf's format stores int8 linears; --no-quantize cannot be honoured with --to bminf")
    if to == "bminf" and args.dtype not in (None, "float16"):
        raise ValueError("BMInf 1.x stores float tensors as float16; --dtype float32 is not possible with --to bminf")
    src_format, _ = detect_format(args.src)
    notes = []
    model = load_model(args.src, preset=args.preset, quantize=False if args.no_quantize else None)
    if src_format == "hf" and not args.no_quantize:
        notes.append("quantized the float linears to int8 (per-row absmax) while loading; "
                     "--no-quantize keeps them float")
    if src_format != "hf" and args.no_quantize:
        notes.append("int8 linears, if any, were dequantized (weight x scale); the float weights they were "
                     "quantized from are not recoverable")
    dtype = _DTYPES.get(args.dtype)

    if to == "bminf":
        if is_quantized(model) is not True:
            quantize_(model)
            notes.append("quantized the float linears to int8: BMInf's format stores int8 linears")
        floats = {t.dtype for n, t in model.state_dict().items() if t.is_floating_point() and not n.endswith(".scale")}
        if floats - {torch.float16}:
            notes.append("cast float tensors to float16, as BMInf 1.x stores them")
        cast_floats_(model, torch.float16)
        written = save_model(model, args.dst, format="bminf")
    elif to == "hf":
        dtype = dtype or torch.float32
        if is_quantized(model) is not False:
            notes.append(f"wrote the int8 linears dequantized to {str(dtype)[6:]}: loadable by transformers, but "
                         "lossy relative to the original float model (int8 rounding is not undone)")
        written = save_model(model, args.dst, format="hf", dtype=dtype)
    else:
        if dtype is not None:
            cast_floats_(model, dtype)
        written = save_model(model, args.dst, format="safetensors")

    for note in notes:
        print(f"note: {note}")
    print(f"converted {args.src} ({src_format}) -> {written} ({to}): {describe(model)}, "
          f"{state_summary(model.state_dict())}, {time.time() - start:.1f} s")
    return 0
