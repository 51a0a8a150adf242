"""Tune the int8 GEMV's tiles on the graphed decode step itself, for another GPU or another model.

    python -m benchmark.tune_step --preset cpm2 --table-out tiles.json
    BMINF_GEMV_TABLE=tiles.json python -m benchmark.cpm2.decoder --no-peers

``triton_gemv.TABLE`` came from sweeps of each kernel alone (``benchmark/int8_linear.py --sweep``). In
a decode step each launch follows a norm, attention or another GEMV under dependent launch, and there
other tiles can win: on an H200 T5's gated input at CPM-2's size took the step from 2.105 to 2.022 ms
with tiles that a lone kernel ranks below the table's (h200_run70_step_tune.log). This times the
CUDA-graph step of the model (random int8 weights of the real size, or ``--tiny``) at batch 1, where
the GEMV runs, for each tile one step from the current one on each weight shape the step uses, the
other shapes fixed. A tile is kept where it beats the best step so far by ``--keep`` (1%: about the
noise between two timings in one process), and the shape after it is tuned with it. At the end the
starting tiles and the kept ones are timed twice, alternating, and ``--table-out`` writes the kept
tiles as ``BMINF_GEMV_TABLE`` reads them.
"""
import argparse
import json
import time
from typing import Dict, List, Tuple

import torch

from bminf.generation.graphs import GraphedDecoder
from bminf.kernels import triton_gemv

if not __package__:  # run as a file: the relative import below needs the package
    raise SystemExit("run it from the repository root as a module: python -m benchmark.tune_step ...")
from .common import free, graphed_model, machine
from .runs import _ids, step_ms

Tiles = Tuple[int, int, int]  # BLOCK_N, BLOCK_K, num_warps


def neighbours(tiles: Tiles, k: int, weights: int) -> List[Tiles]:
    """``tiles`` first, then each tile that halves or doubles any of its three numbers: BLOCK_K from 64 up
    to K rounded up to a power of two (or up to ``tiles``' own), 1-8 warps, and no more widened values
    than ``config`` allows per thread (it would shrink BLOCK_K and time a tile already on the list)."""
    bn, bk, warps = tiles
    top = max(bk, 1 << max(0, k - 1).bit_length())
    out = [tiles]
    for n2 in (bn, bn // 2, bn * 2):
        for k2 in (bk, bk // 2, bk * 2):
            for w2 in (warps, warps * 2, warps // 2):
                t = (n2, k2, w2)
                if n2 >= 1 and 64 <= k2 <= top and 1 <= w2 <= 8 and weights * n2 * k2 <= 64 * 32 * w2 \
                        and t not in out:
                    out.append(t)
    return out


def table_json(tiles: Dict[Tuple[int, ...], Tiles]) -> Dict[str, List[int]]:
    """``{"NxK": [BLOCK_N, BLOCK_K, num_warps, 1]}`` (``"NxKx2"`` for the gated GELU), as
    ``BMINF_GEMV_TABLE`` reads it: one stage, since Triton pipelines only loads that feed ``tl.dot``."""
    return {"x".join(map(str, key)): [*t, 1] for key, t in sorted(tiles.items())}


def _key(n: int, k: int, weights: int) -> Tuple[int, ...]:
    return (n, k) if weights == 1 else (n, k, weights)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="cpm2", choices=["cpm1", "cpm2", "eva"])
    ap.add_argument("--tiny", action="store_true", help="a small model of the same type (smoke test)")
    ap.add_argument("--input-length", type=int, default=256)
    ap.add_argument("--steps", type=int, default=40, help="graphed steps per timing (the best of three)")
    ap.add_argument("--budget", type=float, default=600.0, help="seconds to spend trying tiles")
    ap.add_argument("--keep", type=float, default=0.01, help="how much faster a tile must make the step")
    ap.add_argument("--table-out", default=None, help="write the kept tiles here, for BMINF_GEMV_TABLE")
    ap.add_argument("--json", default=None, help="write every timing here")
    ap.add_argument("--device", default="cuda:0")
    args = ap.parse_args()
    device, kind, cfg, model = graphed_model(ap, args, "this times CUDA-graph decode steps")
    ids = _ids(1, args.input_length, cfg.vocab_size, device)
    mask = torch.ones_like(ids, dtype=torch.bool)
    # as benchmark.cpm2.decoder's: 256 positions after the prompt (more if the timed steps need them)
    max_length = max(256, 3 * args.steps + 4) + (args.input_length if kind == "gpt" else 0)

    used = set()  # (n, k, weights) of each GEMV launch the step makes
    config_of = triton_gemv.config

    def recording(m, n, k, dev, weights=1):
        if m == 1:
            used.add((n, k, weights))
        return config_of(m, n, k, dev, weights)

    def timed() -> float:
        # a new decoder, so the graphs are captured with the tiles now in the table
        dec = GraphedDecoder(model, 1, max_length, max_source_length=args.input_length, use_graphs=True)
        with torch.no_grad():
            ms = step_ms(dec, kind, ids, mask, args.steps, repeats=3)[0]
        del dec
        free()
        return ms

    table = triton_gemv._table()  # the dict config() reads: an entry set here tiles the next capture
    saved = dict(table)
    out = {"machine": machine(device), "preset": args.preset, "tiny": args.tiny, "shapes": {}}
    try:
        triton_gemv.config = recording
        first = timed()
        triton_gemv.config = config_of
        start = {_key(*s): config_of(1, s[0], s[1], device, s[2])[1:4] for s in sorted(used)}
        print(f"{args.preset}: step {first:.4f} ms with the table's tiles {table_json(start)}", flush=True)
        best_ms, chosen, began = first, dict(start), time.perf_counter()
        for key in chosen:
            tried = {}
            for tiles in neighbours(chosen[key], key[1], key[2] if len(key) > 2 else 1)[1:]:
                if time.perf_counter() - began > args.budget:
                    break
                table[key] = (*tiles, 1)
                tried[str(tiles)] = ms = timed()
                print(f"  {'x'.join(map(str, key))} {tiles}: {ms:.4f} ms", flush=True)
                if ms < best_ms * (1 - args.keep):
                    best_ms, chosen[key] = ms, tiles
            table[key] = (*chosen[key], 1)
            out["shapes"]["x".join(map(str, key))] = dict(start=start[key], tried=tried, kept=chosen[key])
        pairs = []
        for _ in range(2):
            table.update({key: (*t, 1) for key, t in start.items()})
            before = timed()
            table.update({key: (*t, 1) for key, t in chosen.items()})
            pairs.append((before, timed()))
    finally:
        triton_gemv.config = config_of
        table.clear()
        table.update(saved)
    out.update(start=table_json(start), kept=table_json(chosen), start_vs_kept_ms=pairs)
    print(f"{args.preset}: kept {table_json(chosen)}")
    print("  step with the starting tiles / the kept ones: " + ", ".join(f"{a:.4f} / {b:.4f} ms" for a, b in pairs))
    if args.table_out:
        with open(args.table_out, "w") as f:
            json.dump(table_json(chosen), f)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
