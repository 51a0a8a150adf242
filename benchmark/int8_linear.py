"""int8 linear kernels at CPM-2's shapes, batch-1 decode: time and weight bytes per second.

    python benchmark/int8_linear.py --out int8_linear.json

For each weight shape of a CPM-2 block it times, on one GPU, ``x @ W.T`` for a (rows, in) fp16 ``x``:
fp16 ``F.linear`` (the resident fp16 baseline), the portable int8 path (dequantize, then cuBLAS) and
the Triton int8 kernel, and prints the weight bytes read per second against the HBM read ceiling
measured in the same run (``torch.sum`` over 2 GiB).
"""
import argparse
import json

import torch
import torch.nn.functional as F

from bminf.kernels import triton_int8
from bminf.quantization import quantize_weight

SHAPES = {"attention q/k/v/o": (4096, 4096), "ffn in/gated": (10240, 4096), "ffn out": (4096, 10240)}


def bench(fn, reps=200):
    for _ in range(10):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps * 1e3  # microseconds


def hbm_read_gbs():
    t = torch.empty(1 << 30, dtype=torch.float16, device="cuda").uniform_()
    return t.numel() * 2 / bench(lambda: t.sum(), reps=20) / 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="*", default=[1, 16])
    ap.add_argument("--block-k", type=int, nargs="*", default=[], help="also time these K tile sizes")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    ceiling = hbm_read_gbs()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}; HBM read ceiling {ceiling:.0f} GB/s")
    results = {"device": torch.cuda.get_device_name(), "hbm_read_gbs": ceiling, "cases": []}
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.float16)
        q, s = quantize_weight(w)
        for rows in args.rows:
            x = torch.randn(rows, k, device="cuda", dtype=torch.float16)
            times = {
                "fp16 F.linear": bench(lambda: F.linear(x, w)),
                "int8 portable": bench(lambda: F.linear(x, q.to(x.dtype) * s.to(x.dtype)[:, None])),
                "int8 triton": bench(lambda: triton_int8.int8_linear(x, q, s)),
                **{f"int8 triton K{bk}": bench(lambda: triton_int8.int8_linear(x, q, s, block_k=bk))
                   for bk in args.block_k},
            }
            for kernel, us in times.items():
                nbytes = n * k * (2 if kernel.startswith("fp16") else 1)
                gbs = nbytes / us / 1e3
                print(f"{name:18s} {n}x{k} rows={rows:3d} {kernel:18s} {us:8.1f} us {gbs:7.0f} GB/s "
                      f"({100 * gbs / ceiling:3.0f}% of HBM read)")
                results["cases"].append(dict(shape=[n, k], rows=rows, kernel=kernel, us=us, gbs=gbs))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
