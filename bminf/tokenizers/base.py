"""What the three tokenizers share: the vocab.txt reader, jieba, full-width folding, greedy matching.

CPM-1, CPM-2 and EVA all segment text with jieba (accurate mode, HMM on), map space and newline to
``▂``/``▃`` and cut each word into the longest pieces found in ``vocab.txt``. They differ only in
which full-width characters they fold, CPM-1's ``▁`` word-start marker, and how decode treats ``▁``.
Nothing here imports jieba until a tokenizer first encodes.
"""
import functools
import logging
import operator
import os
from typing import Dict, Iterable, List, Optional, Protocol, Sequence, Tuple, Union, runtime_checkable

__all__ = ["Tokenizer", "VocabTokenizer", "MissingTokenError", "load_vocab", "segment", "fullwidth_table",
           "check_text", "token_id"]

PathLike = Union[str, "os.PathLike[str]"]

# space and newline cannot be vocab entries (the reader strips lines), so they travel as these
SPACES_TO_MARKS = str.maketrans(" \n", "\u2582\u2583")


class MissingTokenError(ValueError, AttributeError):
    """A special-id property asked for a token the vocabulary lacks (say ``sep_id`` of CPM-2's).

    Also an AttributeError, so ``hasattr(tok, "sep_id")`` answers False and
    ``getattr(tok, "sep_id", None)`` gives None instead of raising.
    """


@runtime_checkable
class Tokenizer(Protocol):
    """The protocol the models rely on; every bminf tokenizer satisfies it.

    A special-id property whose token the vocab lacks raises :class:`MissingTokenError`.

    >>> from bminf.tokenizers import CPM2Tokenizer
    >>> isinstance(CPM2Tokenizer("vocab.txt"), Tokenizer)    # doctest: +SKIP
    True
    """

    @property
    def vocab_size(self) -> int: ...
    @property
    def eod_id(self) -> int: ...
    @property
    def sod_id(self) -> int: ...
    @property
    def unk_id(self) -> int: ...
    @property
    def sep_id(self) -> int: ...
    def encode(self, text: str) -> List[int]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def get_span(self, i: int) -> int: ...


def load_vocab(path: PathLike) -> Tuple[List[str], int]:
    """Read a vocab.txt as the released BMInf reader does: strip each line, skip the empty ones.

    Returns ``(tokens, n_blank)``: ``tokens[i]`` is the piece with id ``i`` (ids count kept lines
    only, so a blank line shifts every later id down by one) and ``n_blank`` the lines skipped.

    >>> tokens, n_blank = load_vocab("vocab.txt")            # doctest: +SKIP
    >>> tokens[:3], n_blank                                    # doctest: +SKIP
    (['<unk>', '<s>', '</s>'], 0)
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"vocab_path must be a path (str or os.PathLike), got {type(path).__name__} {path!r}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"vocab file {path} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"vocab_path {path} is a directory; pass the vocab.txt inside it")
    tokens, n_blank = [], 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: line {n} is not valid UTF-8 ({e.reason} at byte {e.start} of the "
                                 f"line: {raw[:40]!r}); vocab files are UTF-8 text") from None
            piece = line.strip()
            if piece:
                tokens.append(piece)
            else:
                n_blank += 1
    return tokens, n_blank


def check_text(text) -> str:
    """``text`` itself if it is a ``str``; otherwise a TypeError that says what to pass."""
    if isinstance(text, str):
        return text
    if isinstance(text, (bytes, bytearray)):
        raise TypeError(f"text must be a str, got {type(text).__name__}; decode it first, e.g. "
                        "text.decode('utf-8')")
    raise TypeError(f"text must be a str, got {type(text).__name__} {text!r:.80}")


def token_id(i) -> int:
    """An id as a plain int: ints, numpy integers and one-element integer tensors pass; floats,
    bools and strings are a TypeError (``int(1.5)`` would silently truncate)."""
    if isinstance(i, bool):
        raise TypeError(f"token ids must be integers, got bool {i!r}")
    try:
        return operator.index(i)
    except TypeError:
        raise TypeError(f"token ids must be integers, got {type(i).__name__} {i!r:.80}") from None


@functools.lru_cache(maxsize=None)
def _jieba():
    import jieba

    # jieba logs its dictionary loading at DEBUG on its own stderr handler
    logging.getLogger("jieba").setLevel(logging.WARNING)
    # our own instance, so users' jieba.load_userdict / add_word calls cannot change our ids
    tokenizer = jieba.Tokenizer()
    tokenizer.initialize()
    return tokenizer


def segment(text: str) -> List[str]:
    """jieba accurate-mode words (HMM on), the segmentation every CPM vocab was built with.

    Whitespace characters come out as words of their own, one per character.

    >>> segment("我们喜欢 hello")                            # doctest: +SKIP
    ['我们', '喜欢', ' ', 'hello']
    """
    return _jieba().lcut(text, cut_all=False, HMM=True)


def fullwidth_table(exempt: str = "", extra: Optional[Dict[str, str]] = None) -> Dict[int, str]:
    """A ``str.translate`` table folding full-width ASCII (U+FF00..U+FF5E) and U+3000 to ASCII.

    ``exempt`` characters are left alone (CPM-2 keeps ``，。！（）？、；：``); ``extra`` adds more
    replacements (CPM-1 turns ``…`` into ``...``).

    >>> "ＡＢＣ，１\u3000".translate(fullwidth_table(exempt="，"))
    'ABC，1 '
    """
    table = {cp: chr(cp - 0xFEE0) for cp in range(0xFF00, 0xFF5F)}
    table[0x3000] = " "
    for ch in exempt:
        table.pop(ord(ch), None)
    for ch, repl in (extra or {}).items():
        table[ord(ch)] = repl
    return table


class VocabTokenizer:
    """A vocabulary with its special ids, checked on load, plus greedy longest-match encoding.

    Subclasses set ``required`` (tokens that must be in the vocab), ``word_prefix``, the full-width
    table, the decode table and the default number of ``<s_i>`` sentinels.
    """

    required: Tuple[str, ...] = ("<unk>",)
    word_prefix = ""
    max_word_chars = 200  # a longer word (prefix included) becomes a single <unk>, as released
    _fold: Dict[int, str] = {}
    _unmark: Dict[int, Optional[str]] = {}

    def __init__(self, vocab_path: PathLike, expected_size: Optional[int] = None, n_sentinels: int = 0):
        tokens, n_blank = load_vocab(vocab_path)
        self._setup(tokens, os.fspath(vocab_path), expected_size, n_sentinels, n_blank)

    def _setup(self, tokens: List[str], source: str, expected_size: Optional[int], n_sentinels: int,
               n_blank: int = 0, required: Sequence[str] = ()) -> None:
        self.source = source
        self._tokens = tokens
        self._ids: Dict[str, int] = {}
        for i, t in enumerate(tokens):
            if t in self._ids:
                # the released reader silently gave a repeated piece and the next one the same id
                raise ValueError(f"{source}: piece {t!r} appears twice (ids {self._ids[t]} and {i}, "
                                 f"counting non-blank lines from 0)")
            self._ids[t] = i
        self._longest = max((len(t) for t in tokens), default=1)
        self._cache: Dict[str, List[int]] = {}
        if expected_size is not None and len(tokens) != expected_size:
            blanks = f" after skipping {n_blank} blank line(s)" if n_blank else ""
            raise ValueError(f"{source}: vocabulary has {len(tokens)} entries{blanks}, the model expects "
                             f"{expected_size}")
        name = type(self).__name__
        for token in required or self.required:
            if token not in self._ids:
                raise ValueError(f"{source}: vocabulary has no special token {token!r}, which {name} needs")
        for i in range(n_sentinels):
            if f"<s_{i}>" not in self._ids:
                raise ValueError(f"{source}: vocabulary has no sentinel '<s_{i}>' ({name} was asked for "
                                 f"<s_0>..<s_{n_sentinels - 1}>; pass a smaller n_sentinels for a smaller vocab)")
        self.n_sentinels = n_sentinels
        self._unk = self._ids["<unk>"]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r}, vocab_size={self.vocab_size})"

    def __len__(self) -> int:
        return len(self._tokens)

    @property
    def vocab_size(self) -> int:
        """Number of ids (kept lines of vocab.txt), the size of the model's output layer."""
        return len(self._tokens)

    def _special(self, token: str) -> int:
        i = self._ids.get(token)
        if i is None:
            raise MissingTokenError(f"{self.source}: vocabulary has no {token!r}, so {type(self).__name__} "
                                    f"cannot give its id")
        return i

    @property
    def unk_id(self) -> int:
        return self._unk

    @property
    def sod_id(self) -> int:
        """Id of ``<s>``, the decoder start token of CPM-2."""
        return self._special("<s>")

    @property
    def eod_id(self) -> int:
        return self._special("<eod>")

    @property
    def sep_id(self) -> int:
        """Id of ``<sep>``, which ends each utterance in EVA's dialogue context."""
        return self._special("<sep>")

    @property
    def pad_id(self) -> int:
        return self._special("<pad>")

    @property
    def sentinel_ids(self) -> List[int]:
        """Ids of ``<s_0>`` .. ``<s_{n_sentinels-1}>``, in order."""
        return [self._ids[f"<s_{i}>"] for i in range(self.n_sentinels)]

    def get_span(self, i: int) -> int:
        """Id of the sentinel ``<s_i>`` that stands for the i-th blank.

        >>> tok.get_span(0)                                       # doctest: +SKIP
        26050
        """
        i = token_id(i)
        if i < 0:
            raise ValueError(f"sentinel index must be >= 0, got {i}")
        return self._special(f"<s_{i}>")

    def token_to_id(self, token: str) -> Optional[int]:
        """Id of a piece spelled exactly as in the vocab, or None (no segmentation is done)."""
        return self._ids.get(token)

    def id_to_token(self, i: int) -> str:
        i = token_id(i)
        if not 0 <= i < len(self._tokens):
            raise ValueError(f"token id {i} is outside the vocabulary (size {len(self._tokens)})")
        return self._tokens[i]

    def tokenize(self, text: str) -> List[str]:
        """The pieces ``encode`` picks, as strings (unknown characters show as ``<unk>``)."""
        return [self._tokens[i] for i in self.encode(text)]

    def encode(self, text: str) -> List[int]:
        """Token ids of ``text``: fold full-width, jieba, mark spaces, then greedy longest match.

        >>> tok.encode("我们喜欢北京")                              # doctest: +SKIP
        [12, 15, 16]
        """
        text = check_text(text)
        ids: List[int] = []
        for word in segment(text.translate(self._fold)):
            ids.extend(self._encode_word(word))
        return ids

    def _encode_word(self, word: str) -> List[int]:
        # jieba words repeat a lot in real text: cached, matching costs ~10x less and jieba dominates
        ids = self._cache.get(word)
        if ids is None:
            ids = self._match(self.word_prefix + word.translate(SPACES_TO_MARKS))
            if len(self._cache) >= 1 << 16:
                self._cache.clear()
            self._cache[word] = ids
        return ids

    def _match(self, word: str) -> List[int]:
        if len(word) > self.max_word_chars:
            return [self._unk]
        vocab, ids, start, n = self._ids, [], 0, len(word)
        while start < n:
            # no piece is longer than self._longest, so shorter candidates are all that can match
            for end in range(min(n, start + self._longest), start, -1):
                i = vocab.get(word[start:end])
                if i is not None:
                    ids.append(i)
                    start = end
                    break
            else:
                ids.append(self._unk)  # no piece starts here: skip one character
                start += 1
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``: pieces joined, ``▂``/``▃`` back to space/newline; specials stay literal.

        >>> tok.decode(tok.encode("我们 hello"))                   # doctest: +SKIP
        '我们 hello'
        """
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
            raise TypeError(f"ids must be an iterable of token ids, got {type(ids).__name__} {ids!r:.80}")
        if getattr(ids, "ndim", 1) != 1:
            raise ValueError(f"ids must be one sequence (1-D), got shape {tuple(ids.shape)}; decode each row")
        tokens, n = self._tokens, len(self._tokens)
        pieces = []
        for i in ids:
            i = token_id(i)
            if not 0 <= i < n:
                raise ValueError(f"token id {i} is outside the vocabulary (size {n})")
            pieces.append(tokens[i])
        return "".join(pieces).translate(self._unmark)
