"""Decode attention (one query row per head) at the shapes of CPM-1, CPM-2 and EVA: time and bytes per second.

    python -m benchmark.attention --out attention.json

For each model, batch size and key length it times on one GPU ``F.scaled_dot_product_attention``
against our Triton kernel (``triton_attention``): with the keys split across programs as
``splits_for`` chooses, with each number of splits given by ``--splits``, and unsplit with each
tile of ``--tiles``. ``store@`` rows are a graphed step's store-and-attend with the step at that
position of the bucket (keys after it are not read): as chosen, then with the new key and value
taken from registers and read back from the cache. Bytes are the keys and values read (every
position for SDPA and plain attention, up to the step for ``store@``), against the HBM read ceiling
measured in the same run.
"""
import argparse
import json

import torch

from benchmark.int8_linear import bench, copies, hbm_read_gbs
from bminf.kernels import triton_attention

MODELS = {"cpm1": (32, 80), "cpm2": (64, 64), "eva": (32, 64)}  # heads, d_head


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=sorted(MODELS), choices=sorted(MODELS))
    ap.add_argument("--batch-size", type=int, nargs="*", default=[1, 32])
    ap.add_argument("--length", type=int, nargs="*", default=[256, 512])
    ap.add_argument("--splits", type=int, nargs="*", default=[1, 4, 8])
    ap.add_argument("--tiles", nargs="*", default=[], help="also one program per (row, head) with these "
                    "BLOCK_L:num_warps, e.g. 64:4 128:8")
    ap.add_argument("--unbound", action="store_true", help="also store-and-attend reading every key")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("this times the Triton attention kernel on a GPU; no CUDA device is available")
    ceiling = hbm_read_gbs()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}; HBM read ceiling {ceiling:.0f} GB/s")
    results = {"device": torch.cuda.get_device_name(), "hbm_read_gbs": ceiling, "cases": []}
    for model in args.models:
        heads, d = MODELS[model]
        for batch in args.batch_size:
            for length in args.length:
                kv_bytes = 2 * batch * heads * length * d * 2
                kvs = copies(lambda: tuple(torch.randn(batch, heads, length, d, device="cuda", dtype=torch.float16)
                                           for _ in range(2)), kv_bytes)
                q = torch.randn(batch, heads, 1, d, device="cuda", dtype=torch.float16)
                bias = torch.zeros(batch, 1, 1, length, device="cuda", dtype=torch.float16)
                new = torch.randn(batch, heads, 1, d, device="cuda", dtype=torch.float16)
                scale = d ** -0.5
                chosen = triton_attention.splits_for(batch * heads, length, q.device)
                cases = {"sdpa": (lambda i: triton_attention.reference(q, *kvs[i], bias, scale), length),
                         f"ours (splits_for: {chosen})": (
                             lambda i: triton_attention.attend_one(q, *kvs[i], bias, scale), length)}
                for n in args.splits:
                    cases[f"ours splits={n}"] = (lambda i, n=n: triton_attention.attend_one(q, *kvs[i], bias, scale,
                                                                                            splits=n), length)
                for block_l, warps in (tuple(map(int, t.split(":"))) for t in args.tiles):
                    cases[f"ours unsplit {block_l}:{warps}"] = (lambda i, t=(block_l, warps): triton_attention._launch(
                        q, *kvs[i], bias, scale, length, block_l=t[0], warps=t[1], splits=1), length)
                for at in (length // 2, length - 1):
                    pos = torch.tensor([at], device="cuda")
                    cases[f"store@{at}"] = (lambda i, pos=pos: triton_attention.attend_and_store(
                        q, *kvs[i], bias, scale, length, new, new, pos), at + 1)
                    for read_back in (False, True):
                        cases[f"store@{at} {'read back' if read_back else 'registers'}"] = (
                            lambda i, pos=pos, r=read_back: triton_attention.attend_and_store(
                                q, *kvs[i], bias, scale, length, new, new, pos, read_back=r), at + 1)
                    if args.unbound:
                        cases[f"store@{at} reading all"] = (lambda i, pos=pos: triton_attention._launch(
                            q, *kvs[i], bias, scale, length, new, new, pos, bound=False), length)
                for name, (fn, keys) in cases.items():
                    us = bench(fn, len(kvs))
                    gbs = kv_bytes * keys / length / us / 1e3
                    print(f"{model} batch {batch:3d} keys {length:4d} {name:26s} {us:8.2f} us {gbs:7.0f} GB/s "
                          f"({100 * gbs / ceiling:3.0f}% of HBM read)", flush=True)
                    results["cases"].append(dict(model=model, batch=batch, length=length, kernel=name, us=us, gbs=gbs))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
