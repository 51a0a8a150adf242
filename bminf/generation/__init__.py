"""Generation shared by every model: sampling as pure functions, the one decode loop, streaming text.

>>> from bminf.generation import SamplingParams, sample
>>> sample(torch.tensor([[0.0, 2.0]]), SamplingParams(temperature=0))    # doctest: +SKIP
tensor([1])
"""
from .loop import GPTRunner, T5Runner, decode, pad_rows
from .rows import BlankRow, TextRow
from .sampling import (SamplingParams, ban_ids, count_ids, distribution, keep_top_n, keep_top_p, penalize, sample,
                       scores)
from .text import TextStream

__all__ = ["SamplingParams", "sample", "scores", "distribution", "penalize", "keep_top_n", "keep_top_p", "count_ids",
           "ban_ids", "decode", "GPTRunner", "T5Runner", "pad_rows", "TextRow", "BlankRow", "TextStream"]
