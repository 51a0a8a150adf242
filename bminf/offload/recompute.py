"""Input gradients through streamed blocks: each call of a streamed block is one autograd node that
keeps only its inputs and, in backward, streams the block's weights in again and recomputes it
(activation checkpointing), so device memory holds one block's activations at a time."""
import functools

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = ["Recompute", "StreamedCall"]


class Recompute(torch.autograd.Function):
    """One streamed block as an autograd node: the forward keeps only the inputs; the backward
    streams the block's weights in again, recomputes it with grad and backpropagates through it."""

    @staticmethod
    def forward(ctx, call, *tensors):
        ctx.call = call
        ctx.save_for_backward(*tensors)
        with torch.no_grad():
            return call.run(tensors)

    @staticmethod
    def backward(ctx, *grads):
        inputs = [t.detach().requires_grad_(t.requires_grad) for t in ctx.saved_tensors]
        return (None, *ctx.call.backward(inputs, grads))


class StreamedCall:
    """The pieces of one call of a streamed block that autograd needs to replay it."""

    def __init__(self, lst, block, spec, leaves, positions):
        self.lst, self.block = lst, block
        self.fwd = functools.partial(type(block.module).forward, block.module)
        self.spec, self.leaves, self.positions = spec, leaves, positions
        self.out_spec = self.out_leaves = self.out_positions = None
        dev = block.part.device
        self.rng = (torch.get_rng_state(), torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None)

    def _invoke(self, tensors):
        leaves = list(self.leaves)
        for p, t in zip(self.positions, tensors):
            leaves[p] = t
        args, kwargs = tree_unflatten(leaves, self.spec)
        return self.fwd(*args, **kwargs)

    def run(self, tensors):
        streamer = self.block.part.streamer
        streamer.acquire(self.block)
        try:
            out = self._invoke(tensors)
        finally:
            self.lst._released(self.block)
        leaves, self.out_spec = tree_flatten(out)
        self.out_positions = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
        self.out_leaves = leaves
        return tuple(leaves[i] for i in self.out_positions)

    def rebuild(self, outputs):
        leaves = list(self.out_leaves)
        for p, t in zip(self.out_positions, outputs):
            leaves[p] = t
        self.out_leaves = None  # the tensors now live in ``outputs``
        return tree_unflatten(leaves, self.out_spec)

    def backward(self, inputs, grads):
        part = self.block.part
        devices = [part.device] if part.device.type == "cuda" else []
        part.streamer.acquire(self.block, reverse=True)
        try:
            with torch.random.fork_rng(devices=devices), torch.enable_grad():
                torch.set_rng_state(self.rng[0])
                if devices:
                    torch.cuda.set_rng_state(self.rng[1], part.device)
                leaves, _ = tree_flatten(self._invoke(inputs))
            outs = [leaves[i] for i in self.out_positions]
            pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
            wanted = [t for t in inputs if t.requires_grad]
            got = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs],
                                      allow_unused=True) if pairs and wanted else [None] * len(wanted)
        finally:
            part.streamer.release(self.block, reverse=True)
        it = iter(got)
        return [next(it) if t.requires_grad else None for t in inputs]
