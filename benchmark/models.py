"""CPM-1, CPM-2 and EVA at their real sizes (random int8 weights) through the model classes.

Each model is written in BMInf's released layout (``checkpoint.pt`` + a ``vocab.txt`` of the real
size), loaded the way users load it (``bminf.models.CPM2(version=DIR, memory_limit=...)``), and asked
for tokens; the script prints load time, decode tokens/s and peak GPU memory against the budget,
the time to the first token (the prompt pass and one token: the best of three calls) and the rate
after it. ``--compare-waiting`` times the call again with the decode loop waiting for each token on
the host before it launches the next step (the releases before; see ``bminf.generation.loop``).
The weights are random, so the text is noise: this checks sizes, memory and speed, not quality.

    python benchmark/models.py --models cpm1 eva cpm2 --cpm2-memory-limit 6GiB --json out.json
"""
import argparse
import contextlib
import functools
import gc
import json
import os
import tempfile
import time

import torch

import bminf
from bminf.checkpoint import save_model
from bminf.demo import path as demo_path
from bminf.units import parse_size
from bminf.generation import loop
from bminf.models import pretrained
from common import build_ours

_steps = [0]
_draw = loop.draw


def _counting_draw(*args, **kwargs):
    _steps[0] += 1  # one call per generated token of the batch
    return _draw(*args, **kwargs)


loop.draw = _counting_draw

# sampling: greedy by default; --temperature samples with a fixed seed, so that both loops draw the same text
SAMPLING = dict(temperature=0)
TASKS = {
    "cpm1": lambda m, n: m.generate("天空是蔚蓝色，窗外有", max_tokens=n, **SAMPLING),
    "cpm2": lambda m, n: m.fill_blank("北京环球影城指定单日门票将采用<span>制度", max_tokens=n, **SAMPLING),
    "eva": lambda m, n: m.dialogue(["你好", "推荐一本书"], max_tokens=n, **SAMPLING),
}
CLASSES = {"cpm1": "CPM1", "cpm2": "CPM2", "eva": "EVA"}


def write_vocab(kind: str, size: int, path: str) -> None:
    """A vocab of the real size: the demo's Chinese pieces, filler, and (T5) the 190 sentinels last."""
    with open(os.path.join(demo_path(f"{kind}-demo"), "vocab.txt"), encoding="utf-8") as f:
        pieces = [line.strip() for line in f if line.strip() and not line.startswith("<s_")]
    sentinels = [] if kind == "cpm1" else [f"<s_{i}>" for i in range(190)]
    filler = [f"<unused_{i}>" for i in range(size - len(pieces) - len(sentinels))]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(pieces + filler + sentinels) + "\n")


def make_checkpoint(kind: str, directory: str, device: torch.device) -> int:
    # random int8 weights generated on ``device`` (fast on a GPU), kept in host memory for saving
    model = build_ours(kind, tiny=False, device=device, home=torch.device("cpu"))
    path = save_model(model, directory, format="bminf")
    write_vocab(kind, model.config.vocab_size, os.path.join(directory, "vocab.txt"))
    del model
    gc.collect()
    return os.path.getsize(path)


def timed(kind: str, model, tokens: int, device: torch.device):
    """(seconds, tokens generated, result) of one task call of ``tokens`` tokens."""
    torch.cuda.synchronize(device)
    _steps[0] = 0
    start = time.perf_counter()
    result = TASKS[kind](model, tokens)
    torch.cuda.synchronize(device)
    return time.perf_counter() - start, _steps[0], result


@contextlib.contextmanager
def _waiting():
    # the model classes call pretrained.decode; run_ahead=False is the loop of the releases before
    plain = pretrained.decode
    pretrained.decode = functools.partial(plain, run_ahead=False)
    try:
        yield
    finally:
        pretrained.decode = plain


def run(kind: str, root: str, device: torch.device, limit, tokens: int, compare_waiting: bool = False) -> dict:
    directory = os.path.join(root, kind)
    start = time.perf_counter()
    size = make_checkpoint(kind, directory, device)
    written = time.perf_counter() - start
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    model = getattr(bminf.models, CLASSES[kind])(version=directory, device=device, memory_limit=limit)
    loaded = time.perf_counter() - start
    first = time.perf_counter()
    TASKS[kind](model, 4)  # warm-up: first kernel launches, jieba
    first = time.perf_counter() - first
    # untimed: a call of the timed size, which makes (and keeps) a decoder of its length and its graphs, as a
    # user's earlier call of that size would have
    TASKS[kind](model, tokens)
    first_token = min(timed(kind, model, 1, device)[0] for _ in range(3))  # the prompt pass and one token
    ahead, waiting = [], []
    for _ in range(2 if compare_waiting else 1):  # alternated, the best of each
        ahead.append(timed(kind, model, tokens, device))
        if compare_waiting:  # the loop waiting for each token on the host before the next step
            with _waiting():
                waiting.append(timed(kind, model, tokens, device))
    elapsed, steps, text = min(ahead, key=lambda r: r[0])
    peak = torch.cuda.max_memory_allocated(device)
    row = dict(model=kind, checkpoint_bytes=size, write_s=round(written, 1), load_s=round(loaded, 1),
               first_call_s=round(first, 2), first_token_s=round(first_token, 4), decode_s=round(elapsed, 3),
               tokens=steps, tokens_per_s=round(steps / elapsed, 1),
               after_first_tokens_per_s=round((steps - 1) / (elapsed - first_token), 1),
               peak_gib=round(peak / 2**30, 3), memory_limit_gib=None if limit is None else round(limit / 2**30, 3),
               under_limit=None if limit is None else peak <= limit,
               streamed_blocks=[len(getattr(lst, "streamed_blocks", [])) for lst in
                                (getattr(model.backbone, n, None) for n in ("layers", "enc_layers", "dec_layers"))
                                if lst is not None])
    if compare_waiting:
        waited, waited_steps, _ = min(waiting, key=lambda r: r[0])
        row.update(waiting_decode_s=round(waited, 3), waiting_tokens=waited_steps,
                   waiting_tokens_per_s=round(waited_steps / waited, 1),
                   # the step ahead must not change what is drawn: greedy, or sampled from the same seed
                   same_text=all(r[2] == text for r in ahead + waiting))
    print(json.dumps(row, ensure_ascii=False), flush=True)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    os.remove(os.path.join(directory, "checkpoint.pt"))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["cpm1", "eva", "cpm2"], choices=list(TASKS))
    parser.add_argument("--cpm2-memory-limit", default="6GiB", help="a size, or 'none' (resident)")
    parser.add_argument("--tokens", type=int, default=32, help="max_tokens of the timed call")
    parser.add_argument("--temperature", type=float, default=0,
                        help="0 (default) is greedy; above 0 samples from the top 10 with seed 1")
    parser.add_argument("--task-defaults", action="store_true",
                        help="sample as each task method does by default, with seed 1 (overrides --temperature)")
    parser.add_argument("--dir", help="where to write the checkpoints (default: a temporary directory)")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--compare-waiting", action="store_true",
                        help="also time the call with the loop not running a step ahead (the releases before)")
    args = parser.parse_args()
    if args.task_defaults:
        SAMPLING.clear()
        SAMPLING.update(seed=1)
    elif args.temperature > 0:
        SAMPLING.update(temperature=args.temperature, top_n=10, seed=1)
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        for kind in args.models:
            resident = kind != "cpm2" or args.cpm2_memory_limit.lower() == "none"
            limit = None if resident else parse_size(args.cpm2_memory_limit)
            rows.append(run(kind, root, device, limit, args.tokens, args.compare_waiting))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(gpu=torch.cuda.get_device_name(device), torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
