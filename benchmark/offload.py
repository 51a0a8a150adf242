"""Decode a CPM-2-shaped model inside a GPU memory budget: bminf's layer streaming vs accelerate.

    python benchmark/offload.py --memory-limit-gib 6 --out offload.json

Builds our T5 backbone at the CPM-2 shape (24 + 24 blocks, d_model 4096, d_ff 10240, 64 heads x 64;
int8 weights, ~11 GB) with random weights (no checkpoint), then times, on one GPU:
  1. a plain pinned host-to-device copy (the ceiling for streaming);
  2. the model fully resident (no budget): the compute time of a decode step;
  3. the model under ``--memory-limit-gib`` through ``bminf.wrapper``: tokens/s, bytes streamed per
     token, the streaming rate achieved while decoding and its share of the pinned H2D rate;
  4. the same model in fp16, as users run it, under the same budget through accelerate's
     ``dispatch_model`` with CPU offload (a few tokens: it is slow).
Tokens/s count decode steps only (batch 1, after an untimed warm-up that also projects the
cross-attention keys/values), LM head included, as BMInf's decoder benchmark did. Results go to
stdout and, as JSON, to ``--out``.
"""
import argparse
import gc
import json
import platform
import time

import torch
import torch.nn as nn

from bminf import wrapper
from common import fill_random_
from bminf.kernels import int8_linear
from bminf.models.t5 import T5, T5_PRESETS, T5Config
from bminf.offload.stream import Streamer
from bminf.quantization import quantize_

GIB = 1 << 30


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def h2d_bandwidth(device, nbytes=GIB, reps=5):
    """Best-of-``reps`` GB/s of one large pinned host -> device copy."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=True)
    best = 0.0
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        sync(device)
        best = max(best, nbytes / (time.perf_counter() - t) / 1e9)
    return best


def warm_up(device, seconds=1.0):
    """Bring the GPU to its working clocks before timing anything."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.float16)
    t = time.perf_counter()
    while time.perf_counter() - t < seconds:
        a @ a
        sync(device)


def time_us(fn, reps=200):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return 1e6 * (time.perf_counter() - t) / reps


def kernel_figures(device, cfg):
    """One-token linears at the FFN shape: the int8 path the blocks use, and fp16 for reference."""
    w = torch.randint(-127, 128, (cfg.d_ff, cfg.d_model), dtype=torch.int8, device=device)
    s = torch.full((cfg.d_ff,), 1e-3, dtype=torch.float16, device=device)
    x = torch.randn(1, 1, cfg.d_model, dtype=torch.float16, device=device)
    wf = w.half()
    return {"int8_linear_us": time_us(lambda: int8_linear(x, w, s)),
            "fp16_linear_us": time_us(lambda: torch.nn.functional.linear(x, wf)),
            "shape": [cfg.d_ff, cfg.d_model]}


class no_copies:
    """Diagnostic: the streamer keeps its bookkeeping and events but skips the host->device copy,
    so a decode measures the compute (and host) time of the same placement without any streaming."""

    def __enter__(self):
        self.load = Streamer._load

        def load(streamer, block, slot):
            if slot.block is not None:
                streamer.where.pop(id(slot.block), None)
            slot.block, streamer.where[id(block)] = block, slot
            if streamer.cuda:
                slot.ready.record(torch.cuda.current_stream(streamer.device))
        Streamer._load = load

    def __exit__(self, *exc):
        Streamer._load = self.load


def build(cfg: T5Config, int8: bool, device: torch.device) -> T5:
    with torch.device("meta"):
        model = T5(cfg)
    if int8:
        quantize_(model)
    # generated on the GPU (a CPU fills 11 GB of random bytes far slower), kept in host memory
    return fill_random_(model, device, torch.device("cpu"), torch.float16)


def decode(model, device, encode_length: int, steps: int, warmup: int = 2, counter=None):
    """Encode once, then greedy-decode; returns timings of the timed steps (and, given a
    ``counter`` of bytes copied so far, the bytes copied during them)."""
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, encode_length), device=device)
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        sync(device)
        t = time.perf_counter()
        enc = model.encode(ids, mask)
        sync(device)
        encode_s = time.perf_counter() - t
        cache = model.new_cache(mask, max_length=warmup + steps + 1)
        tok = torch.zeros(1, 1, dtype=torch.long, device=device)
        for _ in range(warmup):
            tok = model.decode(tok, enc, cache=cache)[:, -1:].argmax(-1)
        sync(device)
        copied = counter() if counter else 0
        t = time.perf_counter()
        for _ in range(steps):
            tok = model.decode(tok, enc, cache=cache)[:, -1:].argmax(-1)
        host = time.perf_counter() - t  # when the host had queued every step
        sync(device)
        dt = time.perf_counter() - t
        copied = (counter() if counter else 0) - copied
    return {"encode_s": encode_s, "encode_tokens_per_s": encode_length / encode_s, "decode_steps": steps,
            "decode_s": dt, "tokens_per_s": steps / dt, "ms_per_token": 1e3 * dt / steps,
            "host_ms_per_token": 1e3 * host / steps, "copied_bytes_timed": copied}


def parts(model):
    return list({id(p): p for lst in (model.enc_layers, model.dec_layers) for p in lst._parts}.values())


def unwrap_(model):
    """Give a wrapped model back its plain lists and move it to the host (benchmark use only)."""
    for name in ("enc_layers", "dec_layers"):
        blocks = list(getattr(model, name))
        for b in blocks:
            b.__dict__.pop("forward", None)
        setattr(model, name, nn.ModuleList(blocks))
    gc.collect()
    return model.cpu()


def run_bminf(model, device, limit, reserve, args):
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    model = wrapper(model, quantization=False, device=device, memory_limit=limit, reserve=reserve)
    place_s = time.perf_counter() - t
    res = decode(model, device, args.encode_length, args.steps,
                 counter=lambda: sum(p.streamer.loaded_bytes for p in parts(model) if p.streamer))
    with no_copies():
        res["no_copy_ms_per_token"] = decode(model, device, args.encode_length, args.steps)["ms_per_token"]
    res.update(place_s=place_s, peak_allocated=torch.cuda.max_memory_allocated(device),
               resident_blocks={"encoder": len(model.enc_layers) - len(model.enc_layers.streamed_blocks),
                                "decoder": len(model.dec_layers) - len(model.dec_layers.streamed_blocks)},
               reserve=[p.plan.reserve for p in parts(model)], slot_bytes=[p.plan.slot_bytes for p in parts(model)])
    # measured: bytes the copy stream moved during the timed decode steps, over their wall time
    res.update(streamed_bytes_per_token=res["copied_bytes_timed"] / args.steps,
               streaming_gb_per_s=res["copied_bytes_timed"] / res["decode_s"] / 1e9)
    return model, res


def run_accelerate(cfg, device, limit, reserve, args):
    from accelerate import dispatch_model
    model = build(cfg, int8=False, device=device)
    # embeddings, norms and bias tables on the GPU (the LM head reads output_embedding.weight
    # directly, which an offload hook would never load); then blocks in module order while they
    # fit max_memory minus the same activation reserve, as infer_auto_device_map fills a device
    device_map, used = {}, 0
    for name, mod in model.named_children():
        if not isinstance(mod, nn.ModuleList):
            device_map[name] = device.index
            used += sum(p.numel() * p.element_size() for p in mod.parameters())
    for name in ("enc_layers", "dec_layers"):
        for i, block in enumerate(getattr(model, name)):
            size = sum(p.numel() * p.element_size() for p in block.parameters())
            on_gpu = used + size <= limit - reserve
            device_map[f"{name}.{i}"] = device.index if on_gpu else "cpu"
            used += size if on_gpu else 0
    gpu_blocks = sum(1 for k, v in device_map.items() if "layers" in k and v != "cpu")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    model = dispatch_model(model, device_map=device_map)
    res = decode(model, device, args.encode_length, args.accelerate_steps, warmup=1)
    res.update(gpu_blocks=gpu_blocks, peak_allocated=torch.cuda.max_memory_allocated(device),
               dtype="float16", device_map="embeddings/norms on GPU; blocks in order on GPU up to the budget; rest CPU")
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpm2", choices=sorted(T5_PRESETS))
    ap.add_argument("--layers", type=int, default=None, help="override encoder and decoder depth (smoke tests)")
    ap.add_argument("--memory-limit-gib", type=float, default=6.0)
    ap.add_argument("--extra-limits-gib", type=float, nargs="*", default=[],
                    help="further budgets to run bminf under (no accelerate comparison)")
    ap.add_argument("--reserve-mib", type=float, default=None, help="activation/KV reserve (default: bminf's policy)")
    ap.add_argument("--encode-length", type=int, default=256)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--accelerate-steps", type=int, default=3)
    ap.add_argument("--skip-resident", action="store_true")
    ap.add_argument("--skip-accelerate", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    device = torch.device("cuda", torch.cuda.current_device())
    cfg_kw = dict(T5_PRESETS[args.preset])
    if args.layers:
        cfg_kw.update(n_encoder_layers=args.layers, n_decoder_layers=args.layers)
    cfg = T5Config(**cfg_kw)
    limit = int(args.memory_limit_gib * GIB)
    reserve = None if args.reserve_mib is None else int(args.reserve_mib * (1 << 20))
    out = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "python": platform.python_version(),
           "settings": {"preset": args.preset, "config": cfg_kw, "memory_limit": limit, "reserve": reserve,
                        "encode_length": args.encode_length, "steps": args.steps, "batch": 1}}

    def save():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(out, f, indent=2)

    out["h2d_pinned_gb_per_s"] = h2d_bandwidth(device)
    print(f"device: {out['device']}  torch {torch.__version__}")
    print(f"pinned H2D: {out['h2d_pinned_gb_per_s']:.1f} GB/s")
    warm_up(device)
    out["kernels"] = kernel_figures(device, cfg)
    print(f"one-token linear {out['kernels']['shape']}: int8 path {out['kernels']['int8_linear_us']:.0f} us, "
          f"fp16 {out['kernels']['fp16_linear_us']:.0f} us")
    save()

    t = time.perf_counter()
    model = build(cfg, int8=True, device=device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    out["weights_bytes"] = weights
    print(f"built {args.preset} (int8 blocks): {weights / 1e9:.2f} GB of weights in {time.perf_counter() - t:.1f} s")

    if not args.skip_resident:
        model = wrapper(model, quantization=False, device=device)
        out["resident"] = decode(model, device, args.encode_length, args.steps)
        print(f"resident (no budget): {out['resident']['tokens_per_s']:.1f} tokens/s "
              f"(host {out['resident']['host_ms_per_token']:.1f} ms/token), "
              f"encode {out['resident']['encode_tokens_per_s']:.0f} tokens/s")
        model = unwrap_(model)
        gc.collect()
        save()

    h2d = out["h2d_pinned_gb_per_s"]
    for gib in [args.memory_limit_gib] + list(args.extra_limits_gib):
        model, res = run_bminf(model, device, int(gib * GIB), reserve, args)
        res["streaming_share_of_h2d"] = res["streaming_gb_per_s"] / h2d
        res["copy_only_ms_per_token"] = 1e3 * res["streamed_bytes_per_token"] / (h2d * 1e9)
        out["bminf" if gib == args.memory_limit_gib else f"bminf_{gib:g}gib"] = res
        print(f"bminf under {gib:g} GiB: resident blocks {res['resident_blocks']}, "
              f"peak {res['peak_allocated'] / GIB:.2f} GiB (limit {gib:.2f})")
        print(f"  decode {res['tokens_per_s']:.1f} tokens/s ({res['ms_per_token']:.1f} ms/token, host "
              f"{res['host_ms_per_token']:.1f}), streaming {res['streamed_bytes_per_token'] / 1e9:.2f} GB/token at "
              f"{res['streaming_gb_per_s']:.1f} GB/s = {100 * res['streaming_share_of_h2d']:.0f}% of pinned H2D; "
              f"copy alone {res['copy_only_ms_per_token']:.1f} ms/token, same placement without copies "
              f"{res['no_copy_ms_per_token']:.1f} ms/token")
        print(f"  encode {res['encode_tokens_per_s']:.0f} tokens/s")
        if gib == args.memory_limit_gib:
            main_res = res
        model = unwrap_(model)
        torch.cuda.empty_cache()
        save()
    res = main_res
    if not args.skip_resident:  # again, after everything else: the first figure may be a cold one
        model = wrapper(model, quantization=False, device=device)
        out["resident_again"] = decode(model, device, args.encode_length, args.steps)
        print(f"resident again: {out['resident_again']['tokens_per_s']:.1f} tokens/s "
              f"(host {out['resident_again']['host_ms_per_token']:.1f} ms/token)")
        model = unwrap_(model)
        save()
    del model
    gc.collect()
    torch.cuda.empty_cache()

    if not args.skip_accelerate:
        try:
            import accelerate
            out["accelerate"] = run_accelerate(cfg, device, limit, reserve if reserve is not None else res["reserve"][0], args)
            out["accelerate"]["version"] = accelerate.__version__
            out["speedup_vs_accelerate"] = res["tokens_per_s"] / out["accelerate"]["tokens_per_s"]
            a = out["accelerate"]
            print(f"accelerate {accelerate.__version__} dispatch_model (fp16, CPU offload, {a['gpu_blocks']} blocks on GPU): "
                  f"{a['tokens_per_s']:.2f} tokens/s, peak {a['peak_allocated'] / GIB:.2f} GiB")
            print(f"bminf / accelerate: {out['speedup_vs_accelerate']:.1f}x")
        except Exception as e:  # keep bminf's figures even if the baseline breaks
            out["accelerate_error"] = f"{type(e).__name__}: {e}"
            print(f"accelerate failed: {out['accelerate_error']}")
        save()


if __name__ == "__main__":
    main()
