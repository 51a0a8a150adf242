"""Preallocated key/value caches. They are run state owned by the decode loop, never module buffers,
so offloading moves weights without touching them."""
from typing import Optional, Sequence, Tuple

import torch

from ..kernels import attention


def _per_layer(device, n_layers: int) -> list:
    devices = list(device) if isinstance(device, (list, tuple)) else [device] * n_layers
    if len(devices) != n_layers:
        raise ValueError(f"{len(devices)} devices given for {n_layers} layers")
    return devices


class LayerKV:
    """One layer's slice of a cache, with the position where this step's keys go."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, start: int):
        self.k, self.v, self.start = k, v, start  # k, v: (batch, heads, max_length, d_head)

    def update(self, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Store this step's (batch, heads, S, d_head) keys/values; return all keys/values so far."""
        end = self.start + k.shape[2]
        self.k[:, :, self.start:end] = k
        self.v[:, :, self.start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
               scale: float) -> torch.Tensor:
        """Store this step's keys/values, then attend from ``q`` over every key so far."""
        return attention(q, *self.update(k, v), bias, scale)


class KVCache:
    """Self-attention keys/values of every layer of one stack, plus which positions hold real tokens.

    ``device`` may be one device or one per layer (a stack split across GPUs keeps each layer's
    cache beside its weights); the masks live on ``mask_device`` (default: the first), where the
    model builds its attention masks.

    >>> cache = KVCache(n_layers=2, batch_size=1, n_heads=4, max_length=16, d_head=8)
    >>> cache.length, cache.max_length
    (0, 16)
    """

    def __init__(self, n_layers: int, batch_size: int, n_heads: int, max_length: int, d_head: int,
                 dtype: torch.dtype = torch.float32, device=None, mask_device=None):
        devices = _per_layer(device, n_layers)
        mask_device = devices[0] if mask_device is None else mask_device
        shape = (batch_size, n_heads, max_length, d_head)
        # one (batch, heads, max_length, d_head) buffer per layer
        self.k = [torch.zeros(shape, dtype=dtype, device=d) for d in devices]
        self.v = [torch.zeros(shape, dtype=dtype, device=d) for d in devices]
        self.key_mask = torch.zeros(batch_size, max_length, dtype=torch.bool, device=mask_device)
        # number of real tokens seen per row: the next token's absolute position (GPT)
        self.n_valid = torch.zeros(batch_size, dtype=torch.long, device=mask_device)
        self.length = 0

    @property
    def max_length(self) -> int:
        return self.k[0].shape[2]

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    def begin(self, mask: torch.Tensor) -> torch.Tensor:
        """Reserve room for a step of ``mask.shape[1]`` tokens; returns the key mask up to its end."""
        if mask.shape[0] != self.batch_size:
            raise ValueError(f"cache holds batch {self.batch_size}, input has batch {mask.shape[0]}")
        end = self.length + mask.shape[1]
        if end > self.max_length:
            raise ValueError(f"sequence of {end} tokens exceeds the cache's max_length {self.max_length}")
        self.key_mask[:, self.length:end] = mask
        return self.key_mask[:, :end]

    def layer(self, i: int) -> LayerKV:
        return LayerKV(self.k[i], self.v[i], self.length)

    def rows(self, n: int) -> "KVCache":
        """The first ``n`` rows as a cache of their own that shares this one's buffers (a server's
        running rows in a graph that holds ``n``)."""
        view = object.__new__(type(self))
        view.k, view.v = [t[:n] for t in self.k], [t[:n] for t in self.v]
        view.key_mask, view.n_valid, view.length = self.key_mask[:n], self.n_valid[:n], self.length
        return view

    def commit(self, mask: torch.Tensor) -> None:
        """Mark a step begun with ``begin(mask)`` as done (called after every layer has written)."""
        self.length += mask.shape[1]
        self.n_valid += mask.sum(1)

    def reset(self) -> None:
        self.length = 0
        self.key_mask.zero_()
        self.n_valid.zero_()

    def used_columns(self, rows: Sequence[int]) -> int:
        """How many columns, counted back from ``length``, hold a real token of one of ``rows``."""
        if self.length == 0 or not len(rows):
            return 0
        used = self.key_mask[list(rows), :self.length].any(0)  # (length,)
        return self.length - int(used.int().argmax()) if bool(used.any()) else 0

    @classmethod
    def gather(cls, parts: Sequence[Tuple["KVCache", Sequence[int]]], room: int) -> "KVCache":
        """A new cache holding, in order, rows ``rows`` of each ``(cache, rows)`` in ``parts``, with
        ``room`` free columns for the steps to come: how a running batch takes in new rows and lets
        finished ones go (continuous batching).

        Each row's keys keep their order and end at the shared write column; columns that no kept row
        uses are dropped. Padding columns are masked and positions count real tokens (``n_valid``), so
        every row attends to exactly what it attended to before.

        >>> a = KVCache(n_layers=1, batch_size=2, n_heads=1, max_length=8, d_head=4)
        >>> KVCache.gather([(a, [1]), (a, [0])], room=4).batch_size
        2
        """
        first = next(c for c, _ in parts)
        width = max(c.used_columns(rows) for c, rows in parts)
        batch = sum(len(rows) for _, rows in parts)
        _, n_heads, _, d_head = first.k[0].shape
        out = cls(len(first.k), batch, n_heads, width + room, d_head, first.k[0].dtype,
                  [k.device for k in first.k], first.key_mask.device)
        row = 0
        for cache, rows in parts:
            if not len(rows):
                continue
            used, index = cache.used_columns(rows), list(rows)
            take, put = slice(cache.length - used, cache.length), slice(width - used, width)
            span = slice(row, row + len(index))
            for layer in range(len(out.k)):
                out.k[layer][span, :, put] = cache.k[layer][index, :, take]
                out.v[layer][span, :, put] = cache.v[layer][index, :, take]
            out.key_mask[span, put] = cache.key_mask[index, take]
            out.n_valid[span] = cache.n_valid[index]
            row += len(index)
        out.length = width
        return out


class CrossKVCache:
    """Cross-attention keys/values over the encoder output: computed once per prompt, then reused."""

    def __init__(self, n_layers: int, batch_size: int, n_heads: int, source_length: int, d_head: int,
                 dtype: torch.dtype = torch.float32, device=None):
        shape = (batch_size, n_heads, source_length, d_head)
        devices = _per_layer(device, n_layers)
        self.k = [torch.zeros(shape, dtype=dtype, device=d) for d in devices]
        self.v = [torch.zeros(shape, dtype=dtype, device=d) for d in devices]
        self.filled = [False] * n_layers

    def layer(self, i: int) -> "CrossLayerKV":
        return CrossLayerKV(self, i)

    def reset(self) -> None:
        """Forget the stored keys/values: the next step computes them from a new encoder output."""
        self.filled = [False] * len(self.filled)

    def rows(self, n: int, source: int) -> "CrossKVCache":
        """The first ``n`` rows and ``source`` positions, sharing this cache's buffers (see ``KVCache.rows``)."""
        view = object.__new__(type(self))
        view.k, view.v = [t[:n, :, :source] for t in self.k], [t[:n, :, :source] for t in self.v]
        view.filled = list(self.filled)
        return view

    @classmethod
    def gather(cls, parts: Sequence[Tuple["CrossKVCache", Sequence[int]]]) -> "CrossKVCache":
        """A new, filled cache holding, in order, rows ``rows`` of each filled ``(cache, rows)``; shorter
        sources are padded at the end (the caller pads the encoder mask the same way).

        >>> a = CrossKVCache(n_layers=1, batch_size=2, n_heads=1, source_length=3, d_head=4)
        >>> a.filled = [True]
        >>> CrossKVCache.gather([(a, [0]), (a, [1, 0])]).k[0].shape
        torch.Size([3, 1, 3, 4])
        """
        first = next(c for c, _ in parts)
        if not all(all(c.filled) for c, _ in parts):
            raise ValueError("only filled cross-attention caches can be gathered (run a decode step first)")
        source = max(c.k[0].shape[2] for c, _ in parts)
        batch = sum(len(rows) for _, rows in parts)
        _, n_heads, _, d_head = first.k[0].shape
        out = cls(len(first.k), batch, n_heads, source, d_head, first.k[0].dtype, [k.device for k in first.k])
        row = 0
        for cache, rows in parts:
            index, n = list(rows), cache.k[0].shape[2]
            for layer in range(len(out.k)):
                out.k[layer][row:row + len(index), :, :n] = cache.k[layer][index]
                out.v[layer][row:row + len(index), :, :n] = cache.v[layer][index]
            row += len(index)
        out.filled = [True] * len(out.k)
        return out


class CrossLayerKV:
    def __init__(self, cache: CrossKVCache, i: int):
        self.cache, self.i = cache, i

    def get(self) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        return (self.cache.k[self.i], self.cache.v[self.i]) if self.cache.filled[self.i] else None

    def set(self, k: torch.Tensor, v: torch.Tensor) -> None:
        want = self.cache.k[self.i].shape
        if k.shape != want or v.shape != want:
            # copy_ would broadcast a batch-1 encoder output into every row without a word
            raise ValueError(f"cross-attention keys of shape {tuple(k.shape)} do not fit the cache's {tuple(want)} "
                             "(batch, heads, source length, d_head)")
        self.cache.k[self.i].copy_(k)
        self.cache.v[self.i].copy_(v)
        self.cache.filled[self.i] = True
