"""EVA (2.8B, T5-style): open-domain Chinese dialogue.

>>> eva = EVA()                                                    # doctest: +SKIP  (downloads eva-int8-new)
>>> eva.dialogue(["你好", "你好，有什么可以帮你？", "推荐一本书"])       # doctest: +SKIP
('我推荐你看《三体》', True)
"""
from typing import List, Optional, Sequence

from ..generation import TextRow
from ..tokenizers import EVATokenizer
from .pretrained import EncoderDecoder, Prepared, as_batch, check_stop_strings, check_text, vocab_file

__all__ = ["EVA"]


class EVA(EncoderDecoder):
    """EVA with its tokenizer; ``forward`` as CPM-2's. ``version``: ``eva-int8-new`` (default, downloaded
    once), ``eva-demo`` (ships with bminf), ``file://DIR`` or a directory."""
    model_key, preset = "eva", "eva"

    def _load_tokenizer(self, directory: str, vocab_size: int) -> EVATokenizer:
        return EVATokenizer(vocab_file(directory), expected_size=vocab_size)

    def dialogue(self, context, max_tokens: int = 128, top_n: Optional[int] = 10, top_p: Optional[float] = None,
                 temperature: float = 0.85, frequency_penalty: float = 0, presence_penalty: float = 0,
                 truncation_length: Optional[int] = 256, *, stop_tokens: Optional[List[str]] = None,
                 seed: Optional[int] = None, stream: bool = False):
        """The next utterance after ``context`` (the utterances so far, oldest first, both speakers);
        returns ``(text, stopped)``, ``stopped`` True when EVA ended its utterance (``<sep>``) or a stop
        string ended it.

        The context is cut to its last ``truncation_length`` tokens, whole utterances first.
        A list of contexts runs as one batch; ``stream=True`` yields text pieces.

        >>> eva.dialogue(["你好", "你好，有什么可以帮你？", "推荐一本书"], seed=0)   # doctest: +SKIP
        """
        contexts, single = as_batch("context", context, lambda v: isinstance(v, (list, tuple)) and (
            not v or isinstance(v[0], str)))
        params = self._params(max_tokens, top_n, top_p, temperature, frequency_penalty, presence_penalty, seed)
        stops = check_stop_strings(stop_tokens)
        stream = self._check_stream(stream)
        prepared = [self.prepare_dialogue(c, max_tokens, truncation_length, stops,
                                          name="context" if single else f"context[{i}]")
                    for i, c in enumerate(contexts)]
        return self._run(prepared, params, single, stream, lambda row, _: (row.text, row.stopped))

    def prepare_dialogue(self, context, max_tokens: int, truncation_length: Optional[int] = 256,
                         stop_strings: Sequence[str] = (), name: str = "context") -> Prepared:
        """``context`` formatted for :meth:`dialogue`: ``enc(u) <sep>`` per utterance then ``<s_0>``, cut
        to ``truncation_length`` tokens; the decoder starts with ``<s_0>`` and stops at ``<sep>``."""
        self._check_max_tokens(max_tokens)
        if truncation_length is not None and (isinstance(truncation_length, bool) or
                                              not isinstance(truncation_length, int) or truncation_length < 2):
            raise ValueError(f"truncation_length must be None or an integer >= 2, got {truncation_length!r}")
        limit = min(truncation_length or self.max_input_tokens, self.max_input_tokens)
        ids = self._context_ids(context, name, limit)
        tok = self.tokenizer
        stop_ids = {tok.sep_id, tok.eod_id}
        return Prepared(ids, [tok.get_span(0)], lambda: TextRow(tok.decode, stop_ids, max_tokens, stop_strings),
                        self._no_penalty(), self._control_ids(keep=["<sep>"]) + tok.sentinel_ids)

    def _context_ids(self, context, name: str, limit: int) -> List[int]:
        """``enc(u) + [<sep>]`` for each utterance, then ``<s_0>``; the oldest utterances dropped to fit."""
        if not isinstance(context, (list, tuple)):
            raise TypeError(f"{name} must be a list of utterances (str), got {type(context).__name__}")
        if not context:
            raise ValueError(f"{name} is empty: give at least one utterance")
        tok = self.tokenizer
        turns = [tok.encode(check_text(f"{name}[{i}]", u)) + [tok.sep_id] for i, u in enumerate(context)]
        ids: List[int] = []
        for turn in reversed(turns):  # newest first, as many whole utterances as fit
            if len(ids) + len(turn) + 1 > limit:
                if not ids:  # the newest alone is too long: keep its end
                    ids = turn[-(limit - 1):]
                break
            ids = turn + ids
        return ids + [tok.get_span(0)]

    def _no_penalty(self) -> List[int]:
        tok = self.tokenizer
        return list(tok.sentinel_ids) + [tok.sep_id, tok.eod_id]
