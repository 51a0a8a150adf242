"""CPM-1 (2.6B, GPT-style): Chinese text continuation.

>>> cpm1 = CPM1()                                              # doctest: +SKIP  (downloads cpm1-new)
>>> cpm1.generate("天空是蔚蓝色，窗外有", max_tokens=16)          # doctest: +SKIP
('一只小鸟在歌唱', False)
"""
import os
import warnings
from typing import List, Optional, Sequence

import torch

from ..generation import TextRow
from ..tokenizers import CPM1Tokenizer
from .pretrained import InputTooLongError, Prepared, Pretrained, check_text

__all__ = ["CPM1"]


class CPM1(Pretrained):
    """CPM-1 with its tokenizer. ``forward(input_ids, attention_mask=None) -> logits`` (batch, seq, vocab).

    ``version``: ``cpm1-new`` (default, downloaded once), ``cpm1-demo`` (ships with bminf),
    ``file://DIR`` or a directory (BMInf's ``checkpoint.pt``, ours, or HF's CPM-Generate with
    ``spiece.model``). See :class:`Pretrained` for device, dtype and memory arguments.
    """
    model_key, arch, preset = "cpm1", "gpt", "cpm1"

    def _load_tokenizer(self, directory: str, vocab_size: int) -> CPM1Tokenizer:
        vocab, spiece = os.path.join(directory, "vocab.txt"), os.path.join(directory, "spiece.model")
        if not os.path.isfile(vocab) and os.path.isfile(spiece):
            return CPM1Tokenizer.from_sentencepiece(spiece, expected_size=vocab_size)
        if not os.path.isfile(vocab):
            raise FileNotFoundError(f"{directory}: no vocab.txt (or spiece.model) beside the checkpoint")
        return CPM1Tokenizer(vocab, expected_size=vocab_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        home = self.backbone.token_embedding.weight.device
        mask = attention_mask.to(home) if attention_mask is not None else None
        return self.backbone(input_ids.to(home), attention_mask=mask)

    def generate(self, input_sentence, max_tokens: int = 128, top_n: Optional[int] = None,
                 top_p: Optional[float] = None, temperature: float = 0.9, frequency_penalty: float = 0,
                 presence_penalty: float = 0, stop_tokens: Optional[List[str]] = None, *,
                 seed: Optional[int] = None, stream: bool = False):
        """Continue ``input_sentence``; returns ``(text, stopped)``, ``stopped`` True when ``<eod>`` or a
        stop string ended the text (which then ends before it) rather than ``max_tokens``.

        A list of sentences runs as one batch and gives a list of results. ``stream=True`` returns an
        iterator of text pieces (``(index, piece)`` for a list) that join to the same text.
        The prompt and the new tokens share CPM-1's 1024 positions: a longer prompt is cut from the
        left, with a warning.

        >>> cpm1.generate("天空是蔚蓝色，窗外有", max_tokens=8, temperature=0)      # doctest: +SKIP
        """
        return self._generate(input_sentence, max_tokens, top_n, top_p, temperature, frequency_penalty,
                              presence_penalty, stop_tokens, seed, stream)

    def prepare_generate(self, text: str, max_tokens: int, stop_strings: Sequence[str] = (), truncate: bool = True,
                         name: str = "input_sentence") -> Prepared:
        """``text`` formatted for :meth:`generate`: its ids (no BOS), stopping at ``<eod>`` or a stop string.

        The prompt and the new tokens share CPM-1's positions: a longer prompt is cut from the left with
        a warning, or refused with ``InputTooLongError`` when ``truncate`` is False.
        """
        check_text(name, text)
        positions = self.backbone.config.max_positions
        if max_tokens >= positions:
            raise ValueError(f"max_tokens must be below CPM-1's {positions} positions (they hold the prompt too), "
                             f"got {max_tokens}")
        room = positions - max_tokens
        ids = self.tokenizer.encode(text)
        if len(ids) > room:
            if not truncate:
                raise InputTooLongError(f"{name} is {len(ids)} tokens and max_tokens is {max_tokens}: together at "
                                        f"most {positions} (CPM-1's positions)")
            warnings.warn(f"the input has {len(ids)} tokens; with max_tokens={max_tokens} only the last {room} "
                          f"fit CPM-1's {positions} positions, so it was cut from the left", stacklevel=3)
            ids = ids[-room:]
        tok = self.tokenizer
        return Prepared(ids, None, lambda: TextRow(tok.decode, {tok.eod_id}, max_tokens, stop_strings),
                        self._no_penalty(), self._control_ids())

    def _no_penalty(self) -> List[int]:
        # ▁ starts nearly every word (BMInf exempts it); <eod> ends the text
        word_start = self.tokenizer.token_to_id("\u2581")
        return [i for i in (word_start, self.tokenizer.eod_id) if i is not None]
