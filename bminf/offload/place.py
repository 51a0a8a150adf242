"""Placing block lists on devices: split the blocks across devices, plan which stay resident on
each (``plan``), move them there or into pinned host buffers, and re-plan when a pass overshoots.

``TransformerBlockList`` places itself through ``place_block_lists``; ``bminf.wrapper`` calls it
once for all the lists of a model, so that they share one budget.

>>> from bminf.offload import TransformerBlockList
>>> enc = TransformerBlockList([nn.Linear(8, 8) for _ in range(3)], place=False)
>>> dec = TransformerBlockList([nn.Linear(8, 8) for _ in range(2)], place=False)
>>> place_block_lists([enc, dec], "cpu", memory_limit=4 * 512, reserve=0, priorities=[0, 1])
>>> enc.streamed_blocks, dec.streamed_blocks
([0, 1, 2], [])
"""
import itertools
import logging
import warnings
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..units import parse_size
from .plan import MIB, Plan, plan_residency, split_contiguous, spread
from .stream import BlockWeights, Streamer

__all__ = ["place_block_lists", "kernel_scratch", "resolve_devices", "parse_device", "parse_slots",
           "parse_reserve", "DeviceSpec", "Size"]

_log = logging.getLogger("bminf")
Size = Optional[Union[int, str]]  # bytes, or a string such as "6GiB" (bminf.units.parse_size)
DeviceSpec = Union[None, int, str, torch.device, Sequence[Union[int, str, torch.device, Tuple]]]


def kernel_scratch(modules: Iterable[nn.Module]) -> int:
    """Transient bytes the portable int8 kernel needs: it materializes two copies of the largest
    int8 weight in the activation dtype (cast, then scaled) before the matmul. The activation dtype
    is taken to be the widest float dtype of the blocks (fp32 norms mean fp32 activations), at least fp16."""
    modules = list(modules)
    largest = max((t.numel() for m in modules for t in m.parameters() if t.dtype == torch.int8), default=0)
    width = max((t.element_size() for m in modules for t in itertools.chain(m.parameters(), m.buffers())
                 if t.is_floating_point()), default=2)
    return 2 * max(width, 2) * largest


def _is_pair(item) -> bool:
    """``(device, memory_limit)``: a limit is None, an int or a size string ("4GiB"; device names never
    start with a digit)."""
    if not (isinstance(item, tuple) and len(item) == 2):
        return False
    limit = item[1]
    return limit is None or (isinstance(limit, int) and not isinstance(limit, bool)) or \
        (isinstance(limit, str) and limit.strip()[:1].isdigit())


def parse_device(item) -> torch.device:
    """A ``torch.device`` from a device, its name, or a CUDA index (BMInf 2.0 style), with errors naming ``device``.

    >>> parse_device(0), parse_device("cpu")
    (device(type='cuda', index=0), device(type='cpu'))
    """
    if isinstance(item, torch.device):
        return item
    if isinstance(item, int) and not isinstance(item, bool):
        if item < 0:
            raise ValueError(f"device={item}: a CUDA device index must be >= 0")
        return torch.device("cuda", item)
    if not isinstance(item, str):
        raise TypeError(f"device must be a device ('cuda:0', 0, 'cpu', a torch.device), a list of them or of "
                        f"(device, memory_limit) pairs, got {type(item).__name__} {item!r}")
    try:
        return torch.device(item)
    except RuntimeError:
        raise ValueError(f"device={item!r} is not a device; use e.g. 'cuda:0', 'cuda', 0 or 'cpu'") from None


def _check_available(dev: torch.device) -> torch.device:
    """Fail before anything moves when the device does not exist here; give a bare 'cuda' its index."""
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise ValueError(f"device={str(dev)!r}: CUDA is not available on this machine (torch.cuda.is_available() "
                         "is False); use device='cpu', or install the torch build for your CUDA")
    if dev.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    if dev.index >= torch.cuda.device_count():
        raise ValueError(f"device={str(dev)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def parse_slots(slots) -> int:
    if isinstance(slots, bool) or not isinstance(slots, int):
        raise TypeError(f"slots must be an int >= 1, got {type(slots).__name__} {slots!r}")
    if slots < 1:
        raise ValueError(f"slots must be an int >= 1, got {slots}")
    return slots


def parse_reserve(reserve) -> Optional[int]:
    return None if reserve is None else parse_size(reserve, "reserve", allow_zero=True)


def resolve_devices(device: DeviceSpec, memory_limit: Size = None) -> List[Tuple[torch.device, Optional[int]]]:
    """``[(device, limit in bytes)]`` from any ``device`` spec; checks that each device exists here.

    >>> resolve_devices([("cpu", "1KiB"), "cpu"], "2KiB")
    [(device(type='cpu'), 1024), (device(type='cpu'), 2048)]
    """
    memory_limit = None if memory_limit is None else parse_size(memory_limit, "memory_limit")
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    # a list or tuple holds several devices or (device, limit) pairs; a pair or anything else is one device
    items = list(device) if isinstance(device, (list, tuple)) and not _is_pair(device) else [device]
    if not items:
        raise ValueError(f"device is an empty {type(device).__name__}: give at least one device")
    out = []
    for item in items:
        if isinstance(item, tuple) and not _is_pair(item):
            raise ValueError(f"device entry {item!r}: expected a device or a (device, memory_limit) pair")
        dev, limit = item if isinstance(item, tuple) else (item, memory_limit)
        limit = None if limit is None else parse_size(limit, f"memory_limit of device {dev!r}")
        out.append((_check_available(parse_device(dev)), limit))
    return out


class _DevicePart:
    """The blocks of one device: its plan, and the streamer when some blocks are streamed."""

    def __init__(self, device, blocks: List[BlockWeights], priorities, limit, reserve, scratch, slots):
        self.device, self.blocks, self.priorities = device, blocks, list(priorities)
        self.reserve, self.scratch, self.slots = reserve, scratch, slots
        # block weights already on the device are planned below, not part of the baseline
        on_device = sum(t.numel() * t.element_size() for b in blocks for t in b.tensors if t.device == device)
        if device.type == "cuda":
            # check_budget reads the device's peak: start it here, so that memory used before the
            # model was placed (a float copy, another model) is not taken for an overshoot
            torch.cuda.reset_peak_memory_stats(device)
            allocated = torch.cuda.memory_allocated(device)
            self.baseline = max(allocated - on_device, 0)
            if limit is None:
                free, _ = torch.cuda.mem_get_info(device)
                limit = allocated + int(0.9 * free)
        else:
            self.baseline = 0
        self.limit = limit
        sizes = [b.nbytes for b in blocks]
        if limit is None:  # CPU without a limit: everything resident
            self.plan = Plan((True,) * len(blocks), 0, 0, 0, 0)
        else:
            self.plan = plan_residency(sizes, limit, baseline=self.baseline, reserve=reserve, scratch=scratch,
                                       priorities=self.priorities, slots=slots)
        self.streamer: Optional[Streamer] = None
        self.warned, self.seen_peak = False, 0

    def apply(self, plan: Plan) -> None:
        """Move blocks to match ``plan``: streamed ones to host first, so device memory drops before it rises."""
        cuda = self.device.type == "cuda"
        streamed = [b for b, r in zip(self.blocks, plan.resident) if not r]
        for b in streamed:
            if b.host is None:
                # the recompute in backward has no way to give streamed weights a gradient
                for t in b.tensors:
                    t.requires_grad_(False)
                b.to_host(pin=cuda)
        if streamed and (self.streamer is None or len(self.streamer.slots) != plan.slots
                         or self.streamer.slots[0].buf.numel() < plan.slot_bytes):
            if self.streamer is not None and cuda:
                torch.cuda.synchronize(self.device)  # queued copies may still target the old slots
            self.streamer = Streamer(self.device, plan.slots, plan.slot_bytes)
            for b in streamed:
                b.slot_views = {}
        for b, r in zip(self.blocks, plan.resident):
            if r:
                b.host, b.host_views, b.slot_views = None, [], {}
                b.to_device(self.device)
        # default prefetch order: the next streamed block of the same list, wrapping around
        by_list = {}
        for b in streamed:
            by_list.setdefault(id(b.owner), []).append(b)
        for run in by_list.values():
            for i, b in enumerate(run):
                b.next, b.prev = run[(i + 1) % len(run)], run[i - 1]
                b.last_in_list = i == len(run) - 1
        self.plan = plan

    def check_budget(self) -> None:
        """After a pass: if the device's peak allocation went over the limit, the reserve was too
        small; grow it by the excess and turn resident blocks into streamed ones so later passes fit."""
        if self.device.type != "cuda" or self.limit is None:
            return
        peak = torch.cuda.max_memory_allocated(self.device)
        # the peak only grows until someone resets it: act once per new peak, not on every pass
        if peak <= self.limit or peak == self.seen_peak:
            return
        self.seen_peak = peak
        reserve = self.plan.reserve + (peak - self.limit) + 16 * MIB
        if not self.warned:
            _log.warning("bminf: peak memory %d B exceeded memory_limit %d B on %s; reserving %d B for "
                         "activations and streaming more blocks from now on (pass reserve= to plan for it)",
                         peak, self.limit, self.device, reserve)
            self.warned = True
        self.demote(reserve)

    def _fewer(self, target: Sequence[bool]) -> Tuple[bool, ...]:
        """As many resident blocks per priority as ``target`` has, taken from those resident now and
        spread among them, so that blocks only leave. (``target`` itself will not do, nor its overlap
        with now: the evenly spread positions of n + 1 streamed blocks are not a superset of those of
        n, and the overlap once streamed 9 blocks where 1 more was due.) Blocks of one priority are
        alike in size in the models here; where they are not, the check after each pass still holds."""
        keep = list(self.plan.resident)
        for level in set(self.priorities):
            now = [i for i, p in enumerate(self.priorities) if p == level and keep[i]]
            want = sum(1 for r, p in zip(target, self.priorities) if p == level and r)
            for j in spread(len(now), max(len(now) - want, 0)):
                keep[now[j]] = False
        return tuple(keep)

    def demote(self, reserve: int) -> None:
        """Re-plan with a larger ``reserve``; blocks only ever leave the device here."""
        sizes = [b.nbytes for b in self.blocks]
        # more than the budget can give: keep as much free as it can, every block streamed
        reserve = min(reserve, self.limit - self.baseline - min(self.slots, len(sizes)) * max(sizes, default=0))
        try:
            plan = plan_residency(sizes, self.limit, baseline=self.baseline, reserve=reserve,
                                  priorities=self.priorities, slots=self.slots)
        except ValueError:
            return  # not even the minimum fits (memory used outside the blocks grew)
        resident = self._fewer(plan.resident)
        slot_bytes = max([s for s, r in zip(sizes, resident) if not r], default=0)
        plan = Plan(resident, plan.slots if not all(resident) else 0, slot_bytes, reserve, plan.minimum)
        if plan.resident != self.plan.resident:
            self.apply(plan)
            for b in self.blocks:
                b.owner._wrap(b)
            _log.info("bminf: %s: reserve grown to %d B: %d of %d blocks resident", self.device, reserve,
                      sum(plan.resident), len(self.blocks))



def place_block_lists(lists: Sequence["TransformerBlockList"], device: DeviceSpec = None,
                      memory_limit: Size = None, *, reserve: Size = None, slots: int = 2,
                      priorities: Optional[Sequence[int]] = None) -> None:
    """Place several block lists under one budget (e.g. an encoder and a decoder).

    Lists of higher ``priority`` stay resident first: give the decoder of an encoder-decoder the
    higher one, since it runs once per generated token. Non-block weights must already be on the
    device: what is allocated there now counts against ``memory_limit``.

    >>> enc = TransformerBlockList([nn.Linear(8, 8) for _ in range(3)], place=False)
    >>> dec = TransformerBlockList([nn.Linear(8, 8) for _ in range(2)], place=False)
    >>> place_block_lists([enc, dec], "cpu", memory_limit=4 * 512, reserve=0, priorities=[0, 1])
    >>> enc.streamed_blocks, dec.streamed_blocks
    ([0, 1, 2], [])
    """
    # every check comes before the first change, and a failure after it (pinned memory running out)
    # puts every tensor back, so a failed call leaves the blocks exactly as they were
    lists = list(lists)
    for i, lst in enumerate(lists):
        if not hasattr(lst, "_weights") or not isinstance(lst, nn.ModuleList):
            raise TypeError(f"lists must be TransformerBlockLists (made with place=False); item {i} is "
                            f"{type(lst).__name__}")
    priorities = [0] * len(lists) if priorities is None else list(priorities)
    if len(priorities) != len(lists):
        raise ValueError(f"priorities: one per list, got {len(priorities)} for {len(lists)} lists")
    devices = resolve_devices(device, memory_limit)
    reserve, slots = parse_reserve(reserve), parse_slots(slots)
    weights, prio = [], []
    seen = {}
    for lst, p in zip(lists, priorities):
        if lst._weights:
            raise ValueError("this TransformerBlockList is already placed")
        for i, module in enumerate(lst):
            if "forward" in module.__dict__:
                raise ValueError(f"block {i} already has an instance-level forward (another library's hook?); "
                                 "offload it before adding such hooks")
            w = BlockWeights(module, lst, i)
            for t in w.tensors:
                if id(t) in seen:
                    raise ValueError(f"block {i} shares a tensor with block {seen[id(t)]}: shared weights cannot "
                                     "be offloaded")
                seen[id(t)] = i
            weights.append(w)
            prio.append(p)
    scratch = kernel_scratch(w.module for w in weights)
    sizes = [w.nbytes for w in weights]
    if len(devices) == 1:
        runs = [(0, len(weights))]
    else:
        caps = []
        for dev, limit in devices:
            if limit is None and dev.type == "cuda":
                limit = torch.cuda.mem_get_info(dev)[1]
            caps.append((limit or 0) - (torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0))
        runs = split_contiguous(sizes, caps)
    # plan every device before moving anything, so that a budget error leaves the blocks where they were
    parts = [_DevicePart(dev, weights[start:stop], prio[start:stop], limit, reserve, scratch, slots)
             for (dev, limit), (start, stop) in zip(devices, runs) if start != stop]
    saved = [(t, t.data, t.requires_grad) for w in weights for t in w.tensors]
    try:
        for lst in lists:
            lst._home = devices[0][0]
        for part in parts:
            for w in part.blocks:
                w.part = part
            part.apply(part.plan)
            for lst in lists:
                if part not in lst._parts and any(w.owner is lst for w in part.blocks):
                    lst._parts.append(part)
        for lst in lists:
            lst._weights = [w for w in weights if w.owner is lst]
            for w in lst._weights:
                lst._wrap(w)
    except BaseException:
        for lst in lists:
            lst._unplace()
        for t, data, requires_grad in saved:
            t.data = data
            t.requires_grad_(requires_grad)
        raise
    for part in {id(w.part): w.part for w in weights}.values():
        if part.plan.slots:
            _log.info("bminf: %s: %d of %d blocks resident, %d streamed through %d slot(s) of %d B; limit %d B, "
                      "reserve %d B", part.device, sum(part.plan.resident), len(part.blocks),
                      len(part.plan.streamed), part.plan.slots, part.plan.slot_bytes, part.limit, part.plan.reserve)
    if any(w.host is not None for w in weights) and not all(d.type in ("cuda", "cpu") for d, _ in devices):
        warnings.warn("bminf: streaming is only implemented for CUDA and CPU devices")
