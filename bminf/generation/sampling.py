"""Sampling as pure tensor functions: penalties, filtered ids, temperature, top-n, top-p, one draw.

The semantics are BMInf 1.x's sampler (reference §2) with its bugs fixed:

1. ``z = logits / temperature - frequency_penalty * count - presence_penalty * (count > 0)``, where
   ``count`` counts each id in the prompt and the text generated so far, except ids the model never
   penalizes (padding is never counted; BMInf counted it);
2. filtered ids (e.g. ``<unk>``) get ``-inf``;
3. top-n keeps the n largest; top-p keeps the smallest set of largest probabilities whose mass
   exceeds ``top_p`` (the token that crosses it is kept: a token is kept when the mass of the
   tokens before it is at most ``top_p``); both together keep the intersection;
4. one draw from what is left, with a ``torch.Generator`` per row (not global state), so a seed
   makes a row's text reproducible whatever else is in the batch.

``temperature == 0`` is greedy: the argmax of ``logits - penalties`` (the penalties at temperature 1),
so penalties still steer greedy decoding; ``top_n=1`` equals it when the penalties are 0.

>>> logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
>>> keep_top_p(torch.softmax(logits, -1), 0.5)
tensor([[ True, False, False, False]])
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from ..kernels import triton_sampling

__all__ = ["SamplingParams", "penalize", "keep_top_n", "keep_top_p", "scores", "distribution", "sample", "draw",
           "count_ids", "ban_ids"]


@dataclass
class SamplingParams:
    """How to pick each next token; ``check(vocab_size)`` validates every field.

    >>> SamplingParams(temperature=0).check(100).greedy
    True
    """
    max_tokens: int = 128
    temperature: float = 0.9
    top_n: Optional[int] = None
    top_p: Optional[float] = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: Optional[int] = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def check(self, vocab_size: int) -> "SamplingParams":
        """Raise a ValueError/TypeError naming the first bad field and its allowed range; return self."""
        _integer("max_tokens", self.max_tokens, low=0)
        _number("temperature", self.temperature, "a number >= 0 (0 = greedy)", lambda v: v >= 0)
        if self.top_n is not None:
            _integer("top_n", self.top_n, low=1, high=vocab_size)
        if self.top_p is not None:
            _number("top_p", self.top_p, "a number in (0, 1]", lambda v: 0 < v <= 1)
        _number("frequency_penalty", self.frequency_penalty, "a finite number", lambda v: abs(v) < float("inf"))
        _number("presence_penalty", self.presence_penalty, "a finite number", lambda v: abs(v) < float("inf"))
        if self.seed is not None:
            _integer("seed", self.seed, low=0, high=2**63 - 1)
        return self


def _integer(name: str, value, low: int, high: Optional[int] = None) -> None:
    span = f"an integer in [{low}, {high}]" if high is not None else f"an integer >= {low}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be {span}, got {type(value).__name__} {value!r}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be {span}, got {value}")


def _number(name: str, value, allowed: str, ok) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be {allowed}, got {type(value).__name__} {value!r}")
    if value != value or not ok(value):  # NaN fails every range
        raise ValueError(f"{name} must be {allowed}, got {value}")


def count_ids(rows: Sequence[Sequence[int]], vocab_size: int, exempt: Sequence[int] = (),
              device=None) -> torch.Tensor:
    """(batch, vocab) int counts of each id per row, ``exempt`` ids left at 0 (they are never penalized).

    >>> count_ids([[1, 1, 3]], 4, exempt=[3]).tolist()
    [[0, 2, 0, 0]]
    """
    counts = torch.zeros(len(rows), vocab_size, dtype=torch.int32)
    for r, ids in enumerate(rows):
        if len(ids):
            counts[r].index_add_(0, torch.as_tensor(list(ids), dtype=torch.long),
                                 torch.ones(len(ids), dtype=torch.int32))
    if len(exempt):
        counts[:, list(exempt)] = 0
    return counts.to(device) if device is not None else counts


def ban_ids(ban: torch.Tensor, per_row: Sequence[Sequence[int]]) -> torch.Tensor:
    """``ban`` (batch, vocab) with ``per_row[i]``'s ids of row ``i`` set too, in one indexing on its device
    (fill-blank's rows each ban other sentinels at every step).

    >>> ban_ids(torch.zeros(2, 3, dtype=torch.bool), [[1], [0, 2]]).tolist()
    [[False, True, False], [True, False, True]]
    """
    at = [(i, token) for i, ids in enumerate(per_row) for token in ids]
    if at:
        at = on_device(at, ban.device)
        ban[at[:, 0], at[:, 1]] = True
    return ban


def on_device(data, device: torch.device) -> torch.Tensor:
    """``torch.tensor(data)`` on ``device``; on CUDA from pinned memory without waiting (a plain copy from
    host memory waits for the stream, such as a decode step launched ahead).

    >>> on_device([[0, 2]], torch.device("cpu")).tolist()
    [[0, 2]]
    """
    out = torch.tensor(data)
    return out.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else out.to(device)


def penalize(logits: torch.Tensor, counts: torch.Tensor, frequency_penalty: float,
             presence_penalty: float) -> torch.Tensor:
    """``logits - fp * count - pp * (count > 0)``, in float32. logits, counts: (batch, vocab).

    >>> penalize(torch.zeros(1, 3), torch.tensor([[0, 1, 2]]), 0.5, 1.0).tolist()
    [[0.0, -1.5, -2.0]]
    """
    z = logits.float()
    if frequency_penalty:
        z = z - frequency_penalty * counts.float()
    if presence_penalty:
        z = z - presence_penalty * (counts > 0).float()
    return z


def keep_top_n(z: torch.Tensor, n: int) -> torch.Tensor:
    """Bool mask of the ``n`` largest entries of each row of ``z`` (batch, vocab); ties broken by index.

    >>> keep_top_n(torch.tensor([[0.1, 0.7, 0.2]]), 2).tolist()
    [[False, True, True]]
    """
    keep = torch.zeros_like(z, dtype=torch.bool)
    return keep.scatter_(-1, z.topk(n, dim=-1).indices, True)


def keep_top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Bool mask of the smallest set of largest probabilities whose mass exceeds ``top_p``.

    A token is kept when the probability mass of the tokens ranked above it is at most ``top_p``,
    so the token that crosses the threshold is kept, and with ``top_p = 1`` nothing is cut.

    >>> keep_top_p(torch.tensor([[0.5, 0.25, 0.125, 0.125]]), 0.5).tolist()
    [[True, True, False, False]]
    """
    if top_p >= 1:
        return torch.ones_like(probs, dtype=torch.bool)
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
    before = sorted_p.double().cumsum(-1) - sorted_p.double()  # mass of the tokens ranked above
    keep_sorted = before <= top_p
    return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)


def scores(logits: torch.Tensor, params: SamplingParams, counts: Optional[torch.Tensor] = None,
           filtered: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Float32 (batch, vocab) scores after temperature, penalties and filtered ids (``-inf``).

    >>> scores(torch.tensor([[1.0, 2.0]]), SamplingParams(temperature=0.5)).tolist()
    [[2.0, 4.0]]
    """
    z = logits.float()
    if not params.greedy:
        z = z / params.temperature
    if counts is not None:
        z = penalize(z, counts, params.frequency_penalty, params.presence_penalty)
    if filtered is not None:
        z = z.masked_fill(filtered, float("-inf"))
    return z


def distribution(z: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The (batch, vocab) probabilities one token is drawn from: softmax of the scores ``z`` over what
    top-n and then top-p keep, renormalized.

    >>> distribution(torch.tensor([[0.0, 0.0, -1e9]]), SamplingParams(temperature=1)).tolist()
    [[0.5, 0.5, 0.0]]
    """
    if params.top_n is not None and params.top_n < z.shape[-1]:
        z = z.masked_fill(~keep_top_n(z, params.top_n), float("-inf"))
    probs = torch.softmax(z, dim=-1)
    if params.top_p is not None and params.top_p < 1:
        probs = probs * keep_top_p(probs, params.top_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


NO_TOKEN = ("no token can be sampled: the probabilities hold a NaN or inf, or are all zero (every token "
            "filtered?)")


def sample(logits: torch.Tensor, params: SamplingParams, counts: Optional[torch.Tensor] = None,
           filtered: Optional[torch.Tensor] = None, generators: Optional[List[torch.Generator]] = None,
           ) -> torch.Tensor:
    """One next token per row: (batch, vocab) logits -> (batch,) int64 ids.

    ``counts`` (batch, vocab) feeds the penalties; ``filtered`` is a (vocab,) or (batch, vocab) bool
    mask of ids never to produce; ``generators`` gives one generator per row (on the logits' device).
    A RuntimeError says when a row has nothing to sample from.

    >>> sample(torch.tensor([[0.0, 3.0, 1.0]]), SamplingParams(temperature=0)).tolist()
    [1]
    """
    tokens = draw(logits, params, counts, filtered, generators)
    if not params.greedy and bool((tokens < 0).any()):  # one host sync
        raise RuntimeError(NO_TOKEN)
    return tokens


def draw(logits: torch.Tensor, params: SamplingParams, counts: Optional[torch.Tensor] = None,
         filtered: Optional[torch.Tensor] = None, generators: Optional[List[torch.Generator]] = None,
         ) -> torch.Tensor:
    """``sample`` without waiting for the device: a row with nothing to sample from (a NaN or inf in its
    probabilities, or all of them zero) gets -1, which the caller checks once it reads the tokens (the
    decode loop and the server do, after launching the next step with those rows at 0).

    >>> draw(torch.tensor([[0.0, 1.0], [float("nan"), 0.0]]), SamplingParams(temperature=1, seed=0)).tolist()[1]
    -1
    """
    # on CUDA one kernel (triton_sampling) where its settings allow: these torch ops are 15-20 kernels
    fused = triton_sampling.handles(logits, params.top_n, params.top_p)
    if params.greedy:
        if fused:
            return triton_sampling.draw(logits, 0, None, params.frequency_penalty, params.presence_penalty,
                                        counts, filtered, None)
        return scores(logits, params, counts, filtered).argmax(-1)
    # torch.multinomial draws one sample as argmax(p / q), q ~ Exp(1) from the generator, but checks its
    # input with two host syncs per call. The same draw here, each row's q from the row's own generator
    # (a row's draws do not depend on the others)
    q = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    for row in range(q.shape[0]):
        q[row].exponential_(generator=generators[row] if generators is not None else None)
    if fused:
        return triton_sampling.draw(logits, params.temperature, params.top_n, params.frequency_penalty,
                                    params.presence_penalty, counts, filtered, q)
    probs = distribution(scores(logits, params, counts, filtered), params)
    ok = ((probs >= 0) & (probs < float("inf"))).all(-1) & (probs.sum(-1) > 0)
    return torch.where(ok, (probs / q).argmax(-1), -1)
