import math

import torch
import torch.nn as nn


def relative_position_bucket(query_pos: torch.Tensor, key_pos: torch.Tensor, bidirectional: bool,
                             num_buckets: int = 32, max_distance: int = 128) -> torch.Tensor:
    """T5 bucket of every (query, key) pair: exact for small distances, log-spaced up to ``max_distance``.

    ``query_pos`` (S,) and ``key_pos`` (T,) are absolute positions; returns (S, T) int64. Positions
    may also be per row, (batch, S) and (batch, T), giving (batch, S, T).
    In the bidirectional case half of the buckets are for keys before the query, half for keys
    after it; the unidirectional (decoder) case treats every later key as distance 0.
    """
    distance = query_pos[..., :, None] - key_pos[..., None, :]  # > 0: key lies in the past
    offset = torch.zeros_like(distance)
    if bidirectional:
        num_buckets //= 2
        offset = (distance < 0).long() * num_buckets
        distance = distance.abs()
    else:
        distance = distance.clamp(min=0)
    exact = num_buckets // 2
    # log-spaced buckets beyond the exact range; clamp(min=1) only keeps log() finite where unused
    log_ratio = torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact)
    far = (exact + (log_ratio * (num_buckets - exact)).long()).clamp(max=num_buckets - 1)
    return offset + torch.where(distance < exact, distance, far)


class RelativePositionBias(nn.Module):
    """Learned per-head bias over relative-position buckets, computed once per stack.

    ``weight`` is (heads, num_buckets) as in BMInf's checkpoints (HF stores the transpose).
    """

    def __init__(self, n_heads: int, num_buckets: int = 32, max_distance: int = 128, bidirectional: bool = True):
        super().__init__()
        exact = num_buckets // (4 if bidirectional else 2)
        if max_distance <= exact:
            # the log-spaced range would be empty (a division by log(1) = 0)
            raise ValueError(f"max_distance ({max_distance}) must exceed {exact} for {num_buckets} buckets")
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.bidirectional = bidirectional
        self.weight = nn.Parameter(torch.zeros(n_heads, num_buckets))

    def forward(self, query_pos: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor:
        """(heads, S, T) bias for queries at ``query_pos`` (S,) and keys at ``key_pos`` (T,); with
        positions per row, (batch, S) and (batch, T), it is (batch, heads, S, T)."""
        buckets = relative_position_bucket(query_pos, key_pos, self.bidirectional, self.num_buckets,
                                           self.max_distance)
        return self.weight[:, buckets].movedim(0, -3)  # heads before (S, T)

    def extra_repr(self) -> str:
        return f"heads={self.weight.shape[0]}, buckets={self.num_buckets}, max_distance={self.max_distance}, " \
               f"bidirectional={self.bidirectional}"
