"""Pure placement arithmetic for ``TransformerBlockList``: which blocks stay on the device.

Nothing here touches a device, so the policy is unit-tested on its own. The budget is one number,
``memory_limit``, that must cover everything allocated on the device:

    baseline (weights already there: embeddings, norms, LM head)
  + resident blocks
  + slots x slot_bytes (rotating buffers that streamed blocks are copied into)
  + reserve (activations, KV cache, kernel scratch)

>>> plan = plan_residency([100] * 8, limit=700, reserve=100)
>>> plan.slots, [i for i, r in enumerate(plan.resident) if not r]
(2, [1, 3, 5, 7])
"""
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

__all__ = ["Plan", "plan_residency", "spread", "split_contiguous", "default_reserve", "MIB"]

MIB = 1 << 20
# the default reserve: kernel scratch + max(_RESERVE_FLOOR, limit / _RESERVE_DIVISOR)
_RESERVE_FLOOR = 64 * MIB
_RESERVE_DIVISOR = 16


@dataclass(frozen=True)
class Plan:
    resident: Tuple[bool, ...]  # per block
    slots: int                  # rotating device buffers; 0 when every block is resident
    slot_bytes: int             # size of one slot: the largest streamed block
    reserve: int                # bytes kept free for activations / KV cache / scratch
    minimum: int                # the smallest memory_limit that runs at all

    @property
    def streamed(self) -> List[int]:
        return [i for i, r in enumerate(self.resident) if not r]

    def device_bytes(self, sizes: Sequence[int]) -> int:
        """Bytes of weights and slots this plan puts on the device (baseline and reserve excluded)."""
        return sum(s for s, r in zip(sizes, self.resident) if r) + self.slots * self.slot_bytes


def default_reserve(limit: int, scratch: int = 0) -> int:
    """The reserve used when the caller gives none: ``scratch + max(64 MiB, limit / 16)``.

    ``scratch`` is the transient memory of the kernels themselves (e.g. the portable int8 path
    materializes a dequantized copy of the largest weight); the rest is a share of the limit for
    activations and KV cache. Callers that know their KV cache (our backbones) pass ``reserve``.

    >>> default_reserve(1 << 30) // MIB
    64
    """
    return scratch + max(_RESERVE_FLOOR, limit // _RESERVE_DIVISOR)


def _min_limit(fixed: int, reserve: Optional[int], scratch: int) -> int:
    """Smallest limit L with ``fixed + reserve(L) <= L``, for a given or the default reserve."""
    if reserve is not None:
        return fixed + reserve
    a = fixed + scratch
    # L >= a + max(floor, L // div)  <=>  L >= a + floor  and  L >= a * div / (div - 1) (up to rounding)
    low = max(a + _RESERVE_FLOOR, math.ceil(a * _RESERVE_DIVISOR / (_RESERVE_DIVISOR - 1)))
    while low < a + default_reserve(low, 0):
        low += 1
    return low


def spread(n: int, s: int) -> List[int]:
    """``s`` of ``n`` positions, evenly spaced and ending at the last one.

    Streamed blocks are spread out so that the copy of each one overlaps the compute of the
    resident blocks before it, instead of several copies queueing back to back.

    >>> spread(24, 4)
    [5, 11, 17, 23]
    """
    if not 0 <= s <= n:
        raise ValueError(f"cannot pick {s} of {n}")
    return [((j + 1) * n) // s - 1 for j in range(s)]


def plan_residency(sizes: Sequence[int], limit: int, *, baseline: int = 0, reserve: Optional[int] = None,
                   scratch: int = 0, priorities: Optional[Sequence[int]] = None, slots: int = 2) -> Plan:
    """Choose the resident blocks for one device.

    ``sizes``: bytes of each block (weights and buffers). ``baseline``: bytes already on the device
    that the limit must also cover. ``reserve``: bytes for activations and KV cache (None: the
    default policy, see ``default_reserve``). Blocks of higher ``priority`` stay resident first
    (an encoder-decoder gives its decoder the higher one: decode runs once per token, the encoder
    once per prompt); within a priority the streamed blocks are spread evenly.

    Raises ``ValueError`` naming the minimum when even ``slots`` streaming buffers do not fit.

    >>> plan_residency([100, 100], limit=1000, reserve=100).slots
    0
    >>> plan_residency([100] * 4, limit=250, reserve=100)
    Traceback (most recent call last):
    ...
    ValueError: memory_limit of 250 bytes is too small: at least 300 bytes are needed (0 already on the device + 100 reserved for activations/KV cache + 2 slot(s) x 100 bytes for streamed blocks)
    """
    n = len(sizes)
    priorities = [0] * n if priorities is None else list(priorities)
    if len(priorities) != n:
        raise ValueError("one priority per block")
    if slots < 1:
        raise ValueError("slots must be >= 1")
    res = default_reserve(limit, scratch) if reserve is None else reserve
    total = sum(sizes)
    if n == 0 or baseline + total + res <= limit:
        return Plan((True,) * n, 0, 0, res, _min_limit(baseline + total, reserve, scratch))

    slots = min(slots, n)
    slot_bytes = max(sizes)
    minimum = min(_min_limit(baseline + slots * slot_bytes, reserve, scratch),
                  _min_limit(baseline + total, reserve, scratch))
    if limit < minimum:
        raise ValueError(
            f"memory_limit of {limit} bytes is too small: at least {minimum} bytes are needed "
            f"({baseline} already on the device + {res} reserved for activations/KV cache + "
            f"{slots} slot(s) x {slot_bytes} bytes for streamed blocks)")

    free = limit - baseline - res - slots * slot_bytes
    resident = [False] * n
    for level in sorted(set(priorities), reverse=True):
        idx = [i for i in range(n) if priorities[i] == level]
        for keep in range(len(idx), -1, -1):
            streamed = {idx[j] for j in spread(len(idx), len(idx) - keep)}
            chosen = [i for i in idx if i not in streamed]
            cost = sum(sizes[i] for i in chosen)
            if cost <= free:
                break
        for i in chosen:
            resident[i] = True
        free -= cost
        if keep < len(idx):  # this level did not fit whole: lower levels get nothing
            break
    streamed_sizes = [s for s, r in zip(sizes, resident) if not r]
    return Plan(tuple(resident), slots, max(streamed_sizes), res, minimum)


def split_contiguous(sizes: Sequence[int], capacities: Sequence[int]) -> List[Tuple[int, int]]:
    """Split blocks into one contiguous ``[start, stop)`` run per device, in proportion to each
    device's capacity in bytes; every device gets at least one block while there are enough.

    >>> split_contiguous([10] * 6, [100, 200])
    [(0, 2), (2, 6)]
    """
    n, k = len(sizes), len(capacities)
    if k == 1:
        return [(0, n)]
    cap = [max(c, 0) for c in capacities]
    if sum(cap) == 0:
        cap = [1] * k
    total = sum(sizes) or 1
    bounds, acc, start = [], 0, 0
    for d in range(k - 1):
        acc += cap[d]
        target = total * acc / sum(cap)
        stop, run = start, sum(sizes[:start])
        while stop < n and run + sizes[stop] / 2 <= target:
            run += sizes[stop]
            stop += 1
        # leave at least one block for each later device, take at least one for this one
        stop = max(min(stop, n - (k - 1 - d)), min(start + 1, n))
        bounds.append((start, stop))
        start = stop
    bounds.append((start, n))
    return bounds
