"""Where the time of one decode step goes: the GPU kernels of a step, grouped by name, with their
count and time, next to the step's wall time from graph replay.

    python -m benchmark.profile_decode --preset cpm2 --batch-size 1 --json out.json

The static step (what a CUDA graph records) is profiled eagerly, with the kernels a capture picks
(``always_fused``: the fused int8 kernels for small weights too; ``within_a_step``: dependent
launch), so every kernel appears with its own GPU time; launch gaps are what the graph removes,
and the graph's step time is timed apart.
"""
import argparse
import json
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from bminf.generation.graphs import GraphedDecoder
from bminf.kernels import dependent_launch
from bminf.kernels.triton_int8 import always_fused

if not __package__:  # run as a file: the relative import below needs the package
    raise SystemExit("run it from the repository root as a module: python -m benchmark.profile_decode ...")
from .common import free, graphed_model, machine
from .runs import _ids, step_ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="cpm2", choices=["cpm1", "cpm2", "eva"])
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--input-length", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device, kind, cfg, model = graphed_model(ap, args, "this profiles the CUDA kernels of a graphed step")
    b, L = args.batch_size, args.input_length
    max_length = 256 + (L if kind == "gpt" else 0)
    ids = _ids(b, L, cfg.vocab_size, device)
    mask = torch.ones_like(ids, dtype=torch.bool)
    out = {"machine": machine(device), "preset": args.preset, "batch": b}

    for graphs in (True, False):
        dec = GraphedDecoder(model, b, max_length, max_source_length=L, use_graphs=graphs)
        with torch.no_grad():
            ms, step, tok = step_ms(dec, kind, ids, mask, args.steps)
            out["graph_step_ms" if graphs else "eager_step_ms"] = ms
            print(f"{'graph' if graphs else 'eager'} step: {ms:.3f} ms", flush=True)
            if graphs:
                del dec
                free()
                continue
            with always_fused(), dependent_launch.within_a_step(), profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(args.steps):
                    tok = step(tok)[:, -1:].argmax(-1)
                torch.cuda.synchronize(device)
        del dec
        free()

    kernels = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels[e.name[:110]]
            k[0] += 1
            k[1] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
    rows = sorted(((n, c / args.steps, t / args.steps) for n, (c, t) in kernels.items()), key=lambda r: -r[2])
    total_us = sum(r[2] for r in rows)
    n_kernels = sum(r[1] for r in rows)
    out.update(kernels_per_step=n_kernels, kernel_us_per_step=total_us,
               kernels=[{"name": n, "per_step": c, "us_per_step": t} for n, c, t in rows])
    print(f"{n_kernels:.0f} kernels per step, {total_us / 1e3:.3f} ms of kernel time per step")
    for n, c, t in rows[:40]:
        print(f"  {t:9.1f} us  {c:6.1f}x  {t / max(c, 1e-9):7.2f} us each  {n}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
