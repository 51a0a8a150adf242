"""Token ids to text, one row at a time: stop strings, and streaming without ever taking text back.

Our tokenizers decode by joining pieces, so the text of a sequence is the concatenation of the
texts of its tokens and each new token only appends. A stop string may span several tokens: the
text that could still turn out to be the start of one is held back until it is resolved, so the
pieces streamed so far are always a prefix of the final text.

>>> s = TextStream(stop_strings=["。"])
>>> s.push("你好"), s.push("。再见"), s.stopped, s.text
('你好', '', True, '你好')
"""
from typing import Optional, Sequence

__all__ = ["TextStream"]


class TextStream:
    """Accumulates decoded text for one row and says what may be shown so far."""

    def __init__(self, stop_strings: Sequence[str] = ()):
        self.stop_strings = [s for s in stop_strings if s]
        self._text = ""        # everything decoded so far (up to a stop string once stopped)
        self._shown = 0        # characters already handed out
        self._searched = 0     # stop strings cannot start before this index
        self.stopped = False   # a stop string was found

    @property
    def text(self) -> str:
        return self._text

    def push(self, piece: str) -> str:
        """Append a token's text; return the new text that is now safe to show ('' if none)."""
        if self.stopped:
            return ""
        self._text += piece
        hit = self._find_stop()
        if hit is not None:
            self._text, self.stopped = self._text[:hit], True
            return self._take(len(self._text))
        return self._take(len(self._text) - self._pending())

    def flush(self) -> str:
        """The text held back for a possible stop string, once no more tokens will come."""
        return self._take(len(self._text))

    def _find_stop(self) -> Optional[int]:
        text, start = self._text, self._searched
        hits = [i for i in (text.find(s, start) for s in self.stop_strings) if i >= 0]
        longest = max((len(s) for s in self.stop_strings), default=1)
        # an occurrence found later must end in text not yet seen, so it starts after this point
        self._searched = max(start, len(text) - longest + 1)
        return min(hits) if hits else None

    def _pending(self) -> int:
        """Length of the longest end of the text that begins some stop string."""
        text, best = self._text, 0
        for s in self.stop_strings:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _take(self, end: int) -> str:
        end = max(end, self._shown)
        piece, self._shown = self._text[self._shown:end], end
        return piece
