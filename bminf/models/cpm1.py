"""CPM-1 (2.6B, GPT-style): Chinese text continuation.

>>> cpm1 = CPM1()                                              # doctest: +SKIP  (downloads cpm1-new)
>>> cpm1.generate("天空是蔚蓝色，窗外有", max_tokens=16)          # doctest: +SKIP
('一只小鸟在歌唱', False)
"""
import os
import warnings
from typing import List, Optional

import torch

from ..generation import TextRow
from ..tokenizers import CPM1Tokenizer
from .pretrained import Pretrained, as_batch, check_text

__all__ = ["CPM1"]


def check_stop_strings(stop_tokens) -> List[str]:
    if stop_tokens is None:
        return []
    if isinstance(stop_tokens, str):
        stop_tokens = [stop_tokens]
    if not isinstance(stop_tokens, (list, tuple)):
        raise TypeError(f"stop_tokens must be a list of strings, got {type(stop_tokens).__name__}")
    for i, s in enumerate(stop_tokens):
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop_tokens[{i}] must be a non-empty string, got {s!r}")
    return list(stop_tokens)


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
        texts, single = as_batch("input_sentence", input_sentence, lambda v: isinstance(v, str))
        texts = [check_text("input_sentence" if single else f"input_sentence[{i}]", t) for i, t in enumerate(texts)]
        params = self._params(max_tokens, top_n, top_p, temperature, frequency_penalty, presence_penalty, seed)
        stops = check_stop_strings(stop_tokens)
        stream = self._check_stream(stream)
        positions = self.backbone.config.max_positions
        if max_tokens >= positions:
            raise ValueError(f"max_tokens must be below CPM-1's {positions} positions (they hold the prompt too), "
                             f"got {max_tokens}")
        room = positions - max_tokens
        prompts = []
        for text in texts:
            ids = self.tokenizer.encode(text)
            if len(ids) > room:
                warnings.warn(f"the input has {len(ids)} tokens; with max_tokens={max_tokens} only the last {room} "
                              f"fit CPM-1's {positions} positions, so it was cut from the left", stacklevel=2)
                ids = ids[-room:]
            prompts.append(ids)
        tok = self.tokenizer
        rows = [TextRow(tok.decode, {tok.eod_id}, max_tokens, stops) for _ in prompts]
        return self._run(prompts, rows, params, single, stream, lambda row: (row.text, row.stopped),
                         no_penalty=self._no_penalty(), filtered=self._control_ids())

    def _no_penalty(self) -> List[int]:
        # ▁ starts nearly every word (BMInf exempts it); <eod> ends the text
        word_start = self.tokenizer.token_to_id("\u2581")
        return [i for i in (word_start, self.tokenizer.eod_id) if i is not None]
