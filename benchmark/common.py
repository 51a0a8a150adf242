"""What the encoder and decoder benchmarks of CPM-1, CPM-2 and EVA share: random models of the real
sizes (ours int8, HF transformers fp16), the ceilings of the machine, timing and the report.

The scripts (``python -m benchmark.cpm2.decoder`` etc., from the repository root) time, as BMInf's
``benchmark/{cpm1,cpm2}/{encoder,decoder}.py`` did: the encoder over L = 256 tokens, and 255
incremental decoder steps against a 256-token encoder output (CPM-1: a 256-token prompt). Unlike
the original, a step includes the LM head and the greedy argmax (what generation runs), and the
first decoder step (which projects the cross-attention keys/values, run eagerly) is reported on
its own. Peers run in the same process on the same shapes: HF transformers fp16 eager, resident;
under ``--memory-limit``, bminf's streaming against accelerate's ``dispatch_model`` (fp16, CPU
offload, the same budget).
"""
import argparse
import gc
import json
import math
import os
import platform
import time
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn

from bminf.kernels import compile_ahead
from bminf.models.gpt import GPT, GPT_PRESETS, GPTConfig
from bminf.models.t5 import T5, T5_PRESETS, T5Config
from bminf.quantization import quantize_

GIB = 1 << 30
PRESETS = {"cpm1": ("gpt", GPT_PRESETS["cpm1"]), "cpm2": ("t5", T5_PRESETS["cpm2"]), "eva": ("t5", T5_PRESETS["eva"])}
# --tiny: the same code paths on a small model (smoke tests on a CPU)
TINY = {"gpt": dict(vocab_size=500, d_model=64, d_ff=128, n_heads=4, d_head=16, n_layers=2),
        "t5": dict(vocab_size=500, d_model=64, d_ff=96, n_heads=4, d_head=16, n_encoder_layers=2, n_decoder_layers=2)}


def parser(doc: str, decoder: bool) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, nargs="*", default=[1] if decoder else [1, 8])
    ap.add_argument("--input-length", "--encode-length", dest="input_length", type=int, default=256)
    if decoder:
        ap.add_argument("--decode-length", type=int, default=255)
        ap.add_argument("--peer-steps", type=int, default=32, help="decode steps timed for HF (slow: fewer)")
        ap.add_argument("--memory-limit", type=str, nargs="*", default=[],
                        help="GPU budgets (e.g. 6GiB 3GiB): bminf streaming vs accelerate dispatch_model")
        ap.add_argument("--accelerate-steps", type=int, default=3)
        ap.add_argument("--no-graphs", action="store_true", help="bminf eager (no CUDA graphs)")
    ap.add_argument("--cases", type=int, default=3)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="a small model of the same type (smoke test)")
    ap.add_argument("--json", default=None, help="write the results here")
    return ap


def config(preset: str, tiny: bool):
    kind, kw = PRESETS[preset]
    kw = {**kw, **(TINY[kind] if tiny else {})}
    return kind, (GPTConfig(**kw) if kind == "gpt" else T5Config(**kw))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


# -- machine ----------------------------------------------------------------------------------------
def machine(device: torch.device) -> dict:
    """The device, versions, and the ceilings measured now: HBM read (``hbm_read``) and pinned
    host-to-device GB/s."""
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    try:
        import triton
        info["triton"] = triton.__version__
        info["triton_cache"] = triton_cache()
    except ImportError:
        pass
    if device.type != "cuda":
        info.update(gpu="cpu", hbm_read_gb_per_s=float("nan"), h2d_pinned_gb_per_s=float("nan"))
        return info
    info["gpu"] = torch.cuda.get_device_name(device)
    try:
        from . import hbm_read
    except ImportError:  # run as a script, benchmark/ on the path
        import hbm_read
    reads = hbm_read.gb_per_s(device)
    info["hbm_read_gb_per_s"] = reads["best"]
    info["hbm_read_sum_gb_per_s"] = reads["sum"]  # the only reader before run 104: 7-9% below the best
    src = torch.empty(GIB, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(GIB, dtype=torch.uint8, device=device)
    info["h2d_pinned_gb_per_s"] = GIB / best_of(lambda: dst.copy_(src, non_blocking=True), device, 3) / 1e9
    del src, dst
    a = torch.randn(8192, 8192, device=device, dtype=torch.float16)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 1.0:  # working clocks before anything is timed
        a @ a
        sync(device)
    return info


def triton_cache() -> dict:
    """Triton's kernel cache as the run starts: its folder and how many compiled kernels it holds.
    A first call's figure depends on it (0: every kernel compiles during that call)."""
    import triton
    folder = getattr(getattr(triton, "knobs", None), "cache", None)
    folder = folder.dir if folder is not None else os.environ.get(
        "TRITON_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".triton", "cache"))
    kernels = sum(name.endswith(".cubin") or name.endswith(".hsaco")
                  for _, _, names in os.walk(folder) for name in names)
    return {"dir": folder, "kernels": kernels}


def best_of(fn: Callable, device: torch.device, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def peak_reset(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


# -- models -----------------------------------------------------------------------------------------
def fill_random_(model: nn.Module, gen_device: torch.device, home: torch.device, dtype: torch.dtype) -> nn.Module:
    """Random weights, generated on ``gen_device`` (fast) and stored on ``home``: int8 uniform with
    scales that give rows of std ~1/sqrt(d_in), float N(0, 1/sqrt(d_in)) matrices, unit norm gains."""
    g = torch.Generator(device=gen_device).manual_seed(0)
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            if p.dtype == torch.int8:
                data = torch.randint(-127, 128, p.shape, dtype=torch.int8, device=gen_device, generator=g)
            elif name == "scale":  # int8 uniform has std ~73
                data = torch.full(p.shape, 1 / (73 * math.sqrt(mod.in_features)), dtype=dtype, device=gen_device)
            elif p.dim() == 1:
                data = torch.ones(p.shape, dtype=dtype, device=gen_device)
            else:
                std = 0.1 if min(p.shape) <= 64 else 1 / math.sqrt(p.shape[-1])
                data = (torch.randn(p.shape, device=gen_device, generator=g) * std).to(dtype)
            mod._parameters[name] = nn.Parameter(data.to(home), requires_grad=False)
    return model.eval()


def build_ours(preset: str, tiny: bool, device: torch.device, home: Optional[torch.device] = None) -> nn.Module:
    """Our backbone, int8 linears, random weights, on ``home`` (default: ``device``)."""
    kind, cfg = config(preset, tiny)
    compile_ahead.set_up_in_background(device)  # as the model classes do when they load a checkpoint
    with torch.device("meta"):
        model = quantize_(GPT(cfg) if kind == "gpt" else T5(cfg))
    return fill_random_(model, device, home or device, torch.float16 if device.type == "cuda" else torch.float32)


def graphed_model(ap: argparse.ArgumentParser, args: argparse.Namespace, purpose: str):
    """``(device, kind, cfg, model)`` for a script that times or profiles graphed decode steps of
    ``--preset`` (``--tiny``) on ``--device``: our backbone with random weights; refused (``ap.error``,
    naming ``purpose``) unless that device is a CUDA GPU."""
    device = torch.device(args.device)
    if device.type != "cuda" or not torch.cuda.is_available():
        ap.error(f"--device {args.device}: {purpose}; it needs a CUDA device")
    kind, cfg = config(args.preset, args.tiny)
    return device, kind, cfg, build_ours(args.preset, args.tiny, device)


def build_hf(preset: str, tiny: bool, device: torch.device, home: Optional[torch.device] = None) -> nn.Module:
    """HF transformers' model of the same shape (GPT2LMHeadModel / T5ForConditionalGeneration), fp16."""
    kind, c = config(preset, tiny)
    if kind == "gpt":
        from transformers import GPT2Config, GPT2LMHeadModel
        hf_cfg = GPT2Config(vocab_size=c.vocab_size, n_positions=c.max_positions, n_embd=c.d_model, n_layer=c.n_layers,
                            n_head=c.n_heads, n_inner=c.d_ff, activation_function="gelu_new",
                            layer_norm_epsilon=c.eps, bos_token_id=0, eos_token_id=0)
        cls = GPT2LMHeadModel
    else:
        from transformers import T5Config as HFT5Config, T5ForConditionalGeneration
        hf_cfg = HFT5Config(vocab_size=c.vocab_size, d_model=c.d_model, d_kv=c.d_head, d_ff=c.d_ff,
                            num_layers=c.n_encoder_layers, num_decoder_layers=c.n_decoder_layers, num_heads=c.n_heads,
                            relative_attention_num_buckets=c.num_buckets, relative_attention_max_distance=c.max_distance,
                            feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        cls = T5ForConditionalGeneration
    with torch.device("meta"):
        hf = cls(hf_cfg)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    seen = {}  # tied weights (shared embeddings) stay tied
    g = torch.Generator(device=device).manual_seed(1)
    for mod in hf.modules():
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            if id(p) not in seen:
                std = 1.0 if p.dim() == 1 else 1 / math.sqrt(p.shape[-1])
                data = torch.ones(p.shape, device=device) if p.dim() == 1 else \
                    torch.randn(p.shape, device=device, generator=g) * std
                seen[id(p)] = nn.Parameter(data.to(dtype).to(home or device), requires_grad=False)
            mod._parameters[name] = seen[id(p)]
    return hf.eval()


def free(*models) -> None:
    for m in models:
        del m
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- report -----------------------------------------------------------------------------------------
def report(results: dict, path: Optional[str]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=1, default=str)


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a and b else None


def header(results: dict, preset: str, cfg) -> None:
    m = results["machine"]
    print(f"{preset}: {m['gpu']} ({m['device']}), torch {m['torch']}, triton {m.get('triton')}; "
          f"HBM read {m['hbm_read_gb_per_s']:.0f} GB/s (t.sum(): {m.get('hbm_read_sum_gb_per_s', 0):.0f}), "
          f"pinned H2D {m['h2d_pinned_gb_per_s']:.1f} GB/s")
    if "triton_cache" in m:
        cache = m["triton_cache"]
        print(f"  Triton's cache {cache['dir']}: {cache['kernels']} compiled kernels at the start"
              + (" (empty: the first call compiles every kernel)" if not cache["kernels"] else ""))
    print(f"  config: {cfg}")


def run_peer(results: Dict, name: str, fn: Callable) -> None:
    """Run a peer, keeping our figures if it breaks."""
    try:
        results[name] = fn()
    except Exception as e:  # a peer's failure (version, memory) must not lose our numbers
        results[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(f"  {name} failed: {results[name]['error']}")
