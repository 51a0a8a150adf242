import torch
import torch.nn as nn

from ..kernels import triton_norm


class RMSNorm(nn.Module):
    """T5's norm: no mean, no bias; statistics in fp32, the result cast back before the gain."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if triton_norm.supports(x):  # one fused kernel on CUDA (same rounding steps)
            return triton_norm.rms_norm(x, self.weight, self.eps)
        return triton_norm.reference(x, self.weight, self.eps)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters and checkpoint keys) that runs as one Triton kernel on CUDA,
    and can take the residual add before it into the same kernel (``add_and_norm``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return triton_norm.layer_norm(x, self.weight, self.bias, self.eps)

    def add_and_norm(self, x: torch.Tensor, h: torch.Tensor):
        """``(x + h, self(x + h))``."""
        return triton_norm.layer_norm(x, self.weight, self.bias, self.eps, h)
