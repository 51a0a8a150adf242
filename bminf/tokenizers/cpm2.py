"""CPM-2 and EVA tokenizers: jieba words greedy-matched over vocab.txt, no word-start marker.

The released CPM-2.1 vocab has 26240 entries with ``<s_0>``..``<s_189>`` at 26050..26239; EVA's
has 30000 with the sentinels at 29810..29999. Both keep the Chinese punctuation ``，。！（）？、；：``
full-width and fold every other full-width ASCII character, as the models were trained.
"""
from typing import Optional

from .base import PathLike, VocabTokenizer, fullwidth_table

__all__ = ["CPM2Tokenizer", "EVATokenizer"]

# punctuation the T5-family vocabularies hold in full-width form
_KEPT_FULLWIDTH = "，。！（）？、；："


class CPM2Tokenizer(VocabTokenizer):
    """Tokenizer of CPM-2 (vocab.txt, 26240 entries in the release).

    ``expected_size`` (the model config's vocab size) turns a vocab of the wrong size into a clear
    ``ValueError``; ``n_sentinels`` is how many ``<s_i>`` the vocab must hold (190 released; tiny
    test vocabularies may hold fewer). Special tokens render literally in ``decode``.

    >>> tok = CPM2Tokenizer("vocab.txt", expected_size=26240)  # doctest: +SKIP
    >>> tok.get_span(0), tok.decode(tok.encode("北京 欢迎你"))    # doctest: +SKIP
    (26050, '北京 欢迎你')
    """

    required = ("<unk>", "<s>", "<eod>")
    _fold = fullwidth_table(exempt=_KEPT_FULLWIDTH)
    _unmark = str.maketrans("\u2582\u2583", " \n")

    def __init__(self, vocab_path: PathLike, expected_size: Optional[int] = None, n_sentinels: int = 190):
        super().__init__(vocab_path, expected_size=expected_size, n_sentinels=n_sentinels)


class EVATokenizer(CPM2Tokenizer):
    """Tokenizer of EVA: CPM-2's rules over EVA's vocab (30000 entries, ``<sep>`` ends utterances).

    The public thu-coai vocab.txt has a blank line at index 8, which this reader skips (as BMInf's
    did), leaving 29999 entries; ``expected_size=30000`` reports that instead of shifting ids.

    >>> tok = EVATokenizer("vocab.txt", expected_size=30000)    # doctest: +SKIP
    >>> tok.sep_id, tok.get_span(0)                              # doctest: +SKIP
    (4, 29810)
    """

    required = ("<unk>", "<sep>")
