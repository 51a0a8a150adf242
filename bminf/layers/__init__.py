"""Building blocks shared by the GPT and T5 backbones."""
from .attention import Attention, additive_mask, causal_mask, check_cache_size, check_ids
from .feedforward import FeedForward, GatedFeedForward
from .kv_cache import CrossKVCache, KVCache, LayerKV
from .norm import LayerNorm, RMSNorm
from .position_bias import RelativePositionBias, relative_position_bucket

__all__ = ["Attention", "additive_mask", "causal_mask", "check_cache_size", "check_ids", "FeedForward",
           "GatedFeedForward", "KVCache", "CrossKVCache", "LayerKV", "LayerNorm", "RMSNorm", "RelativePositionBias",
           "relative_position_bucket"]
