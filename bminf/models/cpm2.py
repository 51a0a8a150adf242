"""CPM-2 (11B, T5-style): fill in the blanks of a text, or continue it.

>>> cpm2 = CPM2()                                                 # doctest: +SKIP  (downloads cpm2.1-new)
>>> cpm2.fill_blank("北京环球影城指定单日门票将采用<span>制度")      # doctest: +SKIP
[{'position': 15, 'text': '实名'}]
"""
import re
from typing import Callable, List, Optional, Sequence

from ..generation import BlankRow, TextRow
from ..tokenizers import CPM2Tokenizer
from .pretrained import EncoderDecoder, Prepared, as_batch, check_text, vocab_file

__all__ = ["CPM2", "SPAN", "MAX_SPANS", "fill_in"]

SPAN = "<span>"
MAX_SPANS = 16
_GENERATE_SENTINEL = 189  # CPM-2 continues text as one blank at the end, marked <s_189>
_MARKER_LIKE = re.compile(r"<\s*/?\s*span\b[^<]*?>|<span(?!>)", re.IGNORECASE)


def fill_in(text: str, blanks: Sequence[dict], mark: Optional[Callable[[str], str]] = None,
            unfilled: str = "____") -> str:
    """``text`` with each ``<span>`` replaced by its blank's text from ``fill_blank``'s result, passed
    through ``mark`` (for colour or brackets); blanks beyond the result show ``unfilled``.

    >>> fill_in("a<span>b<span>c", [{"position": 1, "text": "X"}], mark=lambda t: f"[{t}]")
    'a[X]b[____]c'
    """
    mark = mark or (lambda t: t)
    parts = text.split(SPAN)
    out = [part + mark(blanks[i]["text"] if i < len(blanks) else unfilled) for i, part in enumerate(parts[:-1])]
    return "".join(out) + parts[-1]


def find_spans(text: str, positions=None, name: str = "input_sentence") -> List[int]:
    """Character offsets of the ``<span>`` markers, checked: 1 to 16, ascending, each really a marker.

    >>> find_spans("a<span>b<span>")
    [1, 8]
    """
    if positions is None:
        positions = [m.start() for m in re.finditer(re.escape(SPAN), text)]
        for m in _MARKER_LIKE.finditer(text):
            if text.startswith(SPAN, m.start()) and m.group(0) in (SPAN, "<span"):
                continue
            raise ValueError(f"{name} has a malformed span marker {m.group(0)!r} at position {m.start()}; "
                             f"write blanks as {SPAN}")
    else:
        if not isinstance(positions, (list, tuple)) or not all(
                isinstance(p, int) and not isinstance(p, bool) for p in positions):
            raise TypeError(f"spans_position must be a list of character offsets (ints), got {positions!r}")
        positions = list(positions)
        for p in positions:
            if not text.startswith(SPAN, p) or p < 0:
                raise ValueError(f"spans_position holds {p}, where {name} has no {SPAN}")
        if any(b < a + len(SPAN) for a, b in zip(positions, positions[1:])):
            raise ValueError(f"spans_position must be ascending and not overlap, got {positions}")
    if not positions:
        raise ValueError(f"{name} has no {SPAN}: fill_blank needs at least one blank")
    if len(positions) > MAX_SPANS:
        raise ValueError(f"{name} has {len(positions)} blanks; at most {MAX_SPANS} are allowed")
    return positions


class CPM2(EncoderDecoder):
    """CPM-2 with its tokenizer. ``forward(input_ids, attention_mask=None, decoder_input_ids=...,
    decoder_attention_mask=None) -> logits``.

    ``version``: ``cpm2.1-new`` (default, downloaded once; 11.3 GB), ``cpm2-demo`` (ships with bminf),
    ``file://DIR`` or a directory. ``memory_limit="6GiB"`` runs it on a 6 GB GPU.
    """
    model_key, preset = "cpm2", "cpm2"

    def _load_tokenizer(self, directory: str, vocab_size: int) -> CPM2Tokenizer:
        return CPM2Tokenizer(vocab_file(directory), expected_size=vocab_size)

    def fill_blank(self, input_sentence, spans_position: Optional[List[int]] = None, max_tokens: int = 128,
                   top_n: Optional[int] = None, top_p: Optional[float] = None, temperature: float = 0.9,
                   frequency_penalty: float = 0, presence_penalty: float = 0, *, seed: Optional[int] = None,
                   stream: bool = False):
        """Fill each ``<span>`` of ``input_sentence`` (1 to 16); returns ``[{"position", "text"}]``, one
        per blank, in order. ``position`` is the marker's character offset. ``max_tokens`` bounds all
        blanks together; blanks it leaves unreached are missing from the list.

        A list of sentences runs as one batch (``spans_position`` must then be None). ``stream=True``
        yields ``{"position", "text"}`` pieces (``(index, piece)`` for a list); the pieces of one
        position join to its text.

        >>> cpm2.fill_blank("今天天气<span>，我们去<span>吧", temperature=0)       # doctest: +SKIP
        """
        texts, single = as_batch("input_sentence", input_sentence, lambda v: isinstance(v, str))
        if not single and spans_position is not None:
            raise ValueError("spans_position is for one input_sentence; leave it out for a list")
        params = self._params(max_tokens, top_n, top_p, temperature, frequency_penalty, presence_penalty, seed)
        stream = self._check_stream(stream)
        prepared = [self.prepare_fill_blank(t, max_tokens, spans_position,
                                            name="input_sentence" if single else f"input_sentence[{i}]")
                    for i, t in enumerate(texts)]

        def finish(row, p: Prepared) -> List[dict]:
            return [{"position": pos, "text": text} for pos, text in zip(p.positions, row.texts)]

        result = self._run(prepared, params, single, stream, finish)
        return _positions(result, [p.positions for p in prepared], single) if stream else result

    def prepare_fill_blank(self, text: str, max_tokens: int, spans_position: Optional[List[int]] = None,
                           name: str = "input_sentence") -> Prepared:
        """``text`` formatted for :meth:`fill_blank`: each text segment encoded on its own, ``<s_k>`` for
        blank k; the decoder starts with ``<s> <s_0>`` (blank 0 forced open, where BMInf 1.x raised
        "Unexpected model output" if the model did not open it), and ``<s_{n}>`` closes the last blank."""
        self._check_max_tokens(max_tokens)
        check_text(name, text)
        positions = find_spans(text, spans_position, name)
        tok = self.tokenizer
        ids, start = [], 0
        for k, p in enumerate(positions):
            ids += tok.encode(text[start:p]) + [tok.get_span(k)]
            start = p + len(SPAN)
        ids = self._encode_checked(ids + tok.encode(text[start:]), name)
        sentinels = tok.sentinel_ids
        return Prepared(ids, [tok.sod_id, sentinels[0]],
                        lambda: BlankRow(tok.decode, sentinels, len(positions), max_tokens, stop_ids={tok.eod_id}),
                        self._no_penalty(), self._control_ids(), positions)

    def generate(self, input_sentence, max_tokens: int = 128, top_n: Optional[int] = None,
                 top_p: Optional[float] = None, temperature: float = 0.9, frequency_penalty: float = 0,
                 presence_penalty: float = 0, stop_tokens: Optional[List[str]] = None, *,
                 seed: Optional[int] = None, stream: bool = False):
        """Continue ``input_sentence`` (as a blank at its end); returns ``(text, stopped)``, ``stopped``
        True when ``<eod>``, a sentinel or a stop string ended it rather than ``max_tokens``.
        Lists and ``stream=True`` as in :meth:`fill_blank`.

        >>> cpm2.generate("天空是蔚蓝色，窗外有", max_tokens=16)                  # doctest: +SKIP
        """
        return self._generate(input_sentence, max_tokens, top_n, top_p, temperature, frequency_penalty,
                              presence_penalty, stop_tokens, seed, stream)

    def prepare_generate(self, text: str, max_tokens: int, stop_strings: Sequence[str] = (),
                         name: str = "input_sentence") -> Prepared:
        """``text`` formatted for :meth:`generate`: ``enc(text) <s_189>``, the decoder starting with
        ``<s> <s_189>`` (forced, so every sampled token is text; BMInf 1.x dropped one unchecked), and
        stopping at ``<eod>``, any sentinel or a stop string."""
        self._check_max_tokens(max_tokens)
        check_text(name, text)
        tok = self.tokenizer
        span = tok.get_span(_GENERATE_SENTINEL)
        ids = self._encode_checked(tok.encode(text), name) + [span]
        stop_ids = set(tok.sentinel_ids) | {tok.eod_id}
        return Prepared(ids, [tok.sod_id, span], lambda: TextRow(tok.decode, stop_ids, max_tokens, stop_strings),
                        self._no_penalty(), self._control_ids())

    def _no_penalty(self) -> List[int]:
        # the blanks' markers carry structure, not content: never penalize them
        tok = self.tokenizer
        return list(tok.sentinel_ids) + [tok.eod_id, tok.sod_id]


def _positions(pieces, all_positions, single):
    for item in pieces:
        if single:
            blank, piece = item
            yield {"position": all_positions[0][blank], "text": piece}
        else:
            i, (blank, piece) = item
            yield i, {"position": all_positions[i][blank], "text": piece}
