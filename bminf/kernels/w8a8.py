"""Optional W8A8 path for long inputs (prefill, encoder): int8 x int8 tensor-core GEMM via ``torch._int_mm``.

The default path for more than a few rows dequantizes the int8 weight to fp16 (one kernel) and runs
fp16 cuBLAS: weight-only numerics, equal to a float model holding the dequantized weights. Here
each row of ``x`` is quantized too, symmetric absmax/127 per token, so the GEMM reads the weight
once as int8 and runs on int8 tensor cores (twice the fp16 rate), accumulating exactly in int32;
the result is scaled by (token scale x row scale) in fp32. Numerics change: each activation is
rounded to 1/254 of its row's range (relative error of the output ~0.5% on random data; the
test allows 2%). Off unless ``BMINF_PREFILL=w8a8``.

Measured on the H200 (benchmark/results/h200_cpm2_encoder_run3.json, CPM-2 encoder, 256 tokens) it
is slower than the default, 4,333 vs 11,041 tokens/s at batch 1 and 26,425 vs 42,508 at batch 8,
and the encoder output of the random-weight model moved by up to 124% of its largest value: the
default stays weight-only. Kept for GPUs whose int8 GEMM is relatively faster, and for tuning. Its
numerics on CUDA have not been checked against the reference yet (``test_w8a8_on_gpu`` does that;
it has not run), so a fault there is not ruled out as the cause of that large difference.

>>> q = torch.randint(-127, 128, (64, 32), dtype=torch.int8)
>>> y = int8_linear(torch.randn(20, 32), q, torch.full((64,), 0.01, dtype=torch.float16))
>>> y.shape
torch.Size([20, 64])
"""
import os
from typing import Optional

import torch

MIN_ROWS = 17  # torch._int_mm needs more than 16 rows


def enabled() -> bool:
    value = os.environ.get("BMINF_PREFILL", "fp16")
    if value not in ("fp16", "w8a8"):
        raise ValueError(f"BMINF_PREFILL must be 'fp16' or 'w8a8', got {value!r}")
    return value == "w8a8"


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    n, k = weight.shape
    rows = x.numel() // max(k, 1)
    return rows >= MIN_ROWS and not (k % 8 or n % 8) and x.is_floating_point() and enabled()


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ (weight * scale[:, None]).T + bias`` with ``x`` quantized per row to int8."""
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    x_scale = (x2.abs().amax(-1, keepdim=True).float() / 127).clamp_(min=1e-12)  # (M, 1)
    xq = torch.round(x2.float() / x_scale).clamp_(-127, 127).to(torch.int8)
    acc = torch._int_mm(xq, weight.t())                                             # (M, N) int32, exact
    y = acc.float() * x_scale * scale.float()[None, :]
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], n)
