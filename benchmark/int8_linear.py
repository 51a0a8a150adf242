"""int8 linear kernels at the shapes of CPM-2 (and, with --models, CPM-1 and EVA): time and weight bytes per second.

    python benchmark/int8_linear.py --out int8_linear.json
    python benchmark/int8_linear.py --models cpm1 cpm2 eva --rows 1 --sweep    # tune the GEMV's tiles

For each weight shape of a CPM-2 block it times, on one GPU, ``x @ W.T`` for a (rows, in) fp16 ``x``:
fp16 ``F.linear`` (the resident fp16 baseline), the portable int8 path (dequantize, then cuBLAS) and
the Triton int8 kernel (for 1-4 rows also the GEMV and the split-K matmul each, between which it
chooses by the row count), and prints the weight bytes read per second against the HBM read ceiling
measured in the same run (``torch.sum`` over 2 GiB). Up to ``triton_int8.MAX_ROWS`` rows it also
times, through the kernel a decode step runs for that row count (``int8_linear_many``: the GEMV for
one row, the split-K matmul for more), the launches that do more than one linear: attention's q/k/v
in one launch, and T5's two feed-forward inputs in one launch (then the GELU and the product),
against separate launches; and the kernel with an epilogue (T5's gated GELU, GPT's GELU, a residual
add) against the kernel followed by the torch ops.

Each timed call reads another copy of the weight, the copies together larger than L2 (50 MB on an
H100/H200), as a decode step reads every weight once: timing one weight over and over would read it
from L2 after the first call.

The product's kernel is timed twice: alone, each launch waiting for the one before to end, and "as in
a step", launched as a decode step launches it (``dependent_launch``: where the GPU has programmatic
dependent launch, each kernel loads its first weight tile while the one before is finishing). The
first is the kernel's own speed; the second what it gives inside a decode step.
"""
import argparse
import itertools
import json

import torch
import torch.nn.functional as F

from bminf.kernels import dependent_launch, triton_gemv, triton_int8
from bminf.quantization import quantize_weight

MODELS = {"cpm2": (4096, 10240), "cpm1": (2560, 10240), "eva": (2048, 5120)}  # d_model, d_ff
ROTATE_BYTES = 256 << 20  # the copies a timing cycles through: five times L2


def shapes(model):
    d, f = MODELS[model]
    return {f"{model} attention q/k/v/o": (d, d), f"{model} ffn in/gated": (f, d), f"{model} ffn out": (d, f)}


def copies(make, nbytes: int):
    """Enough copies of ``make()`` that together they exceed ``ROTATE_BYTES``."""
    return [make() for _ in range(max(2, -(-ROTATE_BYTES // nbytes)))]


def bench(fn, n: int = 1, reps: int = 48) -> float:
    """GPU microseconds per call of ``fn(i)``, ``i`` cycling over ``n`` weight copies: calls captured
    in one CUDA graph and replayed, so the host's launch cost (tens of microseconds for a Triton
    kernel) does not hide the kernel's."""
    reps = max(reps, n)
    for i in range(3):
        fn(i % n)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            fn(i % n)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (5 * reps) * 1e3  # microseconds


def as_in_a_step(fn):
    """``fn`` launched as a decode step launches its kernels (``dependent_launch.within_a_step``)."""
    def call(i):
        with dependent_launch.within_a_step():
            return fn(i)
    return call


def sweep(x, qs, s):
    """Best (BLOCK_N, BLOCK_K, num_warps, num_stages) of the GEMV for this problem, and its time."""
    best = (float("inf"), None)
    for bn, bk, warps, stages in itertools.product((2, 4, 8, 16), (512, 1024, 2048), (4,), (1, 2, 3)):
        if bn * bk > 64 * 32 * warps:  # the accumulator would spill registers
            continue
        us = bench(lambda i: triton_gemv.int8_gemv(x, qs[i], s, tiles=(bn, bk, warps, stages)), len(qs))
        best = min(best, (us, (bn, bk, warps, stages)))
    return best


def epilogues(name, n, k, rows, x, qs, s, show, sweep_tiles: bool):
    """The kernel for ``rows`` with GPT's GELU or a residual add in its epilogue, against the kernel then
    the torch op; with ``sweep_tiles`` (one row) the GEMV's gated GELU tiles for T5's feed-forward input."""
    linear = triton_int8.int8_linear
    if "in/gated" in name:
        show(name, n, k, rows, "gelu(in) in the epilogue", bench(lambda i: triton_int8.int8_linear_gelu(x, qs[i], s),
                                                                  len(qs)), n * k)
        show(name, n, k, rows, "gelu(in) after", bench(lambda i: F.gelu(linear(x, qs[i], s), approximate="tanh"),
                                                        len(qs)), n * k)
        if sweep_tiles and rows <= triton_int8.GEMV_ROWS:
            pairs = [qs[i:i + 2] for i in range(0, len(qs) - 1, 2)]
            for bn, bk, warps in itertools.product((1, 2, 4), (512, 1024, 2048), (2, 4)):
                us = bench(lambda i: triton_gemv._launch(x, pairs[i], [s, s], [None, None], (bn, bk, warps, 1),
                                                         triton_gemv.GATED), len(pairs))
                show(name, n, k, rows, f"gated tiles {(bn, bk, warps, 1)}", us, 2 * n * k)
    else:
        r = torch.randn(rows, n, device="cuda", dtype=torch.float16)
        show(name, n, k, rows, "residual add in the epilogue", bench(lambda i: triton_int8.int8_linear_add(
            x, qs[i], s, None, r), len(qs)), n * k)
        show(name, n, k, rows, "residual add after", bench(lambda i: r + linear(x, qs[i], s), len(qs)), n * k)


def hbm_read_gbs():
    try:
        from benchmark import hbm_read
    except ImportError:  # run as a script, benchmark/ on the path
        import hbm_read
    return hbm_read.gb_per_s(torch.device("cuda"))["best"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="*", default=[1, 16])
    ap.add_argument("--block-k", type=int, nargs="*", default=[], help="also time these K tile sizes")
    ap.add_argument("--models", nargs="*", default=["cpm2"], choices=sorted(MODELS))
    ap.add_argument("--sweep", action="store_true", help="also try every GEMV tile (rows <= 4)")
    ap.add_argument("--table-out", default=None, help="write the best tiles (rows=1) as JSON for BMINF_GEMV_TABLE")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("this times the int8 kernels on a GPU; no CUDA device is available")
    ceiling = hbm_read_gbs()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}; HBM read ceiling {ceiling:.0f} GB/s")
    results = {"device": torch.cuda.get_device_name(), "hbm_read_gbs": ceiling, "cases": []}
    table = {}

    def show(name, n, k, rows, kernel, us, nbytes):
        gbs = nbytes / us / 1e3
        print(f"{name:22s} {n}x{k} rows={rows:3d} {kernel:34s} {us:8.1f} us {gbs:7.0f} GB/s "
              f"({100 * gbs / ceiling:3.0f}% of HBM read)", flush=True)
        results["cases"].append(dict(name=name, shape=[n, k], rows=rows, kernel=kernel, us=us, gbs=gbs))

    for model in args.models:
        for name, (n, k) in shapes(model).items():
            ws = copies(lambda: torch.randn(n, k, device="cuda", dtype=torch.float16) / k ** 0.5, 2 * n * k)
            qs = copies(lambda: quantize_weight(torch.randn(n, k, device="cuda", dtype=torch.float16))[0], n * k)
            s = quantize_weight(ws[0])[1]
            for rows in args.rows:
                x = torch.randn(rows, k, device="cuda", dtype=torch.float16)
                times = {
                    "fp16 F.linear": (bench(lambda i: F.linear(x, ws[i]), len(ws)), 2),
                    "int8 portable": (bench(lambda i: F.linear(x, qs[i] * s.to(x.dtype)[:, None]), len(qs)), 1),
                    "int8 triton": (bench(lambda i: triton_int8.int8_linear(x, qs[i], s), len(qs)), 1),
                    "int8 triton, as in a step": (bench(as_in_a_step(lambda i: triton_int8.int8_linear(x, qs[i], s)),
                                                        len(qs)), 1),
                    **{f"int8 triton K{bk}": (bench(lambda i: triton_int8.int8_linear(x, qs[i], s, block_k=bk),
                                                    len(qs)), 1) for bk in args.block_k},
                }
                if rows <= triton_gemv.MAX_ROWS:  # "int8 triton" picks one of these by the row count
                    times["int8 gemv"] = (bench(lambda i: triton_gemv.int8_gemv(x, qs[i], s), len(qs)), 1)
                    times["int8 split-K"] = (bench(lambda i: triton_int8._matmul(x, [qs[i]], [s], [None])[0],
                                                   len(qs)), 1)
                if args.sweep and rows <= triton_gemv.MAX_ROWS:
                    us, tiles = sweep(x, qs, s)
                    times[f"int8 gemv best {tiles}"] = (us, 1)
                    if rows == 1:
                        table[(n, k)] = tiles
                for kernel, (us, width) in times.items():
                    show(name, n, k, rows, kernel, us, n * k * width)
                if rows <= triton_int8.MAX_ROWS and n != k:
                    epilogues(name, n, k, rows, x, qs, s, show, args.sweep)
                if rows > triton_int8.MAX_ROWS or n != k and "in/gated" not in name:
                    continue
                # attention's q, k and v of one layer; or T5's two feed-forward inputs, then GELU and product
                size = 3 if n == k else 2
                groups = [qs[i:i + size] for i in range(0, len(qs) - size + 1, size)]

                def grouped(i, together):
                    group = groups[i]
                    outs = triton_int8.int8_linear_many(x, group, [s] * size) if together else \
                        [triton_int8.int8_linear(x, q, s) for q in group]
                    return outs if size == 3 else F.gelu(outs[0], approximate="tanh") * outs[1]

                what = "q/k/v in" if size == 3 else "gelu(in) * gated,"
                if size == 2:
                    show(name, n, k, rows, f"{what} fused", bench(lambda i: triton_int8.int8_linear_gated(
                        x, groups[i][0], s, groups[i][1], s), len(groups)), size * n * k)
                    show(name, n, k, rows, f"{what} fused, as in a step", bench(as_in_a_step(
                        lambda i: triton_int8.int8_linear_gated(x, groups[i][0], s, groups[i][1], s)), len(groups)),
                        size * n * k)
                else:
                    show(name, n, k, rows, f"{what} one launch, as in a step", bench(as_in_a_step(
                        lambda i: grouped(i, True)), len(groups)), size * n * k)
                for together, launches in ((True, "one launch"), (False, f"{size} launches")):
                    show(name, n, k, rows, f"{what} {launches}", bench(lambda i: grouped(i, together), len(groups)),
                         size * n * k)
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
