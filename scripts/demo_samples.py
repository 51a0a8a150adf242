"""Greedy samples from the shipped demo checkpoints, straight through the backbones (no model
classes): the prompts are built exactly as CPM1.generate, CPM2.fill_blank / CPM2.generate and
EVA.dialogue build them. ``<unk>`` is never chosen for CPM-2/EVA, as their samplers filter it.

    python scripts/demo_samples.py
"""
import argparse
from typing import List

import torch

import demo_spec
from bminf.checkpoint import load_model
from bminf.demo import path as demo_path

CPM1_PROMPTS = ["今天天气很好，", "中国经济", "这本书"]
BLANK_PROMPTS = ["今天天气很<span>，我们一起去公园<span>。", "这家酒店的服务<span>，房间也很<span>。"]
CPM2_PROMPTS = ["新年到了，", "这款手机"]
EVA_CONTEXTS = [["这家酒店的房间很干净。"], ["今天是新年的第一天。", "大家都很高兴。"]]


@torch.no_grad()
def gpt_greedy(model, prompt: List[int], steps: int, stop: int) -> List[int]:
    cache = model.new_cache(1, len(prompt) + steps)
    logits = model(torch.tensor([prompt]), cache=cache)
    out = []
    for _ in range(steps):
        token = int(logits[0, -1].argmax())
        if token == stop:
            break
        out.append(token)
        logits = model(torch.tensor([[token]]), cache=cache)
    return out


@torch.no_grad()
def t5_greedy(model, source: List[int], start: int, steps: int, banned: List[int]) -> List[int]:
    ids = torch.tensor([source])
    mask = torch.ones_like(ids, dtype=torch.bool)
    encoded = model.encode(ids, mask)
    cache = model.new_cache(mask, max_length=steps + 1)
    logits = model.decode(torch.tensor([[start]]), encoded, cache=cache)
    out = []
    for _ in range(steps):
        scores = logits[0, -1].clone()
        scores[banned] = float("-inf")
        token = int(scores.argmax())
        out.append(token)
        logits = model.decode(torch.tensor([[token]]), cache=cache)
    return out


def until(ids: List[int], stops) -> List[int]:
    for n, i in enumerate(ids):
        if i in stops:
            return ids[:n]
    return ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()

    tok = demo_spec.tokenizer("cpm1-demo")
    model = load_model(demo_path("cpm1-demo"), dtype=torch.float32)
    for prompt in CPM1_PROMPTS:
        print(f"CPM-1 generate {prompt!r} -> {tok.decode(gpt_greedy(model, tok.encode(prompt), args.steps, tok.eod_id))!r}")

    tok = demo_spec.tokenizer("cpm2-demo")
    model = load_model(demo_path("cpm2-demo"), dtype=torch.float32)
    sentinels = set(tok.sentinel_ids)
    for prompt in BLANK_PROMPTS:
        segments = prompt.split("<span>")
        source = []
        for i, segment in enumerate(segments):
            source += tok.encode(segment) + ([tok.get_span(i)] if i < len(segments) - 1 else [])
        out = t5_greedy(model, source, tok.sod_id, args.steps, [tok.unk_id])
        blanks = []
        for i in out:  # <s_0> text <s_1> text ... <s_n>
            if i in sentinels:
                if len(blanks) == len(segments) - 1:
                    break
                blanks.append([])
            elif blanks:
                blanks[-1].append(i)
        print(f"CPM-2 fill_blank {prompt!r} -> {[tok.decode(b) for b in blanks]}")
    for prompt in CPM2_PROMPTS:
        out = t5_greedy(model, tok.encode(prompt) + [tok.get_span(189)], tok.sod_id, args.steps, [tok.unk_id])
        text = tok.decode(until(out[1:], sentinels | {tok.eod_id}))  # the first token is <s_189>
        print(f"CPM-2 generate {prompt!r} -> {text!r} (first token {tok.id_to_token(out[0])})")

    tok = demo_spec.tokenizer("eva-demo")
    model = load_model(demo_path("eva-demo"), dtype=torch.float32)
    for context in EVA_CONTEXTS:
        source = [i for u in context for i in tok.encode(u) + [tok.sep_id]] + [tok.get_span(0)]
        out = t5_greedy(model, source[-256:], tok.get_span(0), args.steps, [tok.unk_id])
        print(f"EVA dialogue {context} -> {tok.decode(until(out, {tok.sep_id}))!r}")


if __name__ == "__main__":
    main()
