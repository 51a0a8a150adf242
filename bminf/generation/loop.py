"""The one generation loop every model shares: prefill, then one token a step on a preallocated cache.

A *runner* hides the backbone: ``start()`` runs the prompt and returns the logits of the first new
token, ``step(tokens)`` feeds one token per row and returns the next logits, ``can_step()`` says whether
the cache holds one more token. A *row* (see ``bminf.generation.rows``) turns its row's tokens into text
and says when it is done. The loop itself only samples, counts tokens for the penalties, and stops when
every row is done.

On CUDA the loop runs one step ahead: the sampled tokens go to the next step on the device before the
host reads them, so that the host's work on a token (text, stop rules, the caller's own code between
two tokens) overlaps the GPU's next step instead of leaving the GPU idle. The price is one step whose
logits go unused when a stop id has just ended the last row (``max_tokens`` is known ahead: no step
then). Through the model classes on an H200, 128 greedy tokens with the prompt (h200_run99.log): CPM-1
786 tokens/s against 760 waiting for each token, EVA 1065 against 952, CPM-2's ``fill_blank`` 496
against 481.

>>> runner = GPTRunner(model, [[5, 6, 7]], max_new_tokens=8)        # doctest: +SKIP
>>> for events in decode(runner, rows, SamplingParams(temperature=0)):  # doctest: +SKIP
...     print(events)                                                # [(row, text piece), ...]
"""
import random
from typing import Iterator, List, Optional, Sequence, Tuple

import torch

from .sampling import NO_TOKEN, SamplingParams, ban_ids, count_ids, draw

__all__ = ["GPTRunner", "T5Runner", "decode", "pad_rows"]


def pad_rows(rows: Sequence[Sequence[int]], left: bool, device,
             width: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), both (batch, width; default the longest row): rows padded with id 0 on the left or
    the right.

    >>> pad_rows([[5, 6], [7]], left=True, device="cpu", width=3)[0].tolist()
    [[0, 5, 6], [0, 0, 7]]
    """
    longest = max(len(r) for r in rows)
    width = longest if width is None else width
    if width < longest:
        raise ValueError(f"width {width} is narrower than the longest row ({longest} ids)")
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, span] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, span] = True
    return ids.to(device), mask.to(device)


def input_embedding(model: torch.nn.Module) -> torch.nn.Embedding:
    """The embedding a backbone's input ids go through (GPT's ``token_embedding``, T5's ``input_embedding``)."""
    return getattr(model, "token_embedding", None) or getattr(model, "input_embedding")


def home_device(model: torch.nn.Module) -> torch.device:
    """Where the embeddings live: inputs go there, and the blocks move activations as they need."""
    return input_embedding(model).weight.device


class GPTRunner:
    """Decoder-only (CPM-1): the prompts left-padded so that every row's next token lands in one column.

    ``graphed``: a ``GraphedDecoder`` of the model for this batch size (one-token steps replayed from
    CUDA graphs, into its own cache), or None to run the model eagerly. With graphs, the prompts are
    padded to one of a few widths (``GraphedDecoder.prompt_width``), each with a prefill graph of its
    own; positions count real tokens, so padding leaves a row's logits as they were, up to rounding.
    """

    def __init__(self, model, prompts: Sequence[Sequence[int]], max_new_tokens: int, graphed=None):
        self.model = graphed or model
        self.device = home_device(model)
        longest = max(len(p) for p in prompts)
        width = graphed.prompt_width(longest, max_new_tokens) if graphed else longest
        self.ids, self.mask = pad_rows(prompts, left=True, device=self.device, width=width)
        self.cache = graphed.new_cache() if graphed else model.new_cache(len(prompts),
                                                                         self.ids.shape[1] + max_new_tokens)

    def start(self) -> torch.Tensor:
        return self.model(self.ids, attention_mask=self.mask, cache=self.cache)[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens.to(self.device)[:, None], cache=self.cache)[:, -1]

    def can_step(self) -> bool:
        return self.cache.length < self.cache.max_length


class T5Runner:
    """Encoder-decoder (CPM-2, EVA): encode once, then decode from a decoder prefix shared by every row.
    ``graphed`` as for ``GPTRunner``."""

    def __init__(self, model, sources: Sequence[Sequence[int]], decoder_prefix: Sequence[int],
                 max_new_tokens: int, graphed=None):
        self.model = graphed or model
        self.device = home_device(model)
        self.ids, self.mask = pad_rows(sources, left=False, device=self.device)
        self.prefix = torch.as_tensor([list(decoder_prefix)] * len(sources), dtype=torch.long, device=self.device)
        self.cache = graphed.new_cache(self.mask) if graphed else \
            model.new_cache(self.mask, max_length=len(decoder_prefix) + max_new_tokens)

    def start(self) -> torch.Tensor:
        encoded = self.model.encode(self.ids, self.mask)
        return self.model.decode(self.prefix, encoded, cache=self.cache)[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.decode(tokens.to(self.device)[:, None], cache=self.cache)[:, -1]

    def can_step(self) -> bool:
        return self.cache.self_kv.length < self.cache.self_kv.max_length


def _generator(seed: Optional[int], device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else random.SystemRandom().randrange(2**63))
    return gen


class _Fetch:
    """The tokens of each step (``sampling.draw``'s) on the host. On CUDA their copy goes to pinned memory
    behind an event, so that reading them waits for the sampling kernels only, not for a step launched
    after them; a row that had nothing to sample (-1) raises there."""

    def __init__(self, rows: int, device: torch.device):
        self.cuda = device.type == "cuda"
        self.host = torch.empty(rows, dtype=torch.long, pin_memory=self.cuda)
        self.copied = torch.cuda.Event() if self.cuda else None

    def start(self, tokens: torch.Tensor, greedy: bool) -> torch.Tensor:
        """Start the copy; returns ``tokens`` as the next step may take them: sampled rows' -1 at 0 (a
        step never looks up -1, on CUDA a device-side assert; ``values`` raises for it)."""
        self.host.copy_(tokens, non_blocking=self.cuda)
        if self.cuda:
            self.copied.record()
        return tokens if greedy else tokens.clamp(min=0)

    def values(self) -> List[int]:
        if self.cuda:
            self.copied.synchronize()
        values = self.host.tolist()
        if min(values) < 0:
            raise RuntimeError(NO_TOKEN)
        return values


def decode(runner, rows: List, params: SamplingParams, prompts: Sequence[Sequence[int]], vocab_size: int,
           no_penalty: Sequence[int] = (), filtered: Sequence[int] = (),
           run_ahead: Optional[bool] = None) -> Iterator[List[Tuple[int, str]]]:
    """Generate until every row is done; yield, after each step, the ``(row index, output)`` pairs for
    the rows whose ``push`` returned something (a text piece; an empty list when no row did).

    ``rows[i]`` has ``done``, ``banned()`` (ids it may not take next, or None), ``push(token)`` and
    ``ends_with_next()`` (whether the next push ends it, whatever the token).
    ``prompts`` are counted for the penalties (``no_penalty`` ids never are); ``filtered`` ids are never
    sampled. Every row gets its own generator seeded with ``params.seed``, so a row's tokens are the
    ones it would get alone. ``run_ahead`` (default: on CUDA) launches each step before the host reads
    the tokens it takes (see the module doc); the tokens are the same either way.
    """
    if all(row.done for row in rows):
        return
    with torch.inference_mode():
        logits = runner.start()
        device = logits.device
        if run_ahead is None:
            run_ahead = device.type == "cuda"
        penalized = params.frequency_penalty != 0 or params.presence_penalty != 0
        counts = count_ids(prompts, vocab_size, no_penalty, device) if penalized else None
        exempt = set(no_penalty)
        device_ban = torch.zeros(vocab_size, dtype=torch.bool, device=device)  # what every step bans
        device_ban[list(filtered)] = True
        generators = None if params.greedy else [_generator(params.seed, device) for _ in rows]
        fetch = _Fetch(len(rows), device)
        row_bans = None, None  # the rows' own bans and their (batch, vocab) mask, kept while they stay
        while True:
            extras = [tuple(row.banned() or ()) for row in rows]
            ban = device_ban
            if any(extras):  # rows with bans of their own (fill_blank's, which change when a blank closes)
                if row_bans[0] != extras:
                    row_bans = extras, ban_ids(device_ban[None].repeat(len(rows), 1), extras)
                ban = row_bans[1]
            tokens = draw(logits, params, counts, ban, generators)  # -1: nothing to sample, checked below
            tokens = fetch.start(tokens, params.greedy)
            # the next step needs only the device's tokens; the penalties' counts, updated below, are
            # read by the next sample, which the stream orders after both. Not when this token ends every
            # row whatever it is (max_tokens), nor past the cache.
            needed = not all(row.done or row.ends_with_next() for row in rows)
            ahead = runner.step(tokens) if run_ahead and needed and runner.can_step() else None
            events = []
            for i, (row, token) in enumerate(zip(rows, fetch.values())):
                if row.done:
                    continue
                out = row.push(token)
                if out:
                    events.append((i, out))
                if counts is not None and token not in exempt:
                    counts[i, token] += 1
            yield events
            if all(row.done for row in rows):
                return
            logits = ahead if ahead is not None else runner.step(tokens)
