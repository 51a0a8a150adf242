"""Offload: run a stack of transformer blocks inside a device memory budget.

``TransformerBlockList`` (``blocklist``) is a drop-in for the ``nn.ModuleList`` of blocks;
``place_block_lists`` (``place``) puts several lists under one budget. Underneath: ``plan`` (pure
arithmetic: which blocks stay resident), ``stream`` (pinned host buffers, device slots, the copy
stream) and ``recompute`` (input gradients through streamed blocks).

>>> import torch.nn as nn
>>> from bminf.offload import TransformerBlockList
>>> layers = TransformerBlockList([nn.Linear(8, 8) for _ in range(6)], "cpu", memory_limit=4 * 512, reserve=0)
>>> layers.streamed_blocks
[0, 2, 3, 5]
"""
from .blocklist import TransformerBlockList
from .place import DeviceSpec, kernel_scratch, place_block_lists

__all__ = ["TransformerBlockList", "place_block_lists", "kernel_scratch", "DeviceSpec"]
