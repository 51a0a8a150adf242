"""What make_demo.py and train_demo.py share: the demo versions, their tokenizers and presets,
and the one way text becomes token ids (used for training examples and held-out evaluation alike).
"""
import os
from typing import List

import torch

from bminf.demo import path as demo_path
from bminf.models.gpt import GPT_PRESETS, GPT, GPTConfig
from bminf.models.t5 import T5_PRESETS, T5, T5Config
from bminf.tokenizers import CPM1Tokenizer, CPM2Tokenizer, EVATokenizer, segment

# ids 0..8 exactly as in the released vocabularies
SPECIALS = ["<unk>", "<s>", "</s>", "\u2583", "<sep>", "<pad>", "<mask>", "<eod>", "\u2581"]
SPACE = "\u2582"  # id 9 here: the piece a space becomes
N_SENTINELS = 190  # <s_0>..<s_189>, the last 190 entries of the T5-family vocabularies

VERSIONS = {
    "cpm1-demo": dict(arch="gpt", tokenizer=CPM1Tokenizer, n_sentinels=0),
    "cpm2-demo": dict(arch="t5", tokenizer=CPM2Tokenizer, n_sentinels=N_SENTINELS),
    "eva-demo": dict(arch="t5", tokenizer=EVATokenizer, n_sentinels=N_SENTINELS),
}


def config(version: str):
    """The model config of a demo version, from its preset in bminf.models."""
    if VERSIONS[version]["arch"] == "gpt":
        return GPTConfig(**GPT_PRESETS[version])
    return T5Config(**T5_PRESETS[version])


def build_model(version: str):
    """A float model of the version's shape (weights as torch initialises them)."""
    return (GPT if VERSIONS[version]["arch"] == "gpt" else T5)(config(version))


def init_weights(model, seed: int):
    """Seeded random weights near unit activation scale: embeddings N(0, 0.02), linears
    N(0, 1/fan_in); T5's queries also times 1/sqrt(d_head), since T5 does not scale QK^T.
    Norms and biases keep torch's init (ones, and zeros or uniform)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() < 2:
                continue
            std = 0.02 if "embedding" in name else p.shape[1] ** -0.5
            if name.endswith("project_q.weight") and isinstance(model, T5):
                std *= model.config.d_head ** -0.5
            p.normal_(0, std)
    return model


def tokenizer(version: str, directory: str = None):
    """The version's tokenizer over ``directory/vocab.txt`` (default: the shipped demo directory)."""
    spec = VERSIONS[version]
    vocab = os.path.join(directory or demo_path(version), "vocab.txt")
    kwargs = {"n_sentinels": spec["n_sentinels"]} if spec["n_sentinels"] else {}
    return spec["tokenizer"](vocab, expected_size=config(version).vocab_size, **kwargs)


def encode_words(tok, text: str) -> List[List[int]]:
    """``tok.encode(text)`` cut at jieba word boundaries: one id list per word.

    Concatenated, the lists equal ``tok.encode(text)`` (the same fold, segmentation and matching);
    keeping the boundaries lets span corruption cut text between words without re-running jieba.
    """
    return [ids for ids, _ in encode_words_with_text(tok, text)]


def encode_words_with_text(tok, text: str):
    """``(ids, word)`` for each jieba word of ``text``, as :func:`encode_words` cuts it."""
    # the tokenizer's own fold and per-word step, so these ids cannot drift from encode()
    return [(tok._encode_word(word), word) for word in segment(text.translate(tok._fold))]
