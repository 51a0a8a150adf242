"""Run a stack of transformer blocks inside a device memory budget.

``TransformerBlockList`` is a drop-in for the ``nn.ModuleList`` of blocks. It plans from
``memory_limit`` which blocks stay on the device (``plan``); the others live in one pinned
host buffer each and are copied into rotating device slots on a side stream, one block ahead of
use, so copying overlaps compute (``stream``). When everything fits it is a plain
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
only its ``forward`` checks the peak. Do not ``.to()`` a model after wrapping; ``deepcopy`` works
only while every block is resident on one device (otherwise a clear TypeError: copy before wrapping).
"""
import copy
import functools
import inspect
import weakref
from typing import Iterable, List, Optional

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_map_only

from .place import DeviceSpec, Size, _DevicePart, place_block_lists
from .recompute import Recompute, StreamedCall
from .stream import BlockWeights

__all__ = ["TransformerBlockList"]


def _forget_slots(lst: "TransformerBlockList", incompatible_keys) -> None:
    for part in lst._parts:
        if part.streamer is not None:
            for w in part.blocks:
                part.streamer.forget(w)


class TransformerBlockList(nn.ModuleList):
    """A ``ModuleList`` of transformer blocks that runs inside a device memory budget.

    ``device``: a device, or a list of devices / ``(device, memory_limit)`` pairs to split the
    blocks across, contiguously, in proportion to their budgets. ``memory_limit`` (bytes or a
    string such as ``"6GiB"``, per device) caps everything allocated on the device: weights
    already there, resident blocks, the streaming slots, and ``reserve`` bytes for activations and
    KV cache (None: ``scratch + max(64 MiB, limit / 16)``, see ``plan.default_reserve``). After a
    pass whose peak went over the limit, the reserve grows and blocks leave the device (placing
    resets the device's peak-memory counter, which this check reads). ``slots``: streaming buffers (2 = double buffering).

    Weights are immutable once placed: ``load_state_dict`` is supported (it writes the host copies
    and drops stale device copies), in-place writes to a streamed block's tensors are not.

    >>> blocks = [nn.Linear(8, 8) for _ in range(6)]   # 512 bytes each, aligned
    >>> layers = TransformerBlockList(blocks, "cpu", memory_limit=4 * 512, reserve=0)
    >>> layers.streamed_blocks                          # 2 resident + 2 slots
    [0, 2, 3, 5]
    >>> layers(torch.ones(1, 8)).shape
    torch.Size([1, 8])
    """

    def __init__(self, blocks: Iterable[nn.Module], device: DeviceSpec = None, memory_limit: Size = None,
                 *, reserve: Size = None, slots: int = 2, place: bool = True):
        blocks = list(blocks)
        for i, block in enumerate(blocks):
            if not isinstance(block, nn.Module):
                raise TypeError(f"blocks must be nn.Modules; item {i} is {type(block).__name__}")
        super().__init__(blocks)
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

    def _unplace(self) -> None:
        """Forget a placement that failed part-way (the caller restores the tensors)."""
        for i in self._wrapped:
            self[i].__dict__.pop("forward", None)
        self._wrapped = set()
        self._weights, self._parts, self._home = [], [], None

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

    # -- budget -----------------------------------------------------------------------------------
    def reserve_at_least(self, nbytes: int) -> None:
        """Keep ``nbytes`` free for activations and caches (besides the kernels' scratch) on every
        device of this list that has a memory limit: where the plan keeps less, resident blocks move
        to host memory now, before the pass that needs the room, as they would after a pass that
        went over the limit. Blocks never come back; a budget that cannot give that much streams
        every block, which frees the most it can (the check after each pass still applies)."""
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise ValueError(f"nbytes must be an int >= 0, got {nbytes!r}")
        for part in self._parts:
            if part.limit is not None and part.plan.reserve < part.scratch + nbytes:
                part.demote(part.scratch + nbytes)

    # -- list behaviour: slicing must not re-plan ---------------------------------------------------
    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return nn.ModuleList(list(self._modules.values())[idx])
        return super().__getitem__(idx)

    def __deepcopy__(self, memo):
        """A copy with blocks of its own. The forwards of streamed (or moved) blocks are closures over
        this list, and its host buffers and slots are shared state: such a list is not copied."""
        if self._wrapped:
            raise TypeError("cannot deepcopy a TransformerBlockList that streams blocks from host memory or splits "
                            "them across devices: its blocks run through this list's buffers; deepcopy the model "
                            "before bminf.wrapper (or TransformerBlockList) and wrap the copy")
        # every block resident on one device, nothing wrapped: a copy of the modules, resident on that
        # device; it has no memory_limit of its own (the original's budget already counts the original)
        blocks = [copy.deepcopy(b, memo) for b in self]
        twin = TransformerBlockList(blocks, place=False)
        memo[id(self)] = twin
        twin.train(self.training)
        if self._parts:
            place_block_lists([twin], self._parts[0].device, reserve=0)
        return twin

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


