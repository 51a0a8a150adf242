"""The shipped demo checkpoints (bminf/demo/<version>/) load by shape alone and their real Chinese
vocabularies have the released special ids, sentinel positions and no <unk> on ordinary text."""
import os

import pytest
import torch

from bminf.checkpoint import load_model
from bminf.demo import DEMO_VERSIONS, path
from bminf.models import GPT_PRESETS, T5_PRESETS, GPTConfig, T5Config
from bminf.tokenizers import CPM1Tokenizer, CPM2Tokenizer, EVATokenizer, load_vocab

SPECIALS = ["<unk>", "<s>", "</s>", "\u2583", "<sep>", "<pad>", "<mask>", "<eod>", "\u2581"]
TOKENIZERS = {"cpm1-demo": CPM1Tokenizer, "cpm2-demo": CPM2Tokenizer, "eva-demo": EVATokenizer}
SENTENCE = "我们今天去北京参观了博物馆，大家都觉得非常好。"


def _tokenizer(version, vocab_size):
    cls = TOKENIZERS[version]
    if cls is CPM1Tokenizer:
        return cls(os.path.join(path(version), "vocab.txt"), expected_size=vocab_size)
    return cls(os.path.join(path(version), "vocab.txt"), expected_size=vocab_size, n_sentinels=190)


def test_demo_versions_and_path_errors():
    assert DEMO_VERSIONS == {"cpm1": "cpm1-demo", "cpm2": "cpm2-demo", "eva": "eva-demo"}
    for version in DEMO_VERSIONS.values():
        assert os.path.isfile(os.path.join(path(version), "checkpoint.pt"))
    with pytest.raises(ValueError, match="cpm1-demo, cpm2-demo, eva-demo.*'cpm2'"):
        path("cpm2")


@pytest.mark.parametrize("version", sorted(TOKENIZERS))
def test_demo_loads_by_shape_and_tokenizes(version):
    model = load_model(path(version), dtype=torch.float32)  # no preset: the shapes pick it
    presets, config_cls = (GPT_PRESETS, GPTConfig) if version == "cpm1-demo" else (T5_PRESETS, T5Config)
    assert model.config == config_cls(**presets[version])
    assert os.path.getsize(os.path.join(path(version), "checkpoint.pt")) < 8.5e6

    tokens, n_blank = load_vocab(os.path.join(path(version), "vocab.txt"))
    assert n_blank == 0 and tokens[:9] == SPECIALS and "\u2582" in tokens
    tok = _tokenizer(version, model.config.vocab_size)
    assert (tok.unk_id, tok.sod_id, tok.sep_id, tok.pad_id, tok.eod_id) == (0, 1, 4, 5, 7)
    vocab = model.config.vocab_size
    if version == "cpm1-demo":
        assert tok.token_to_id("<s_0>") is None
        assert tok.tokenize("中国") == ["\u2581中国"]  # a frequent word is one piece, with CPM-1's marker
        expected = SENTENCE.replace("，", ",")       # CPM-1 folds full-width ASCII punctuation
    else:
        assert tok.sentinel_ids == list(range(vocab - 190, vocab))
        assert tokens[-190:] == [f"<s_{i}>" for i in range(190)]
        assert tok.tokenize("中国") == ["中国"]
        expected = SENTENCE
    ids = tok.encode(SENTENCE)
    assert tok.unk_id not in ids and len(ids) < len(SENTENCE)  # words, not only characters
    assert tok.decode(ids) == expected

    with torch.no_grad():  # the weights are usable: finite logits of the right width
        ids_t = torch.tensor([ids])
        logits = model(ids_t) if version == "cpm1-demo" else model(ids_t, decoder_input_ids=ids_t[:, :1])
    assert logits.shape[-1] == vocab and torch.isfinite(logits).all()
