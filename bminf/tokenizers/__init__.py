"""Tokenizers of CPM-1, CPM-2 and EVA, matching the vocabularies BMInf released.

All three satisfy :class:`Tokenizer` (``encode``, ``decode``, ``vocab_size``, ``eod_id``,
``sod_id``, ``unk_id``, ``sep_id``, ``get_span``). jieba and sentencepiece are imported on first
use, not here.

>>> from bminf.tokenizers import CPM2Tokenizer
>>> tok = CPM2Tokenizer("vocab.txt", expected_size=26240)    # doctest: +SKIP
>>> tok.decode(tok.encode("北京欢迎你"))                        # doctest: +SKIP
'北京欢迎你'
"""
from .base import MissingTokenError, Tokenizer, VocabTokenizer, load_vocab, segment
from .cpm1 import CPM1Tokenizer
from .cpm2 import CPM2Tokenizer, EVATokenizer

__all__ = ["Tokenizer", "CPM1Tokenizer", "CPM2Tokenizer", "EVATokenizer", "VocabTokenizer", "MissingTokenError",
           "load_vocab", "segment"]
