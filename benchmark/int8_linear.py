"""int8 linear kernels at the shapes of CPM-2 (and, with --models, CPM-1 and EVA): time and weight bytes per second.

    python benchmark/int8_linear.py --out int8_linear.json
    python benchmark/int8_linear.py --models cpm1 cpm2 eva --rows 1 --sweep    # tune the GEMV's tiles

For each weight shape of a CPM-2 block it times, on one GPU, ``x @ W.T`` for a (rows, in) fp16 ``x``:
fp16 ``F.linear`` (the resident fp16 baseline), the portable int8 path (dequantize, then cuBLAS) and
the Triton int8 kernel, and prints the weight bytes read per second against the HBM read ceiling
measured in the same run (``torch.sum`` over 2 GiB).
"""
import argparse
import itertools
import json

import torch
import torch.nn.functional as F

from bminf.kernels import triton_gemv, triton_int8
from bminf.quantization import quantize_weight

MODELS = {"cpm2": (4096, 10240), "cpm1": (2560, 10240), "eva": (2048, 5120)}  # d_model, d_ff


def shapes(model):
    d, f = MODELS[model]
    return {f"{model} attention q/k/v/o": (d, d), f"{model} ffn in/gated": (f, d), f"{model} ffn out": (d, f)}


def sweep(x, q, s):
    """Best (BLOCK_N, BLOCK_K, num_warps) of the GEMV for this problem, and its time."""
    best = (float("inf"), None)
    for bn, bk, warps in itertools.product((2, 4, 8, 16, 32), (256, 512, 1024, 2048, 4096), (4, 8)):
        if bn * bk > 64 * 32 * warps:  # the accumulator would spill registers
            continue
        us = bench(lambda: triton_gemv.int8_gemv(x, q, s, tiles=(bn, bk, warps)), reps=20)
        best = min(best, (us, (bn, bk, warps)))
    return best


def bench(fn, reps=50):
    """GPU microseconds per call: ``reps`` calls captured in one CUDA graph and replayed, so the
    host's launch cost (tens of microseconds for a Triton kernel) does not hide the kernel's."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (5 * reps) * 1e3  # microseconds


def hbm_read_gbs():
    t = torch.empty(1 << 30, dtype=torch.float16, device="cuda").uniform_()
    return t.numel() * 2 / bench(lambda: t.sum(), reps=10) / 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="*", default=[1, 16])
    ap.add_argument("--block-k", type=int, nargs="*", default=[], help="also time these K tile sizes")
    ap.add_argument("--models", nargs="*", default=["cpm2"], choices=sorted(MODELS))
    ap.add_argument("--sweep", action="store_true", help="also try every GEMV tile (rows <= 4)")
    ap.add_argument("--table-out", default=None, help="write the best tiles (rows=1) as JSON for BMINF_GEMV_TABLE")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    ceiling = hbm_read_gbs()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}; HBM read ceiling {ceiling:.0f} GB/s")
    results = {"device": torch.cuda.get_device_name(), "hbm_read_gbs": ceiling, "cases": []}
    table = {}
    for name, (n, k) in {k: v for m in args.models for k, v in shapes(m).items()}.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.float16)
        q, s = quantize_weight(w)
        for rows in args.rows:
            x = torch.randn(rows, k, device="cuda", dtype=torch.float16)
            times = {
                "fp16 F.linear": bench(lambda: F.linear(x, w)),
                "int8 portable": bench(lambda: F.linear(x, q * s.to(x.dtype)[:, None])),
                "int8 triton": bench(lambda: triton_int8.int8_linear(x, q, s)),
                **{f"int8 triton K{bk}": bench(lambda: triton_int8.int8_linear(x, q, s, block_k=bk))
                   for bk in args.block_k},
            }
            if args.sweep and rows <= triton_gemv.MAX_ROWS:
                us, tiles = sweep(x, q, s)
                times[f"int8 gemv best {tiles}"] = us
                if rows == 1:
                    table[(n, k)] = tiles
            for kernel, us in times.items():
                nbytes = n * k * (2 if kernel.startswith("fp16") else 1)
                gbs = nbytes / us / 1e3
                print(f"{name:18s} {n}x{k} rows={rows:3d} {kernel:18s} {us:8.1f} us {gbs:7.0f} GB/s "
                      f"({100 * gbs / ceiling:3.0f}% of HBM read)")
                results["cases"].append(dict(shape=[n, k], rows=rows, kernel=kernel, us=us, gbs=gbs))
    if table:
        print("TABLE =", {k: table[k] for k in sorted(table)})
        results["gemv_table"] = {f"{n}x{k}": v for (n, k), v in table.items()}
        if args.table_out:
            with open(args.table_out, "w") as f:
                json.dump(results["gemv_table"], f)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
