"""Tiny CPM-1 / CPM-2 / EVA directories (weights + a small Chinese vocab.txt) that the model classes load."""
import os

from bminf.checkpoint import save_model
from bminf.quantization import quantize_

from helpers import tiny_gpt, tiny_t5

# every character of the test sentences, plus some words, so that nothing encodes to <unk>
CHARS = ("天空是蔚蓝色窗外有一只小鸟在歌唱北京环球影城指定单日门票将采用实名制度今天气很好我们去公园吧你"
         "推荐本书什么可以帮的了人这中大为上个国和不到说就也要会出来时他年都")
WORDS = ["天空", "蓝色", "北京", "门票", "今天", "天气", "我们", "公园", "推荐", "什么", "可以"]
SPECIALS = ["<unk>", "<s>", "</s>", "\u2583", "<sep>", "<pad>", "<mask>", "<eod>", "\u2581", ",", "\u2582"]
N_SENTINELS = 190


def vocab(kind: str) -> list:
    pieces = list(dict.fromkeys(CHARS)) + WORDS + list("，。？！、")
    if kind == "cpm1":  # CPM-1 marks word starts with ▁ (its tokenizer looks up "▁" + word first)
        return SPECIALS + pieces + ["\u2581" + w for w in WORDS]
    return SPECIALS + pieces + [f"<s_{i}>" for i in range(N_SENTINELS)]


def make_model_dir(root: str, kind: str, seed: int = 0, **overrides) -> str:
    """``root/kind``: our safetensors format (it carries its config) + vocab.txt, int8 linears."""
    pieces = vocab(kind)
    directory = os.path.join(root, kind)
    if kind == "cpm1":
        model = tiny_gpt(seed, vocab_size=len(pieces), max_positions=48, **overrides)
    else:
        model = tiny_t5(seed, vocab_size=len(pieces), **overrides)
    save_model(quantize_(model), directory, format="safetensors")
    with open(os.path.join(directory, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(pieces) + "\n")
    return directory
