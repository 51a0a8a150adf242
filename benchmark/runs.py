"""The encoder and decoder benchmarks behind ``benchmark/{cpm1,cpm2,eva}/{encoder,decoder}.py``."""
import dataclasses
import os
import time
from typing import Optional

import torch
import torch.nn as nn

from bminf import wrapper
from bminf.generation.graphs import GraphedDecoder
from bminf.units import parse_size

from .common import (GIB, build_hf, build_ours, config, free, header, machine, nbytes, parser, peak, peak_reset,
                     ratio, report, run_peer, sync)


def _ids(batch: int, length: int, vocab: int, device: torch.device) -> torch.Tensor:
    return torch.randint(2, vocab, (batch, length), generator=torch.Generator().manual_seed(0)).to(device)


def _mean_s(fn, device: torch.device, cases: int) -> float:
    fn()  # one untimed warm-up call, as the original
    total = 0.0
    for _ in range(cases):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        total += time.perf_counter() - t
    return total / cases


# -- encoder ----------------------------------------------------------------------------------------
def encoder_main(preset: str, doc: str) -> None:
    args = parser(doc, decoder=False).parse_args()
    device = torch.device(args.device)
    kind, cfg = config(preset, args.tiny)
    res = {"benchmark": f"{preset}/encoder", "machine": machine(device), "settings": vars(args),
           "config": dataclasses.asdict(cfg)}
    header(res, preset, cfg)
    L = args.input_length

    def run(name, model, encode, weight_bytes):
        res[name] = {}
        for b in args.batch_size:
            ids = _ids(b, L, cfg.vocab_size, device)
            mask = torch.ones_like(ids, dtype=torch.bool)
            peak_reset(device)
            with torch.no_grad():
                s = _mean_s(lambda: encode(model, ids, mask), device, args.cases)
            r = {"batch": b, "seconds": s, "tokens_per_s": b * L / s, "weights_gb_per_s": weight_bytes / s / 1e9,
                 "peak_bytes": peak(device)}
            res[name][str(b)] = r
            print(f"  {name:10s} batch {b:3d} x {L}: {r['tokens_per_s']:9.0f} tokens/s ({1e3 * s:7.2f} ms, "
                  f"weights {r['weights_gb_per_s']:6.0f} GB/s), peak {r['peak_bytes'] / GIB:.2f} GiB")

    model = build_ours(preset, args.tiny, device)
    stack = model.layers if kind == "gpt" else model.enc_layers
    ours_encode = (lambda m, i, k: m.hidden_states(i, k)) if kind == "gpt" else (lambda m, i, k: m.encode(i, k))
    if kind == "t5":  # what the generation loop runs: the encoder replayed from a CUDA graph
        decoders = {}

        def graphed_encode(m, i, k):
            if i.shape[0] not in decoders:
                decoders[i.shape[0]] = GraphedDecoder(m, i.shape[0], max_length=1, max_source_length=i.shape[1])
            return decoders[i.shape[0]].encode(i, k)
        run("bminf", model, graphed_encode, nbytes(stack.parameters()))
        decoders.clear()
        run("bminf_eager", model, ours_encode, nbytes(stack.parameters()))
    else:
        run("bminf", model, ours_encode, nbytes(stack.parameters()))
    # the opt-in W8A8 path (activations rounded to int8 too): speed, and how far its output moves
    ids = _ids(1, L, cfg.vocab_size, device)
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        exact = ours_encode(model, ids, mask).float()
        os.environ["BMINF_PREFILL"] = "w8a8"
        try:
            moved = ours_encode(model, ids, mask).float()
            run("bminf_w8a8", model, ours_encode, nbytes(stack.parameters()))
        finally:
            os.environ.pop("BMINF_PREFILL")
    res["w8a8_output_rel_err"] = float((moved - exact).abs().max() / exact.abs().max())
    print(f"  W8A8 output vs weight-only: max relative difference {res['w8a8_output_rel_err']:.4f}")
    free(model)
    del model, stack
    if not args.no_peers:
        def hf_run():
            hf = build_hf(preset, args.tiny, device)
            body = hf.transformer if kind == "gpt" else hf.encoder
            blocks = body.h if kind == "gpt" else body.block
            run("hf_fp16", hf, lambda m, i, k: body(input_ids=i, attention_mask=k), nbytes(blocks.parameters()))
            return res["hf_fp16"]
        run_peer(res, "hf_fp16", hf_run)
        free()
        for name in ("bminf", "bminf_eager", "bminf_w8a8"):
            if name not in res:
                continue
            for b in args.batch_size:
                x = ratio(res[name][str(b)]["tokens_per_s"], res["hf_fp16"].get(str(b), {}).get("tokens_per_s"))
                res.setdefault(f"speedup_vs_hf_fp16{name[5:]}", {})[str(b)] = x
                if x:
                    print(f"  batch {b}: {name} / HF fp16 eager = {x:.2f}x")
    report(res, args.json)


# -- decoder ----------------------------------------------------------------------------------------
def _step_bytes(model: nn.Module, kind: str, cfg, batch: int, context: float, source: int) -> float:
    """Bytes a decode step must read: decoder weights (not T5's cross-attention K/V projections,
    which run once per prompt), the LM head, and the KV caches at the given mean context length."""
    if kind == "gpt":
        weights = nbytes(model.layers.parameters()) + nbytes([model.token_embedding.weight])
        kv = 2 * cfg.n_layers * batch * cfg.n_heads * context * cfg.d_head * 2
    else:
        skip = {id(p) for b in model.dec_layers for p in (*b.cross_attn.project_k.parameters(),
                                                          *b.cross_attn.project_v.parameters())}
        weights = nbytes(p for p in model.dec_layers.parameters() if id(p) not in skip)
        weights += nbytes([model.output_embedding.weight])
        kv = 2 * cfg.n_decoder_layers * batch * cfg.n_heads * (context + source) * cfg.d_head * 2
    return weights + kv


def _decode_case(runner, kind: str, ids: torch.Tensor, steps: int, device: torch.device) -> dict:
    """Prompt pass (GPT prefill / T5 encode + first step) then ``steps`` greedy one-token steps."""
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        sync(device)
        t0 = time.perf_counter()
        logits, step = runner(ids, mask)
        tok = logits[:, -1:].argmax(-1)
        sync(device)
        t1 = time.perf_counter()
        for _ in range(steps):
            tok = step(tok)[:, -1:].argmax(-1)
        host = time.perf_counter() - t1
        sync(device)
        t2 = time.perf_counter()
    return {"prompt_s": t1 - t0, "steps": steps, "steps_s": t2 - t1, "ms_per_step": 1e3 * (t2 - t1) / steps,
            "host_ms_per_step": 1e3 * host / steps, "tokens_per_s": ids.shape[0] * steps / (t2 - t1),
            "total_s": t2 - t0}


def _ours_runner(dec: GraphedDecoder, kind: str):
    if kind == "gpt":
        def runner(ids, mask):
            cache = dec.new_cache()
            return dec(ids, attention_mask=mask, cache=cache), lambda tok: dec(tok, cache=cache)
    else:
        def runner(ids, mask):
            enc, cache = dec.encode(ids, mask), dec.new_cache(mask)
            start = torch.zeros(ids.shape[0], 1, dtype=torch.long, device=ids.device)
            return dec.decode(start, enc, cache=cache), lambda tok: dec.decode(tok, cache=cache)
    return runner


def step_ms(dec: GraphedDecoder, kind: str, ids: torch.Tensor, mask: torch.Tensor, steps: int, repeats: int = 1):
    """``(ms, step, token)``: ``dec``'s prompt and three untimed steps (graphs captured, kernels compiled),
    then ``steps`` greedy decode steps timed ``repeats`` times, the best ms per step; ``step`` and the
    last ``token`` continue from there. Call it under ``torch.no_grad()``."""
    logits, step = _ours_runner(dec, kind)(ids, mask)
    tok = logits[:, -1:].argmax(-1)
    for _ in range(3):
        tok = step(tok)[:, -1:].argmax(-1)
    best = float("inf")
    for _ in range(repeats):
        sync(ids.device)
        t = time.perf_counter()
        for _ in range(steps):
            tok = step(tok)[:, -1:].argmax(-1)
        sync(ids.device)
        best = min(best, 1e3 * (time.perf_counter() - t) / steps)
    return best, step, tok


def _eager_runner(model: nn.Module, kind: str, max_length: int):
    if kind == "gpt":
        def runner(ids, mask):
            cache = model.new_cache(ids.shape[0], max_length)
            return model(ids, attention_mask=mask, cache=cache), lambda tok: model(tok, cache=cache)
    else:
        def runner(ids, mask):
            enc, cache = model.encode(ids, mask), model.new_cache(mask, max_length)
            start = torch.zeros(ids.shape[0], 1, dtype=torch.long, device=ids.device)
            return model.decode(start, enc, cache=cache), lambda tok: model.decode(tok, cache=cache)
    return runner


def _hf_runner(hf: nn.Module, kind: str):
    if kind == "gpt":
        def runner(ids, mask):
            out = hf(input_ids=ids, attention_mask=mask, use_cache=True)
            state = {"pkv": out.past_key_values}

            def step(tok):
                o = hf(input_ids=tok, past_key_values=state["pkv"], use_cache=True)
                state["pkv"] = o.past_key_values
                return o.logits
            return out.logits, step
    else:
        from transformers.modeling_outputs import BaseModelOutput

        def runner(ids, mask):
            enc = BaseModelOutput(last_hidden_state=hf.encoder(input_ids=ids, attention_mask=mask).last_hidden_state)
            start = torch.zeros(ids.shape[0], 1, dtype=torch.long, device=ids.device)
            out = hf(encoder_outputs=enc, attention_mask=mask, decoder_input_ids=start, use_cache=True)
            state = {"pkv": out.past_key_values}

            def step(tok):
                o = hf(encoder_outputs=enc, attention_mask=mask, decoder_input_ids=tok,
                       past_key_values=state["pkv"], use_cache=True)
                state["pkv"] = o.past_key_values
                return o.logits
            return out.logits, step
    return runner


def _streamed_bytes(model: nn.Module) -> int:
    """Bytes copied host -> device so far. Lists placed together share one streamer per device, so
    each device's counter is taken once, not once per list."""
    lists = [getattr(model, n) for n in ("layers", "enc_layers", "dec_layers") if hasattr(model, n)]
    per_device = {dev: b for lst in lists for dev, (_, b) in getattr(lst, "streamer_stats", {}).items()}
    return sum(per_device.values())


def _accelerate(preset, args, kind, device, limit, reserve, ids, steps):
    """HF fp16 on the host, dispatched by accelerate: non-block modules and the first blocks that fit
    ``limit - reserve`` on the GPU, the rest offloaded to the CPU (moved in at every call)."""
    import accelerate
    from accelerate import dispatch_model
    hf = build_hf(preset, args.tiny, device, home=torch.device("cpu"))
    nested = {n for n, m in hf.named_modules() if isinstance(m, nn.ModuleList)}
    lists = {n for n in nested if not any(n.startswith(o + ".") for o in nested)}  # the block lists
    device_map, seen = {}, {}
    for name, mod in hf.named_modules(remove_duplicate=False):
        if not name or any(name == lst or name.startswith(lst + ".") for lst in lists):
            continue
        if any(True for _ in mod.parameters(recurse=False)):
            device_map[name] = device.index or 0
            seen.update((id(p), p) for p in mod.parameters(recurse=False))
    used = nbytes(seen.values())  # tied embeddings once
    gpu_blocks = 0
    for lst in sorted(lists):
        for i, block in enumerate(hf.get_submodule(lst)):
            size = nbytes(block.parameters())
            on_gpu = used + size <= limit - reserve
            device_map[f"{lst}.{i}"] = (device.index or 0) if on_gpu else "cpu"
            used, gpu_blocks = used + (size if on_gpu else 0), gpu_blocks + on_gpu
    peak_reset(device)
    hf = dispatch_model(hf, device_map=device_map)
    r = _decode_case(_hf_runner(hf, kind), kind, ids, steps, device)
    r.update(version=accelerate.__version__, gpu_blocks=gpu_blocks, peak_bytes=peak(device), dtype="float16",
             reserve=reserve)
    free(hf)
    return r


def decoder_main(preset: str, doc: str) -> None:
    args = parser(doc, decoder=True).parse_args()
    device = torch.device(args.device)
    kind, cfg = config(preset, args.tiny)
    m = machine(device)
    res = {"benchmark": f"{preset}/decoder", "machine": m, "settings": vars(args), "config": dataclasses.asdict(cfg)}
    header(res, preset, cfg)
    L, steps = args.input_length, args.decode_length - 1
    # T5: the self-attention cache holds the decoded tokens; GPT: the prompt too
    max_length = args.decode_length + (L if kind == "gpt" else 0)
    context = (L if kind == "gpt" else 0) + args.decode_length / 2
    source = 0 if kind == "gpt" else L
    hbm = m["hbm_read_gb_per_s"] * 1e9

    def show(name, r, b, step_bytes=None):
        extra = ""
        if step_bytes:
            r["gb_per_s"] = step_bytes * r["steps"] / r["steps_s"] / 1e9
            r["floor_tokens_per_s"] = b * hbm / step_bytes
            r["share_of_floor"] = r["tokens_per_s"] / r["floor_tokens_per_s"]
            extra = f", {r['gb_per_s']:.0f} GB/s = {100 * r['share_of_floor']:.0f}% of the HBM floor " \
                    f"({r['floor_tokens_per_s']:.0f} tokens/s)"
        print(f"  {name:24s} batch {b:3d}: {r['tokens_per_s']:8.1f} tokens/s ({r['ms_per_step']:.2f} ms/step, "
              f"host {r['host_ms_per_step']:.2f}){extra}, prompt {1e3 * r['prompt_s']:.0f} ms, "
              f"peak {r.get('peak_bytes', 0) / GIB:.2f} GiB")

    # resident: CUDA graphs (first call cold, then warm), eager for reference
    t = time.perf_counter()
    model = build_ours(preset, args.tiny, device)
    res["load_s"] = time.perf_counter() - t
    res["weights_bytes"] = nbytes(model.parameters())
    for b in args.batch_size:
        ids = _ids(b, L, cfg.vocab_size, device)
        step_bytes = _step_bytes(model, kind, cfg, b, context, source)
        peak_reset(device)
        t = time.perf_counter()
        dec = GraphedDecoder(model, b, max_length, max_source_length=max(L, 1), use_graphs=False if args.no_graphs else None)
        cold = _decode_case(_ours_runner(dec, kind), kind, ids, steps, device)
        cold["construct_s"] = time.perf_counter() - t - cold["total_s"]
        cold["capture_s"] = dec.capture_s
        warm = [_decode_case(_ours_runner(dec, kind), kind, ids, steps, device) for _ in range(args.cases)]
        best = max(warm, key=lambda r: r["tokens_per_s"])
        best.update(peak_bytes=peak(device), graphs=dec.use_graphs,
                    first_call_s=cold["total_s"] + cold["construct_s"], warm_call_s=best["total_s"])
        best["first_call_extra_s"] = best["first_call_s"] - best["warm_call_s"]
        res.setdefault("bminf", {})[str(b)] = best
        res.setdefault("bminf_cold", {})[str(b)] = cold
        show("bminf" + (" (CUDA graphs)" if dec.use_graphs else " (eager)"), best, b, step_bytes)
        print(f"    first call after loading {best['first_call_s']:.2f} s (graph capture {cold['capture_s']:.2f} s), "
              f"warm call {best['warm_call_s']:.2f} s: +{best['first_call_extra_s']:.2f} s")
        del dec
        free()
        if b == args.batch_size[0] and not args.no_peers:
            eager = _decode_case(_eager_runner(model, kind, max_length), kind, ids, min(steps, args.peer_steps), device)
            res.setdefault("bminf_eager", {})[str(b)] = eager
            show("bminf eager (no graphs)", eager, b, step_bytes)
    if len(args.batch_size) > 1:
        b0, b1 = str(args.batch_size[0]), str(args.batch_size[-1])
        res["batch_scaling"] = res["bminf"][b1]["tokens_per_s"] / res["bminf"][b0]["tokens_per_s"]
        print(f"  batch {b1} / batch {b0} throughput: {res['batch_scaling']:.1f}x")
    free(model)
    del model
    report(res, args.json)

    if not args.no_peers:
        def hf_resident():
            hf = build_hf(preset, args.tiny, device)
            out = {}
            for b in args.batch_size[:1]:
                peak_reset(device)
                ids = _ids(b, L, cfg.vocab_size, device)
                _decode_case(_hf_runner(hf, kind), kind, ids, 2, device)  # warm-up
                r = _decode_case(_hf_runner(hf, kind), kind, ids, min(steps, args.peer_steps), device)
                r["peak_bytes"] = peak(device)
                out[str(b)] = r
                show("HF transformers fp16", r, b)
            free(hf)
            return out
        run_peer(res, "hf_fp16", hf_resident)
        b = str(args.batch_size[0])
        res["speedup_vs_hf_fp16"] = ratio(res["bminf"][b]["tokens_per_s"], res["hf_fp16"].get(b, {}).get("tokens_per_s"))
        if res["speedup_vs_hf_fp16"]:
            print(f"  bminf / HF fp16 eager (batch {b}): {res['speedup_vs_hf_fp16']:.1f}x")
        report(res, args.json)

    # under a memory budget: bminf streams blocks from pinned memory (eager: no graphs), accelerate offloads
    for text in args.memory_limit:
        limit = parse_size(text, "memory_limit")
        ids = _ids(1, L, cfg.vocab_size, device)
        model = build_ours(preset, args.tiny, device, home=torch.device("cpu"))
        step_bytes = _step_bytes(model, kind, cfg, 1, context, source)
        peak_reset(device)
        # the budget counts every tensor of the process: what earlier cases left alive streams more blocks
        in_use = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        model = wrapper(model, quantization=False, device=device, memory_limit=limit)
        dec = GraphedDecoder(model, 1, max_length, max_source_length=max(L, 1))
        _decode_case(_ours_runner(dec, kind), kind, ids, 2, device)  # warm-up
        before = _streamed_bytes(model)
        r = _decode_case(_ours_runner(dec, kind), kind, ids, min(steps, args.peer_steps), device)
        streamed = _streamed_bytes(model) - before
        r.update(peak_bytes=peak(device), memory_limit=limit, graphs=dec.use_graphs, in_use_before_bytes=in_use)
        # the prompt pass streams too: count the steps' share by subtracting a prompt-only run
        before = _streamed_bytes(model)
        _decode_case(_ours_runner(dec, kind), kind, ids, 1, device)
        per_prompt = _streamed_bytes(model) - before
        per_step = max(streamed - per_prompt, 0) / max(r["steps"] - 1, 1)
        floor_s = max(per_step / (m["h2d_pinned_gb_per_s"] * 1e9), step_bytes / hbm)
        r.update(streamed_bytes_per_step=per_step, floor_tokens_per_s=1 / floor_s,
                 share_of_floor=r["tokens_per_s"] * floor_s,
                 streaming_gb_per_s=per_step * r["steps"] / r["steps_s"] / 1e9)
        res.setdefault("bminf_offload", {})[text] = r
        show(f"bminf under {text}", r, 1)
        print(f"    streamed {per_step / 1e9:.2f} GB/step at {r['streaming_gb_per_s']:.1f} GB/s; floor "
              f"{r['floor_tokens_per_s']:.1f} tokens/s ({100 * r['share_of_floor']:.0f}% reached); "
              f"{in_use / GIB:.2f} GiB in use before placement")
        del dec, model
        free()
        if not args.no_peers:
            reserve = max(512 << 20, limit // 8)
            run_peer(res, f"accelerate_{text}", lambda: _accelerate(preset, args, kind, device, limit, reserve, ids,
                                                                    args.accelerate_steps))
            a = res[f"accelerate_{text}"]
            if "tokens_per_s" in a:
                show(f"accelerate under {text}", a, 1)
                r["speedup_vs_accelerate"] = r["tokens_per_s"] / a["tokens_per_s"]
                print(f"    bminf / accelerate under {text}: {r['speedup_vs_accelerate']:.1f}x")
            free()
        report(res, args.json)
    report(res, args.json)
