"""What each row of a batch does with its sampled tokens: the stop rules and the text of the tasks.

``TextRow`` serves ``generate`` and ``dialogue``: text until a stop id, a stop string or ``max_tokens``.
``BlankRow`` serves ``fill_blank``: the decoder writes ``<s_0> span <s_1> span ... <s_n>``; each
sentinel opens the next blank, and only the one expected next may be sampled.

>>> row = TextRow(decode=lambda ids: "".join(map(str, ids)), stop_ids={0}, max_tokens=5)
>>> [row.push(t) for t in (1, 2, 0)], row.text, row.stopped
(['1', '2', ''], '12', True)
"""
from typing import Callable, Collection, List, Optional, Sequence, Tuple

from .text import TextStream

__all__ = ["TextRow", "BlankRow"]


class TextRow:
    """Free text for one row. ``stopped`` says a stop id or stop string ended it (not ``max_tokens``)."""

    def __init__(self, decode: Callable[[List[int]], str], stop_ids: Collection[int], max_tokens: int,
                 stop_strings: Sequence[str] = ()):
        self._decode, self.stop_ids, self.max_tokens = decode, set(stop_ids), max_tokens
        self.stream = TextStream(stop_strings)
        self.steps = 0  # text tokens taken (a stop id is not one)
        self.stopped = False
        self.done = max_tokens == 0

    @property
    def text(self) -> str:
        return self.stream.text

    def banned(self) -> Optional[List[int]]:
        return None

    def ends_with_next(self) -> bool:
        # a stop id ends the row, and any other token is its last text token
        return self.steps + 1 >= self.max_tokens

    def push(self, token: int) -> str:
        if token in self.stop_ids:
            self.stopped = self.done = True
            return self.stream.flush()
        self.steps += 1
        piece = self.stream.push(self._decode([token]))
        if self.stream.stopped:
            self.stopped = self.done = True
        elif self.steps >= self.max_tokens:
            self.done = True
            piece += self.stream.flush()
        return piece


class BlankRow:
    """The blanks of one ``fill_blank`` input. The decoder prefix already holds ``<s_0>``, so blank 0 is open.

    ``sentinels`` are the ids of every ``<s_i>`` in order: ``<s_{i+1}>`` closes blank i, and closing
    the last blank ends the row. ``push`` returns ``(blank index, text piece)`` for text, else None.
    ``texts`` holds one string per blank opened: fewer than ``n_blanks`` when ``max_tokens`` ran out
    first. ``stopped`` is True when the model closed the last blank.
    """

    def __init__(self, decode: Callable[[List[int]], str], sentinels: Sequence[int], n_blanks: int,
                 max_tokens: int, stop_ids: Collection[int] = ()):
        if not 0 < n_blanks < len(sentinels):
            raise ValueError(f"{n_blanks} blanks need {n_blanks + 1} sentinels, the vocabulary has {len(sentinels)}")
        self._decode, self.n_blanks, self.max_tokens = decode, n_blanks, max_tokens
        self.sentinels = list(sentinels)
        self.stop_ids = set(stop_ids)
        self.done = max_tokens == 0
        self.texts: List[str] = [] if self.done else [""]
        self.steps = 0
        self.stopped = False

    def banned(self) -> Optional[List[int]]:
        # every sentinel but the one that closes the open blank: blanks come back complete and in order
        allowed = self.sentinels[len(self.texts)]
        return [s for s in self.sentinels if s != allowed]

    def ends_with_next(self) -> bool:
        return self.steps + 1 >= self.max_tokens  # every push counts a step

    def push(self, token: int) -> Optional[Tuple[int, str]]:
        self.steps += 1
        out = None
        if token == self.sentinels[len(self.texts)]:
            if len(self.texts) == self.n_blanks:
                self.stopped = self.done = True
            else:
                self.texts.append("")
        elif token in self.stop_ids:
            self.done = True
        else:
            piece = self._decode([token])
            self.texts[-1] += piece
            out = (len(self.texts) - 1, piece) if piece else None
        if self.steps >= self.max_tokens:
            self.done = True
        return out
