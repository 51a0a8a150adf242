"""Run a stack of transformer blocks inside a device memory budget.

``TransformerBlockList`` is a drop-in for the ``nn.ModuleList`` of blocks. It plans from
``memory_limit`` which blocks stay on the device (``offload_plan``); the others live in one pinned
host buffer each and are copied into rotating device slots on a side stream, one block ahead of
use, so copying overlaps compute (``offload_stream``). When everything fits it is a plain
``ModuleList`` of resident blocks: no streams, events or wrappers on the hot path.

Blocks are called as usual, by ``forward(x, *args)`` or by the model's own loop
(``for block in self.layers: x = block(x, ...)``, indexing, slicing): a streamed block's
``forward`` is wrapped at instance level, so its module, names and state_dict are unchanged.
Weights of streamed blocks are frozen; gradients reach the inputs (hidden states, prompt
embeddings) through a per-block recompute in backward, with the weights streamed again.

Budget policy: ``memory_limit`` caps everything allocated on the device, counted from what is
there when the blocks are placed (so place non-block weights first; ``bminf.wrapper`` does).
``reserve`` is kept free for activations, KV cache and kernel scratch; after every pass in which
blocks stream (and after ``forward``) the device's peak is checked, and a new peak over the limit
grows the reserve by the excess and moves resident blocks to the host, so later passes fit.

Limits: a block that mutates run state it is given (an HF ``DynamicCache``) repeats the mutation
when recomputed in backward: backpropagate with ``use_cache=False`` (our backbones' caches write
the same positions again and are safe). A list whose blocks are all resident has no wrappers, so
only its ``forward`` checks the peak. Do not ``deepcopy`` or ``.to()`` a model after wrapping.
"""
import functools
import inspect
import logging
import warnings
import weakref
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_map_only

from .offload_plan import MIB, Plan, plan_residency, split_contiguous
from .offload_recompute import Recompute, StreamedCall
from .offload_stream import BlockWeights, Streamer

__all__ = ["TransformerBlockList", "place_block_lists", "kernel_scratch"]

_log = logging.getLogger("bminf")
DeviceSpec = Union[None, int, str, torch.device, Sequence[Union[int, str, torch.device, Tuple]]]


def kernel_scratch(modules: Iterable[nn.Module]) -> int:
    """Transient bytes the portable int8 kernel needs: it materializes two fp16 copies of the
    largest int8 weight (cast, then scaled) before the matmul."""
    largest = max((t.numel() for m in modules for t in m.parameters() if t.dtype == torch.int8), default=0)
    return 2 * 2 * largest


def _is_pair(item) -> bool:
    return isinstance(item, tuple) and len(item) == 2 and (item[1] is None or isinstance(item[1], int))


def _devices(device: DeviceSpec, memory_limit: Optional[int]) -> List[Tuple[torch.device, Optional[int]]]:
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    # a list or tuple holds several devices or (device, limit) pairs; a pair or anything else is one device
    items = list(device) if isinstance(device, (list, tuple)) and not _is_pair(device) else [device]
    out = []
    for item in items:
        if isinstance(item, tuple) and not _is_pair(item):
            raise ValueError(f"device entry {item!r}: expected a device or a (device, memory_limit) pair")
        dev, limit = item if isinstance(item, tuple) else (item, memory_limit)
        dev = torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        out.append((dev, limit))
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

    def demote(self, reserve: int) -> None:
        """Re-plan with a larger ``reserve``; blocks only ever leave the device here."""
        sizes = [b.nbytes for b in self.blocks]
        try:
            plan = plan_residency(sizes, self.limit, baseline=self.baseline, reserve=reserve,
                                  priorities=self.priorities, slots=self.slots)
        except ValueError:
            return  # already at the minimum: nothing left to evict
        resident = tuple(a and b for a, b in zip(plan.resident, self.plan.resident))
        slot_bytes = max([s for s, r in zip(sizes, resident) if not r], default=0)
        plan = Plan(resident, plan.slots if not all(resident) else 0, slot_bytes, reserve, plan.minimum)
        if plan.resident != self.plan.resident:
            self.apply(plan)
            for b in self.blocks:
                b.owner._wrap(b)


def _forget_slots(lst: "TransformerBlockList", incompatible_keys) -> None:
    for part in lst._parts:
        if part.streamer is not None:
            for w in part.blocks:
                part.streamer.forget(w)


class TransformerBlockList(nn.ModuleList):
    """A ``ModuleList`` of transformer blocks that runs inside a device memory budget.

    ``device``: a device, or a list of devices / ``(device, memory_limit)`` pairs to split the
    blocks across, contiguously, in proportion to their budgets. ``memory_limit`` (bytes, per
    device) caps everything allocated on the device: weights already there, resident blocks, the
    streaming slots, and ``reserve`` bytes for activations and KV cache (None: ``scratch +
    max(64 MiB, limit / 16)``, see ``offload_plan``). After a pass whose peak went over the limit,
    the reserve grows and blocks leave the device (placing resets the device's peak-memory counter,
    which this check reads). ``slots``: streaming buffers (2 = double buffering).

    Weights are immutable once placed: ``load_state_dict`` is supported (it writes the host copies
    and drops stale device copies), in-place writes to a streamed block's tensors are not.

    >>> blocks = [nn.Linear(8, 8) for _ in range(6)]   # 512 bytes each, aligned
    >>> layers = TransformerBlockList(blocks, "cpu", memory_limit=4 * 512, reserve=0)
    >>> layers.streamed_blocks                          # 2 resident + 2 slots
    [0, 2, 3, 5]
    >>> layers(torch.ones(1, 8)).shape
    torch.Size([1, 8])
    """

    def __init__(self, blocks: Iterable[nn.Module], device: DeviceSpec = None, memory_limit: Optional[int] = None,
                 *, reserve: Optional[int] = None, slots: int = 2, place: bool = True):
        super().__init__(list(blocks))
        if len(self) == 0:
            raise ValueError("TransformerBlockList needs at least one block")
        self._weights: List[BlockWeights] = []
        self._parts: List[_DevicePart] = []
        self._home: Optional[torch.device] = None
        self._wrapped = set()  # indices of blocks whose forward is wrapped
        # weights loaded into streamed blocks land in their host copies: drop stale slot copies
        self.register_load_state_dict_post_hook(_forget_slots)
        if place:  # place=False: placed later, together with other lists, by place_block_lists
            place_block_lists([self], device, memory_limit, reserve=reserve, slots=slots)

    # -- introspection ----------------------------------------------------------------------------
    @property
    def streamed_blocks(self) -> List[int]:
        """Indices of the blocks that live on the host and stream in when called."""
        return [i for i, w in enumerate(self._weights) if w.host is not None]

    @property
    def block_devices(self) -> List[torch.device]:
        """The device each block computes on (where its run state, such as a KV cache, belongs)."""
        return [w.part.device for w in self._weights]

    @property
    def streamer_stats(self) -> dict:
        """Host-to-device copies issued so far, per device."""
        return {str(p.device): (p.streamer.loads, p.streamer.loaded_bytes) for p in self._parts if p.streamer}

    # -- list behaviour: slicing must not re-plan ---------------------------------------------------
    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return nn.ModuleList(list(self._modules.values())[idx])
        return super().__getitem__(idx)

    def _apply(self, fn, recurse=True):
        if self._weights and any(p.streamer is not None for p in self._parts):
            raise RuntimeError("bminf: this TransformerBlockList streams blocks from host memory; move or "
                               "cast the model before wrapping it, not after")
        return super()._apply(fn, recurse)

    # -- calling --------------------------------------------------------------------------------------
    def _wrap(self, w: BlockWeights) -> None:
        """Install (or remove) the instance-level forward that streams and/or moves inputs.

        The wrapper reaches the list by weak reference and calls the class's forward, so a block
        holds no reference back to anything: dropping the model frees its memory at once."""
        module, i = w.module, w.index
        if w.host is None and w.part.device == self._home:
            if i in self._wrapped:
                del module.__dict__["forward"]
                self._wrapped.discard(i)
            return
        if i in self._wrapped:
            return
        if "forward" in module.__dict__:
            raise ValueError(f"block {i} already has an instance-level forward (another library's hook?); "
                             f"offload it before adding such hooks")
        signature, lst_ref = inspect.signature(module.forward), weakref.ref(self)

        @functools.wraps(type(module).forward)
        def forward(*args, **kwargs):
            lst = lst_ref()
            return lst._call(lst._weights[i], args, kwargs)
        forward.__signature__ = signature
        module.forward = forward
        self._wrapped.add(i)

    def _call(self, w: BlockWeights, args, kwargs):
        fwd = functools.partial(type(w.module).forward, w.module)
        dev = w.part.device
        if dev != self._home:
            args, kwargs = tree_map_only(torch.Tensor, lambda t: t.to(dev), (args, kwargs))
        if w.host is None:
            out = fwd(*args, **kwargs)
        elif torch.is_grad_enabled() and any(
                isinstance(x, torch.Tensor) and x.requires_grad for x in tree_flatten((args, kwargs))[0]):
            leaves, spec = tree_flatten((args, kwargs))
            pos = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
            call = StreamedCall(self, w, spec, leaves, pos)
            outs = Recompute.apply(call, *[leaves[i] for i in pos])
            out = call.rebuild(outs)
        else:
            w.part.streamer.acquire(w)
            try:
                out = fwd(*args, **kwargs)
            finally:
                self._released(w)
        if w.index == len(self) - 1 and dev != self._home:
            out = tree_map_only(torch.Tensor, lambda t: t.to(self._home), out)
        return out

    def _released(self, w: BlockWeights) -> None:
        w.part.streamer.release(w)
        if w.last_in_list:
            w.part.check_budget()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Run every block: ``x = block(x, *args, **kwargs)``; a tuple output contributes its first item."""
        if self._home is not None and self._home.type == "cuda":
            x, args, kwargs = tree_map_only(torch.Tensor, lambda t: t.to(self._home), (x, args, kwargs))
        for block in self:
            out = block(x, *args, **kwargs)
            x = out[0] if isinstance(out, (tuple, list)) else out
        for part in self._parts:
            part.check_budget()
        return x


def place_block_lists(lists: Sequence[TransformerBlockList], device: DeviceSpec = None,
                      memory_limit: Optional[int] = None, *, reserve: Optional[int] = None, slots: int = 2,
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
    priorities = [0] * len(lists) if priorities is None else list(priorities)
    devices = _devices(device, memory_limit)
    weights, prio = [], []
    seen = {}
    for lst, p in zip(lists, priorities):
        if lst._weights:
            raise ValueError("this TransformerBlockList is already placed")
        for i, module in enumerate(lst):
            w = BlockWeights(module, lst, i)
            for t in w.tensors:
                if id(t) in seen:
                    raise ValueError(f"block {i} shares a tensor with block {seen[id(t)]}: shared weights cannot be offloaded")
                seen[id(t)] = i
            weights.append(w)
            prio.append(p)
        lst._home = devices[0][0]
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
    for part in {id(w.part): w.part for w in weights}.values():
        if part.plan.slots:
            _log.info("bminf: %s: %d of %d blocks resident, %d streamed through %d slot(s) of %d B; limit %d B, "
                      "reserve %d B", part.device, sum(part.plan.resident), len(part.blocks),
                      len(part.plan.streamed), part.plan.slots, part.plan.slot_bytes, part.limit, part.plan.reserve)
    if any(w.host is not None for w in weights) and not all(d.type in ("cuda", "cpu") for d, _ in devices):
        warnings.warn("bminf: streaming is only implemented for CUDA and CPU devices")
