"""CPM-1 tokenizer: jieba words, each marked with ``▁``, greedy-matched over vocab.txt.

The released CPM-1 vocab (30000 entries) is the piece list of the sentencepiece BPE model that
CPM-Generate was trained with, so ``▁`` (id 8) starts nearly every word. BMInf matched those
pieces greedily instead of running BPE; :meth:`CPM1Tokenizer.from_sentencepiece` runs the BPE model
instead and agrees with HF transformers' ``CpmTokenizer``.
"""
import os
import unicodedata
from typing import List, Optional

from .base import SPACES_TO_MARKS, PathLike, VocabTokenizer, check_text, fullwidth_table, segment

__all__ = ["CPM1Tokenizer"]

WORD_START = "\u2581"  # ▁


class CPM1Tokenizer(VocabTokenizer):
    """Tokenizer of CPM-1 over the released vocab.txt (30000 entries, ``<eod>`` = 7, ``▁`` = 8).

    Every jieba word is encoded as ``▁`` + word, so a word missing from the vocab as ``▁word``
    becomes ``▁`` followed by its pieces. ``decode`` deletes every ``▁``. CPM-1 has no sentinels,
    so ``get_span`` raises.

    >>> tok = CPM1Tokenizer("vocab.txt", expected_size=30000)  # doctest: +SKIP
    >>> tok.decode(tok.encode("天下 大势")), tok.eod_id          # doctest: +SKIP
    ('天下 大势', 7)
    """

    required = ("<unk>", "<eod>", WORD_START)
    word_prefix = WORD_START
    _fold = fullwidth_table(extra={"\u2026": "..."})  # CPM-1 folds all full-width ASCII, and …
    _unmark = {0x2582: " ", 0x2583: "\n", 0x2581: None}
    _sp = None  # a sentencepiece processor when built by from_sentencepiece

    def __init__(self, vocab_path: PathLike, expected_size: Optional[int] = None):
        super().__init__(vocab_path, expected_size=expected_size, n_sentinels=0)

    @classmethod
    def from_sentencepiece(cls, model_path: PathLike, expected_size: Optional[int] = None) -> "CPM1Tokenizer":
        """CPM-1 tokenizer running the sentencepiece model published with the HF CPM-Generate weights.

        Encodes as HF ``CpmTokenizer(model_path).encode(text, add_special_tokens=False)`` did when
        it still pre-segmented (transformers 4.x): jieba words with space/newline mapped to
        ``▂``/``▃``, joined by spaces; whitespace runs collapsed, ```` `` ```` and ``''`` turned into
        ``"``, NFKD with accents dropped (this folds full-width characters, so no table is applied);
        then the BPE model, re-splitting pieces such as ``▁2019,`` into number and comma.
        One deliberate difference: ``<eod>``-like control tokens written in the text are encoded as
        text, never as the control id.

        >>> tok = CPM1Tokenizer.from_sentencepiece("spiece.model")  # doctest: +SKIP
        >>> tok.decode(tok.encode("天下 大势"))                        # doctest: +SKIP
        '天下 大势'
        """
        import sentencepiece

        if not isinstance(model_path, (str, os.PathLike)):
            raise TypeError(f"model_path must be a path, got {type(model_path).__name__} {model_path!r}")
        path = os.fspath(model_path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"sentencepiece model {path} does not exist")
        processor = sentencepiece.SentencePieceProcessor()
        try:
            processor.Load(path)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path}: not a sentencepiece model ({e})") from e
        tok = cls.__new__(cls)
        pieces = [processor.IdToPiece(i) for i in range(processor.GetPieceSize())]
        # BPE never needs a bare ▁ piece, so only <unk> and <eod> are required here
        tok._setup(pieces, path, expected_size, n_sentinels=0, required=("<unk>", "<eod>"))
        tok._sp = processor
        return tok

    def encode(self, text: str) -> List[int]:
        """Token ids of ``text`` (no ``<eod>`` or other specials are added).

        >>> tok.tokenize("我们喜欢")                                 # doctest: +SKIP
        ['▁我们', '▁喜欢']
        """
        if self._sp is None:
            return super().encode(text)
        text = " ".join(word.translate(SPACES_TO_MARKS) for word in segment(check_text(text)))
        ids: List[int] = []
        for piece in self._sp.EncodeAsPieces(_clean(text)):
            if len(piece) > 1 and piece[-1] == "," and piece[-2].isdigit():
                ids.extend(self._split_number_comma(piece))
            else:
                ids.append(self._ids.get(piece, self._unk))
        return ids

    def _split_number_comma(self, piece: str) -> List[int]:
        # BPE learns pieces like "▁2019," from lists of numbers; the comma is cut off again and the
        # number re-encoded without ▁, keeping a leading ▁ only if the original piece had one
        pieces = self._sp.EncodeAsPieces(piece[:-1].replace(WORD_START, ""))
        if not piece.startswith(WORD_START) and pieces[0].startswith(WORD_START):
            pieces[0] = pieces[0][1:]
            if not pieces[0]:
                pieces.pop(0)
        pieces.append(",")
        return [self._ids.get(p, self._unk) for p in pieces]


def _clean(text: str) -> str:
    """The text clean-up CpmTokenizer inherits from XLNet's tokenizer, in the same order."""
    text = " ".join(text.split())
    text = text.replace("``", '"').replace("''", '"')
    text = unicodedata.normalize("NFKD", text)
    return "".join(c for c in text if not unicodedata.combining(c))
