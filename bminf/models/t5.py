"""Encoder-decoder T5 v1.1-style backbone (CPM-2, EVA): RMSNorm, gated GELU, no biases, no attention
scaling, one relative position bias per stack, untied and unscaled LM head."""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import triton_norm
from ..layers import (Attention, CrossKVCache, GatedFeedForward, KVCache, RelativePositionBias, RMSNorm,
                      additive_mask, causal_mask, check_cache_size, check_ids)
from .config_checks import check_config_fields


@dataclass
class T5Config:
    vocab_size: int = 26240
    d_model: int = 4096
    d_ff: int = 10240
    n_heads: int = 64
    d_head: int = 64
    n_encoder_layers: int = 24
    n_decoder_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6
    # longest encoder input and decoder sequence accepted: attention scores grow with its square
    # (64 heads x 2048^2 x 2 bytes = 512 MiB per row for CPM-2 in fp16); BMInf 1.x's 512 MB pool
    # allowed about 1000 encoder tokens. Longer inputs are refused before anything is allocated.
    max_length: int = 2048

    def __post_init__(self):
        check_config_fields(self, ints=("vocab_size", "d_model", "d_ff", "n_heads", "d_head", "n_encoder_layers",
                                        "n_decoder_layers", "num_buckets", "max_distance", "max_length"),
                            floats=("eps",))
        # the encoder's bidirectional bias splits the buckets in half, each half exact then log-spaced
        if self.num_buckets % 2 or self.num_buckets < 4:
            raise ValueError(f"T5Config.num_buckets must be even and >= 4, got {self.num_buckets}")
        if self.max_distance <= self.num_buckets // 2:
            raise ValueError(f"T5Config.max_distance ({self.max_distance}) must exceed num_buckets // 2 "
                             f"({self.num_buckets // 2}), where the decoder's log-spaced buckets start")


T5_PRESETS = {
    "cpm2": dict(vocab_size=26240, d_model=4096, d_ff=10240, n_heads=64, d_head=64, n_encoder_layers=24,
                 n_decoder_layers=24, num_buckets=32, max_distance=128, eps=1e-6),
    # BMInf 1.x runs EVA with max_distance 256; EVA's own training code used 128
    "eva": dict(vocab_size=30000, d_model=2048, d_ff=5120, n_heads=32, d_head=64, n_encoder_layers=24,
                n_decoder_layers=24, num_buckets=32, max_distance=256, eps=1e-6),
    # the demo checkpoints that ship in bminf/demo (scripts/make_demo.py)
    "cpm2-demo": dict(vocab_size=6000, d_model=192, d_ff=512, n_heads=4, d_head=48, n_encoder_layers=3,
                      n_decoder_layers=3, num_buckets=32, max_distance=128, eps=1e-6),
    "eva-demo": dict(vocab_size=5800, d_model=192, d_ff=512, n_heads=4, d_head=48, n_encoder_layers=3,
                     n_decoder_layers=3, num_buckets=32, max_distance=256, eps=1e-6),
}


class EncoderBlock(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        d = config.d_model
        self.ln_attn = RMSNorm(d, config.eps)
        self.self_attn = Attention(d, config.n_heads, config.d_head, bias=False, scale=1.0)
        self.ln_ff = RMSNorm(d, config.eps)
        self.ff = GatedFeedForward(d, config.d_ff)

    def forward(self, x: torch.Tensor, ff_before: Optional[torch.Tensor], bias: torch.Tensor):
        """``(x, ff)``: the residual stream and this block's feed-forward output, not yet added (see
        ``add_and_norm``); ``ff_before`` is the block before's (None for the first block)."""
        x, y = add_and_norm(x, ff_before, self.ln_attn)
        x, y = residual(x, self.self_attn(y, bias), self.ln_ff)
        return x, self.ff(y)


class DecoderBlock(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        d = config.d_model
        self.ln_attn = RMSNorm(d, config.eps)
        self.self_attn = Attention(d, config.n_heads, config.d_head, bias=False, scale=1.0)
        self.ln_cross_attn = RMSNorm(d, config.eps)
        self.cross_attn = Attention(d, config.n_heads, config.d_head, bias=False, scale=1.0)
        self.ln_ff = RMSNorm(d, config.eps)
        self.ff = GatedFeedForward(d, config.d_ff)

    def forward(self, x: torch.Tensor, ff_before: Optional[torch.Tensor], self_bias: torch.Tensor,
                source: Optional[torch.Tensor], cross_bias: torch.Tensor, kv=None, cross_kv=None):
        """``(x, ff)`` as ``EncoderBlock.forward``."""
        x, y = add_and_norm(x, ff_before, self.ln_attn)
        x, y = residual(x, self.self_attn(y, self_bias, kv), self.ln_cross_attn)
        x, y = residual(x, self.cross_attn(y, cross_bias, source=source, cross_kv=cross_kv), self.ln_ff)
        return x, self.ff(y)


def residual(x: torch.Tensor, h: torch.Tensor, norm: Optional[RMSNorm] = None):
    """``(x + h, norm(x + h))``, the sum clamped in fp16 where it overflowed (``clamp_fp16``); one
    kernel on CUDA. ``norm(...)`` is None without a norm."""
    return triton_norm.residual(x, h, None if norm is None else norm.weight, norm.eps if norm is not None else 0.0)


def add_and_norm(x: torch.Tensor, ff: Optional[torch.Tensor], norm: RMSNorm):
    """``(x + ff, norm(x + ff))``, or ``(x, norm(x))`` without ``ff``. A block's last residual add waits
    for the norm after it (the next block's first, or the stack's final norm): one kernel for both
    instead of two, 24 fewer launches in a decode step, with the same numbers (on an H200, EVA's
    graphed step went from 1021 to 1046 tokens/s, CPM-2's from 469 to 470; h200_run27.log)."""
    return (x, norm(x)) if ff is None else residual(x, ff, norm)


def clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    """fp16 only: T5's residual stream can outgrow fp16, and one inf becomes NaN in the next RMSNorm.
    As HF's T5 does, a token whose activations hold an inf is clamped to 1000 below fp16's largest
    (HF clamps the whole batch; per token, one row's overflow leaves the others' numbers alone).
    Other dtypes, and fp16 without overflow, pass through unchanged."""
    return triton_norm.clamp_rows(x)


class T5Cache:
    """Decoder run state: self-attention keys/values, and the cross-attention keys/values that are
    computed from the encoder output on the first step and reused after it."""

    def __init__(self, self_kv: KVCache, cross: CrossKVCache, encoder_mask: torch.Tensor):
        self.self_kv, self.cross, self.encoder_mask = self_kv, cross, encoder_mask

    @property
    def length(self) -> int:
        return self.self_kv.length

    def reset(self, encoder_mask: Optional[torch.Tensor] = None) -> None:
        """Empty the cache for a new prompt of the same batch and source length; ``encoder_mask``
        (batch, source_len) replaces the old prompt's mask. The next ``decode`` needs ``encoder_output``.

        >>> cache.reset(new_mask)                                 # doctest: +SKIP
        """
        if encoder_mask is not None and tuple(encoder_mask.shape) != tuple(self.encoder_mask.shape):
            raise ValueError(f"encoder_mask of shape {tuple(encoder_mask.shape)} does not fit this cache's "
                             f"{tuple(self.encoder_mask.shape)}; make a new cache with new_cache")
        self.self_kv.reset()
        self.cross.reset()
        if encoder_mask is not None:
            self.encoder_mask = encoder_mask.to(device=self.encoder_mask.device, dtype=torch.bool)


class T5(nn.Module):
    """CPM-2 / EVA backbone.

    ``forward(input_ids, attention_mask=None, decoder_input_ids=..., decoder_attention_mask=None) -> logits``;
    for generation, ``encode`` once, then ``decode`` step by step with a cache from ``new_cache``.
    Inputs longer than ``config.max_length`` are refused. Padding may sit on either side of the
    decoder input: relative positions count real tokens only. In fp16, activations that overflow
    are clamped as HF's T5 does (``clamp_fp16``).

    >>> cfg = T5Config(vocab_size=40, d_model=16, d_ff=32, n_heads=2, d_head=8, n_encoder_layers=1, n_decoder_layers=1)
    >>> T5(cfg)(torch.tensor([[3, 4, 5]]), decoder_input_ids=torch.tensor([[1]])).shape
    torch.Size([1, 1, 40])
    """

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        c = config
        # declaration order follows BMInf's checkpoint tree
        self.enc_layers = nn.ModuleList(EncoderBlock(c) for _ in range(c.n_encoder_layers))
        self.dec_layers = nn.ModuleList(DecoderBlock(c) for _ in range(c.n_decoder_layers))
        self.ln_enc = RMSNorm(c.d_model, c.eps)
        self.ln_dec = RMSNorm(c.d_model, c.eps)
        self.input_embedding = nn.Embedding(c.vocab_size, c.d_model)
        self.output_embedding = nn.Embedding(c.vocab_size, c.d_model)
        self.position_bias_enc = RelativePositionBias(c.n_heads, c.num_buckets, c.max_distance, bidirectional=True)
        self.position_bias_dec = RelativePositionBias(c.n_heads, c.num_buckets, c.max_distance, bidirectional=False)

    def _embed(self, ids: Optional[torch.Tensor], embeds: Optional[torch.Tensor], mask: Optional[torch.Tensor],
               name: str, step: bool = False):
        if embeds is None:
            if ids is None:
                raise ValueError(f"pass {name} or its embeddings")
            check_ids(ids, self.config.vocab_size, name, step)
            seq = ids.shape[1]
        else:
            if embeds.dim() != 3 or embeds.shape[-1] != self.config.d_model:
                raise ValueError(f"embeddings for {name} must be (batch, seq, {self.config.d_model}), "
                                 f"got {tuple(embeds.shape)}")
            seq = embeds.shape[1]
        if seq > self.config.max_length:
            raise ValueError(f"{name} has {seq} tokens, more than the model's max_length ({self.config.max_length}); "
                             "shorten the input, or raise T5Config.max_length if memory allows")
        x = (self.input_embedding(ids) if embeds is None else embeds).to(self.input_embedding.weight.dtype)
        batch, seq = x.shape[:2]
        mask = torch.ones(batch, seq, dtype=torch.bool, device=x.device) if mask is None \
            else mask.to(device=x.device, dtype=torch.bool)
        if mask.shape != (batch, seq):
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match {name} {(batch, seq)}")
        return x, mask

    def encode(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
               inputs_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Encoder output (batch, seq, d_model) after the final norm."""
        x, mask = self._embed(input_ids, inputs_embeds, attention_mask, "input_ids")
        return self.encode_embeddings(x, mask)

    def encode_embeddings(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``encode`` from checked embeddings (batch, seq, d_model) and a bool mask (batch, seq):
        device work only, no host syncs (what a CUDA graph records)."""
        pos = torch.arange(x.shape[1], device=x.device)
        # (batch, heads, seq, seq): relative bias plus key padding
        bias = self.position_bias_enc(pos, pos)[None].to(x.dtype) + additive_mask(mask, x.dtype)[:, None, None, :]
        ff = None
        for block in self.enc_layers:
            x, ff = block(x, ff, bias)
        return add_and_norm(x, ff, self.ln_enc)[1]

    def new_cache(self, encoder_mask: torch.Tensor, max_length: int = 256, dtype=None, device=None) -> T5Cache:
        """A decoder cache for a batch whose encoder mask is ``encoder_mask`` (batch, source_len)."""
        c, w = self.config, self.input_embedding.weight
        if not isinstance(encoder_mask, torch.Tensor):
            raise TypeError(f"encoder_mask must be a (batch, source_len) tensor, got {type(encoder_mask).__name__}")
        if encoder_mask.dim() != 2:
            raise ValueError(f"encoder_mask must be (batch, source_len), got shape {tuple(encoder_mask.shape)}")
        batch, source_len = encoder_mask.shape
        check_cache_size(batch, max_length, c.max_length, "max_length")
        if source_len > c.max_length:
            raise ValueError(f"encoder_mask covers {source_len} tokens, more than the model's max_length "
                             f"({c.max_length})")
        dtype, home = dtype or w.dtype, device or w.device
        # each decoder layer's cache on its device (a block list split across GPUs says where)
        layers = device or getattr(self.dec_layers, "block_devices", None) or home
        self_kv = KVCache(c.n_decoder_layers, batch, c.n_heads, max_length, c.d_head, dtype, layers, home)
        cross = CrossKVCache(c.n_decoder_layers, batch, c.n_heads, source_len, c.d_head, dtype, layers)
        return T5Cache(self_kv, cross, encoder_mask.to(device=home, dtype=torch.bool))

    def decode(self, decoder_input_ids: Optional[torch.Tensor] = None, encoder_output: Optional[torch.Tensor] = None,
               encoder_mask: Optional[torch.Tensor] = None, decoder_attention_mask: Optional[torch.Tensor] = None,
               cache: Optional[T5Cache] = None, decoder_inputs_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Decoder logits (batch, seq, vocab). With a cache, ``encoder_output`` is needed on the first step only."""
        x, mask = self._embed(decoder_input_ids, decoder_inputs_embeds, decoder_attention_mask,
                              "decoder_input_ids", step=cache is not None)
        batch, seq = x.shape[:2]
        if cache is not None:
            encoder_mask = cache.encoder_mask
        if encoder_output is None and (cache is None or not all(cache.cross.filled)):
            raise ValueError("decode needs encoder_output " + ("on a cache's first step" if cache is not None
                                                               else "when no cache is given"))
        if encoder_output is not None:
            self._check_encoder_output(encoder_output, encoder_mask, batch)
        if cache is not None:
            start, key_mask = cache.length, cache.self_kv.begin(mask)
        else:
            start, key_mask = 0, mask
        if encoder_mask is None:
            encoder_mask = torch.ones(encoder_output.shape[:2], dtype=torch.bool, device=x.device)

        allowed, _, _ = causal_mask(key_mask, start, seq)
        # relative positions count each row's real tokens: a right-padded prefix leaves gaps in the
        # cache's slots, which must not count as distance (left padding and none are unchanged)
        real_pos = key_mask.long().cumsum(1) - 1  # (batch, keys)
        self_bias = self.position_bias_dec(real_pos[:, start:], real_pos).to(x.dtype) + \
            additive_mask(allowed, x.dtype)[:, None]  # (batch, heads, seq, keys)
        cross_bias = additive_mask(encoder_mask.to(x.device, torch.bool), x.dtype)[:, None, None, :]

        ff = None
        for i, block in enumerate(self.dec_layers):
            kv = cache.self_kv.layer(i) if cache is not None else None
            cross_kv = cache.cross.layer(i) if cache is not None else None
            x, ff = block(x, ff, self_bias, encoder_output, cross_bias, kv, cross_kv)
        if cache is not None:
            cache.self_kv.commit(mask)
        return self.lm_head(add_and_norm(x, ff, self.ln_dec)[1])

    def _check_encoder_output(self, encoder_output: torch.Tensor, encoder_mask: Optional[torch.Tensor],
                              batch: int) -> None:
        # a batch-1 encoder output would broadcast silently into a batch-N attention
        if encoder_output.dim() != 3 or encoder_output.shape[0] != batch or \
                encoder_output.shape[2] != self.config.d_model:
            raise ValueError(f"encoder_output must be (batch={batch}, source_len, {self.config.d_model}) like the "
                             f"decoder input, got {tuple(encoder_output.shape)}")
        if encoder_mask is not None and tuple(encoder_mask.shape) != tuple(encoder_output.shape[:2]):
            raise ValueError(f"encoder mask of shape {tuple(encoder_mask.shape)} does not match encoder_output "
                             f"{tuple(encoder_output.shape[:2])}")

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.output_embedding.weight)  # untied, unscaled

    def forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                decoder_input_ids: Optional[torch.Tensor] = None, decoder_attention_mask: Optional[torch.Tensor] = None,
                inputs_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        if decoder_input_ids is None:
            raise ValueError("T5 forward needs decoder_input_ids")
        encoder_output = self.encode(input_ids, attention_mask, inputs_embeds)
        mask = attention_mask if attention_mask is not None else \
            torch.ones(encoder_output.shape[:2], dtype=torch.bool, device=encoder_output.device)
        return self.decode(decoder_input_ids, encoder_output, mask, decoder_attention_mask)
