from typing import Optional

import torch
import torch.nn as nn

from ..kernels import int8_gated_gelu, int8_linear_add, int8_linear_gelu


class FeedForward(nn.Module):
    """GPT feed-forward: ``linear_out(gelu_tanh(linear_in(x)))``, plus ``residual`` when given."""

    def __init__(self, d_model: int, d_ff: int, bias: bool = True):
        super().__init__()
        self.linear_in = nn.Linear(d_model, d_ff, bias=bias)
        self.linear_out = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        # decoding int8 on CUDA, the GELU and the residual add run in the two GEMVs' epilogues
        h = int8_linear_gelu(x, self.linear_in)
        return self.linear_out(h) if residual is None else int8_linear_add(h, self.linear_out, residual)


class GatedFeedForward(nn.Module):
    """T5 v1.1 feed-forward: ``linear_out(gelu_tanh(linear_in(x)) * linear_gated(x))``.

    ``linear_in`` is the GELU branch (HF ``wi_0``), ``linear_gated`` the linear one (HF ``wi_1``).
    """

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        # declaration order follows BMInf's checkpoint tree
        self.linear_gated = nn.Linear(d_model, d_ff, bias=False)
        self.linear_in = nn.Linear(d_model, d_ff, bias=False)
        self.linear_out = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one kernel for both input linears, the GELU and the product when decoding int8 on CUDA
        return self.linear_out(int8_gated_gelu(x, self.linear_in, self.linear_gated))
