"""The streaming engine behind ``TransformerBlockList``: pinned host copies, device slots, a copy stream.

It knows blocks only through their parameters and buffers. A streamed block's tensors keep their
identity (code holding a reference still sees them); only their ``.data`` moves between a view of
the block's one contiguous host buffer (idle) and a view of a device slot (while it runs).

Stream discipline, per slot: the copy stream waits on ``free`` (the compute stream is done with the
slot's previous block) before overwriting it and records ``ready`` after; the compute stream waits
on ``ready`` before the block runs and records ``free`` after. Slots and host buffers live as long
as the engine, so the caching allocator never recycles memory a queued copy still touches.
"""
import itertools
import weakref
from typing import Dict, List, Optional

import torch
import torch.nn as nn

_ALIGN = 256  # bytes; keeps every tensor view aligned for any dtype and copies on fast paths


def block_tensors(module: nn.Module) -> List[torch.Tensor]:
    """The distinct parameters and buffers of a block, in a stable order."""
    seen, out = set(), []
    for t in itertools.chain(module.parameters(), module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _weak(name: str) -> property:
    """An attribute held by weak reference. Links that point back up or sideways (to the list, the
    device part, neighbouring blocks) are weak, so a dropped model frees its device memory and pinned
    buffers at once, by reference counting, instead of waiting for the cycle collector."""
    key = "_" + name

    def get(self):
        ref = getattr(self, key, None)
        return ref() if ref is not None else None

    def set(self, value):
        setattr(self, key, weakref.ref(value) if value is not None else None)
    return property(get, set)


class BlockWeights:
    """One block's tensors and their layout in a flat byte buffer."""

    owner = _weak("owner")  # the TransformerBlockList
    part = _weak("part")    # the per-device placement
    next = _weak("next")    # default prefetch order: the next streamed block of the list, cyclic
    prev = _weak("prev")

    def __init__(self, module: nn.Module, owner=None, index: int = 0):
        self.module, self.owner, self.index = module, owner, index
        self.tensors = block_tensors(module)
        self.layout, offset = [], 0
        for t in self.tensors:
            self.layout.append((offset, t.dtype, tuple(t.shape)))
            offset += _aligned(t.numel() * t.element_size())
        self.nbytes = offset
        self.host: Optional[torch.Tensor] = None    # flat uint8 host buffer while streamed
        self.host_views: List[torch.Tensor] = []
        self.slot_views: Dict[int, List[torch.Tensor]] = {}
        self.last_in_list = False

    def views(self, flat: torch.Tensor) -> List[torch.Tensor]:
        return [flat[o:o + t.numel() * t.element_size()].view(dt).view(shape)
                for t, (o, dt, shape) in zip(self.tensors, self.layout)]

    def to_device(self, device: torch.device) -> None:
        for t in self.tensors:
            t.data = t.data.to(device)

    def to_host(self, pin: bool) -> None:
        """Gather the tensors into one contiguous (pinned) host buffer and point them at it."""
        flat = torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=pin)
        self.host, self.host_views = flat, self.views(flat)
        for t, v in zip(self.tensors, self.host_views):
            v.copy_(t.data)
            t.data = v

    def bind(self, views: List[torch.Tensor]) -> None:
        for t, v in zip(self.tensors, views):
            t.data = v


class Slot:
    def __init__(self, index: int, nbytes: int, device: torch.device):
        self.index = index
        self.buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self.block: Optional[BlockWeights] = None
        self.busy = False
        self.stamp = 0  # when it was last loaded, for picking a victim on a misprediction
        cuda = device.type == "cuda"
        self.ready = torch.cuda.Event() if cuda else None
        self.free = torch.cuda.Event() if cuda else None
        self.used = False  # whether ``free`` was ever recorded


class Streamer:
    """Rotating device slots for the streamed blocks of one device.

    Prefetching follows the order blocks were last called in (learned), starting from each list's
    own cyclic order; so decode passes wrap around from the last block to the first, and an
    encoder pass followed by decoder passes is learned after one generation.
    """

    def __init__(self, device: torch.device, n_slots: int, slot_bytes: int):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.slots = [Slot(i, slot_bytes, device) for i in range(n_slots)]
        if self.cuda:
            for s in self.slots:  # when freed, wait for copies still queued on the copy stream
                s.buf.record_stream(self.stream)
        self.where: Dict[int, Slot] = {}  # id(block) -> the slot holding it (or copying into it)
        self.successor: Dict[int, BlockWeights] = {}
        self.last: Optional[BlockWeights] = None
        self.loads = 0          # number of block copies issued
        self.loaded_bytes = 0   # bytes copied host -> device

    # -- copies ---------------------------------------------------------------------------------
    def _load(self, block: BlockWeights, slot: Slot) -> None:
        if slot.block is not None:
            self.where.pop(id(slot.block), None)
        slot.block, self.where[id(block)] = block, slot
        self.loads += 1
        slot.stamp = self.loads
        self.loaded_bytes += block.nbytes
        dst = slot.buf[:block.nbytes]
        if self.cuda:
            with torch.cuda.stream(self.stream):
                if slot.used:
                    self.stream.wait_event(slot.free)
                dst.copy_(block.host, non_blocking=True)
                slot.ready.record(self.stream)
        else:
            dst.copy_(block.host)

    def _predict(self, block: BlockWeights, reverse: bool) -> Optional[BlockWeights]:
        if reverse:
            return block.prev
        return self.successor.get(id(block), block.next)

    def _prefetch(self, chain: List[BlockWeights]) -> None:
        """Make sure the blocks of ``chain`` (in the order they will run) are in, or on their way
        into, a slot; evict only blocks that are neither running nor in the chain."""
        for b in chain:
            if id(b) in self.where:
                continue
            free = [s for s in self.slots if not s.busy and (s.block is None or s.block not in chain)]
            if not free:
                return
            self._load(b, min(free, key=lambda s: (s.block is not None, s.stamp)))

    def _chain(self, start: Optional[BlockWeights], reverse: bool) -> List[BlockWeights]:
        chain, b = [], start
        while b is not None and len(chain) < len(self.slots) and b not in chain:
            chain.append(b)
            b = self._predict(b, reverse)
        return chain

    # -- the two calls around a block's run -------------------------------------------------------
    def acquire(self, block: BlockWeights, reverse: bool = False) -> None:
        """Point ``block``'s tensors at its slot, loading it first if it was not prefetched."""
        if not reverse:
            if self.last is not None and self.last is not block:
                self.successor[id(self.last)] = block
            self.last = block
        if id(block) not in self.where:
            idle = [s for s in self.slots if not s.busy]
            if not idle:
                raise RuntimeError("bminf: every offload slot is in use (a streamed block called re-entrantly?)")
            self._load(block, min(idle, key=lambda s: (s.block is not None, s.stamp)))
        slot = self.where[id(block)]
        slot.busy = True
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(slot.ready)
        if slot.index not in block.slot_views:
            block.slot_views[slot.index] = block.views(slot.buf)
        block.bind(block.slot_views[slot.index])
        # the next block(s) copy while this one computes
        self._prefetch(self._chain(block, reverse))

    def release(self, block: BlockWeights, reverse: bool = False) -> None:
        slot = self.where[id(block)]
        block.bind(block.host_views)
        slot.busy = False
        if self.cuda:
            slot.free.record(torch.cuda.current_stream(self.device))
            slot.used = True
        self._prefetch(self._chain(self._predict(block, reverse), reverse))

    def forget(self, block: BlockWeights) -> None:
        """Drop ``block`` from its slot (it is becoming resident or being re-planned)."""
        slot = self.where.pop(id(block), None)
        if slot is not None:
            slot.block = None
        self.successor.pop(id(block), None)
        if self.last is block:
            self.last = None
