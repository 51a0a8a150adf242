"""Decoder-only GPT backbone (CPM-1): learned positions, pre-LayerNorm, tanh GELU, biases, tied LM head."""
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import (Attention, FeedForward, KVCache, LayerNorm, additive_mask, causal_mask, check_cache_size,
                      check_ids)
from .config_checks import check_config_fields


@dataclass
class GPTConfig:
    vocab_size: int = 30000
    max_positions: int = 1024
    d_model: int = 2560
    d_ff: int = 10240
    n_heads: int = 32
    d_head: int = 80
    n_layers: int = 32
    eps: float = 1e-5

    def __post_init__(self):
        check_config_fields(self, ints=("vocab_size", "max_positions", "d_model", "d_ff", "n_heads", "d_head",
                                        "n_layers"), floats=("eps",))
        # GPT-2's layout (CPM-1, its HF checkpoints) splits d_model evenly into the heads
        if self.n_heads * self.d_head != self.d_model:
            raise ValueError(f"GPTConfig: n_heads * d_head ({self.n_heads} * {self.d_head}) must equal d_model "
                             f"({self.d_model})")


GPT_PRESETS = {
    "cpm1": dict(vocab_size=30000, max_positions=1024, d_model=2560, d_ff=10240, n_heads=32, d_head=80,
                 n_layers=32, eps=1e-5),
    "cpm1-demo": dict(vocab_size=6000, max_positions=512, d_model=256, d_ff=768, n_heads=4, d_head=64, n_layers=6,
                      eps=1e-5),
}


class GPTBlock(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        d = config.d_model
        self.ln_attn = LayerNorm(d, eps=config.eps)
        self.self_attn = Attention(d, config.n_heads, config.d_head, bias=True, scale=1 / math.sqrt(config.d_head))
        self.ln_ff = LayerNorm(d, eps=config.eps)
        self.ff = FeedForward(d, config.d_ff, bias=True)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, kv=None) -> torch.Tensor:
        # x + attn, and the norm of that, in one kernel on CUDA
        x, h = self.ln_ff.add_and_norm(x, self.self_attn(self.ln_attn(x), bias, kv))
        return self.ff(h, residual=x)  # x + ff(h), the add fused into ff's last GEMV on CUDA


class GPT(nn.Module):
    """CPM-1's backbone. ``forward(input_ids, attention_mask=None, cache=None) -> logits``.

    Padding may sit on either side: positions count real tokens only, so a padded row gives the
    logits it would give alone. With a ``cache`` (from ``new_cache``) the call appends to it and
    returns logits for the new tokens only.

    >>> model = GPT(GPTConfig(vocab_size=50, max_positions=32, d_model=16, d_ff=32, n_heads=2, d_head=8, n_layers=2))
    >>> model(torch.tensor([[1, 2, 3]])).shape
    torch.Size([1, 3, 50])
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        # declaration order follows BMInf's checkpoint tree
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embedding = nn.Embedding(config.max_positions, config.d_model)
        self.layernorm = LayerNorm(config.d_model, eps=config.eps)
        self.layers = nn.ModuleList(GPTBlock(config) for _ in range(config.n_layers))

    def new_cache(self, batch_size: int, max_length: Optional[int] = None, dtype=None, device=None) -> KVCache:
        """A KV cache for ``batch_size`` rows of up to ``max_length`` tokens, on the device of each layer
        (a block list split across GPUs says where through ``block_devices``)."""
        c, w = self.config, self.token_embedding.weight
        max_length = c.max_positions if max_length is None else max_length
        check_cache_size(batch_size, max_length, c.max_positions, "max_positions")
        home = device or w.device
        return KVCache(c.n_layers, batch_size, c.n_heads, max_length, c.d_head,
                       dtype=dtype or w.dtype, device=device or getattr(self.layers, "block_devices", None) or home,
                       mask_device=home)

    def hidden_states(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                      cache: Optional[KVCache] = None, inputs_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Final-norm hidden states (batch, seq, d_model); ``inputs_embeds`` replaces the token embedding."""
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids or inputs_embeds")
            check_ids(input_ids, self.config.vocab_size, step=cache is not None)
        elif inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.d_model:
            raise ValueError(f"inputs_embeds must be (batch, seq, {self.config.d_model}), "
                             f"got {tuple(inputs_embeds.shape)}")
        # refuse over-long inputs before the embedding is allocated
        start = cache.length if cache is not None else 0
        batch, seq = (input_ids if inputs_embeds is None else inputs_embeds).shape[:2]
        if start + seq > self.config.max_positions:
            raise ValueError(f"{start + seq} tokens exceed the model's {self.config.max_positions} positions "
                             "(max_positions)")
        if inputs_embeds is None:
            x = self.token_embedding(input_ids)
        else:
            x = inputs_embeds.to(self.token_embedding.weight.dtype)
        mask = torch.ones(batch, seq, dtype=torch.bool, device=x.device) if attention_mask is None \
            else attention_mask.to(device=x.device, dtype=torch.bool)
        if mask.shape != (batch, seq):
            raise ValueError(f"attention_mask shape {tuple(mask.shape)} does not match input {(batch, seq)}")

        # absolute position = number of real tokens before this one in its row
        positions = (mask.long().cumsum(1) - 1).clamp(min=0)
        key_mask = mask
        if cache is not None:
            positions = positions + cache.n_valid[:, None]
            key_mask = cache.begin(mask)
        x = x + self.position_embedding(positions)

        allowed, _, _ = causal_mask(key_mask, start, seq)
        bias = additive_mask(allowed, x.dtype)[:, None]  # (batch, 1, seq, keys)

        for i, block in enumerate(self.layers):
            x = block(x, bias, cache.layer(i) if cache is not None else None)
        if cache is not None:
            cache.commit(mask)
        return self.layernorm(x)

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.token_embedding.weight)  # tied, unscaled

    def forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None, inputs_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.lm_head(self.hidden_states(input_ids, attention_mask, cache, inputs_embeds))
