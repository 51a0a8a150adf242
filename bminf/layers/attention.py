from typing import Optional, Tuple

import torch
import torch.nn as nn

from ..kernels import attention, int8_linear_group
from .kv_cache import CrossLayerKV, LayerKV


class Attention(nn.Module):
    """Multi-head attention with separate Q/K/V projections, named as BMInf's checkpoints name them.

    ``scale`` multiplies QK^T: 1/sqrt(d_head) for GPT, 1.0 for T5 (which folds it into the weights).
    """

    def __init__(self, d_model: int, n_heads: int, d_head: int, bias: bool, scale: float):
        super().__init__()
        self.n_heads, self.d_head, self.scale = n_heads, d_head, scale
        inner = n_heads * d_head
        self.project_q = nn.Linear(d_model, inner, bias=bias)
        self.project_k = nn.Linear(d_model, inner, bias=bias)
        self.project_v = nn.Linear(d_model, inner, bias=bias)
        self.linear_out = nn.Linear(inner, d_model, bias=bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        # (batch, seq, heads * d_head) -> (batch, heads, seq, d_head)
        return x.unflatten(-1, (self.n_heads, self.d_head)).transpose(1, 2)

    def project_kv(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self._heads(self.project_k(x)), self._heads(self.project_v(x))

    def forward(self, x: torch.Tensor, bias: torch.Tensor, kv: Optional[LayerKV] = None,
                source: Optional[torch.Tensor] = None, cross_kv: Optional[CrossLayerKV] = None) -> torch.Tensor:
        """Attend from ``x`` (batch, S, d_model).

        ``bias`` is added to the scores, broadcastable to (batch, heads, S, T): the mask as 0/-large
        plus any position bias. Self-attention reads keys from ``x`` (and ``kv``, the layer's cache);
        cross-attention from ``source`` (batch, T, d_model), or from ``cross_kv`` once it is filled.
        """
        if source is None and cross_kv is None:
            # self-attention: q, k and v in one kernel launch when decoding int8 on CUDA
            q, k, v = (self._heads(t) for t in int8_linear_group(x, (self.project_q, self.project_k, self.project_v)))
            # the cache stores this step's keys/values and attends over all of them
            out = kv.attend(q, k, v, bias, self.scale) if kv is not None else attention(q, k, v, bias, self.scale)
        else:
            q = self._heads(self.project_q(x))
            stored = cross_kv.get() if cross_kv is not None else None
            if stored is None:
                if source is None:
                    raise ValueError("cross-attention needs the encoder output on the first step")
                stored = self.project_kv(source)
                if cross_kv is not None:
                    cross_kv.set(*stored)
            out = attention(q, *stored, bias, self.scale)
        return self.linear_out(out.transpose(1, 2).flatten(2))


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where attention is allowed, a large negative number elsewhere.

    Half of the dtype's minimum rather than -inf: a fully masked row (a padding query) then stays
    finite, and adding a position bias cannot overflow to -inf.
    """
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
        ~allowed, torch.finfo(dtype).min / 2)


def causal_mask(key_mask: torch.Tensor, start: int, seq: int):
    """Which keys each of ``seq`` new queries may see: real keys at or before its own position.

    ``key_mask`` (batch, keys) marks real tokens over the whole buffer and the queries sit at
    positions ``start .. start + seq - 1`` of it. Returns ``(allowed, query_pos, key_pos)`` with
    ``allowed`` (batch, seq, keys) bool.
    """
    query_pos = torch.arange(start, start + seq, device=key_mask.device)
    key_pos = torch.arange(key_mask.shape[1], device=key_mask.device)
    allowed = key_mask[:, None, :] & (key_pos[None, None, :] <= query_pos[None, :, None])
    return allowed, query_pos, key_pos


def check_ids(input_ids: torch.Tensor, vocab_size: int, name: str = "input_ids", step: bool = False) -> None:
    """Reject ids that nn.Embedding would fail on with an opaque index error (on CUDA: a device-side
    assert that ends the process's CUDA context).

    ``step=True`` marks a call continuing on a cache: for one token on an accelerator the range check
    would cost a host sync per generated token, so it is skipped there (kept on the CPU, where it
    costs nothing).
    """
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dim() != 2:
        raise ValueError(f"{name} must be (batch, seq), got shape {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must hold integer token ids, got {input_ids.dtype}")
    if step and input_ids.shape[1] == 1 and input_ids.device.type != "cpu":
        return
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        raise ValueError(f"{name} holds ids outside [0, {vocab_size}): min {int(input_ids.min())}, "
                         f"max {int(input_ids.max())}")


def check_cache_size(batch_size: int, max_length: int, limit: int, limit_name: str) -> None:
    """A cache of ``batch_size`` rows x ``max_length`` tokens must be positive and within the model's
    ``limit`` (its config field ``limit_name``): checked before anything is allocated."""
    for arg, value in (("batch_size", batch_size), ("max_length", max_length)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{arg} must be an int, got {type(value).__name__} {value!r}")
        if value < 1:
            raise ValueError(f"{arg} must be >= 1, got {value}")
    if max_length > limit:
        raise ValueError(f"max_length {max_length} exceeds the model's {limit_name} ({limit})")
