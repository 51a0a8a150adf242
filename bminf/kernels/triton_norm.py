"""T5's RMSNorm as one Triton kernel for CUDA fp16/bf16 rows.

In PyTorch the norm is eight small kernels (widen, square, mean, add, rsqrt, multiply, narrow,
gain); a decode step of CPM-2 runs 73 of them, and in a CUDA graph each costs a launch slot that
is worth more than its arithmetic. The kernel follows the same order of rounding as
``bminf.layers.RMSNorm``: statistics in fp32, the normalized row rounded to the input dtype, then
multiplied by the gain (rounded once more), so results match to the last bit except where the fp32
sum over the row is added up in another order.
"""
import functools

import torch

from .triton_int8 import available

MAX_DIM = 16384


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def rms_norm(x_ptr, w_ptr, y_ptr, D, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        ok = cols < D
        x = tl.load(x_ptr + row * D + cols, mask=ok, other=0.0).to(tl.float32)
        r = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
        normed = (x * r).to(y_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(y_ptr.dtype.element_ty).to(tl.float32)
        tl.store(y_ptr + row * D + cols, (normed * w).to(y_ptr.dtype.element_ty), mask=ok)

    return rms_norm, triton.next_power_of_2


def supports(x: torch.Tensor) -> bool:
    return (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and x.shape[-1] <= MAX_DIM
            and x.numel() > 0 and available())


def reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The same norm in PyTorch (what ``bminf.layers.RMSNorm`` computes off CUDA)."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return normed.to(x.dtype) * weight.to(x.dtype)


class _RMSNorm(torch.autograd.Function):
    """The kernel's forward; backward through the PyTorch formula (the kernel choice never depends
    on grad mode, so a block recomputed for backward sees its forward's numbers)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return _forward(x, weight, eps)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        with torch.enable_grad():
            x_, w_ = x.detach().requires_grad_(ctx.needs_input_grad[0]), weight.detach().requires_grad_(ctx.needs_input_grad[1])
            out = reference(x_, w_, ctx.eps)
            wanted = [t for t in (x_, w_) if t.requires_grad]
            grads = iter(torch.autograd.grad(out, wanted, grad)) if wanted else iter(())
        return (next(grads) if ctx.needs_input_grad[0] else None,
                next(grads) if ctx.needs_input_grad[1] else None, None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``(x * rsqrt(mean(x^2) + eps)).to(x.dtype) * weight`` over the last dimension.

    >>> # on a GPU: rms_norm(torch.randn(2, 4096, device="cuda").half(), gain, 1e-6).shape == (2, 4096)
    """
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _RMSNorm.apply(x, weight, eps)
    return _forward(x, weight, eps)


def _forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    kernel, next_pow2 = _kernel()
    d = x.shape[-1]
    x2 = x.reshape(-1, d).contiguous()
    y = torch.empty_like(x2)
    block = next_pow2(d)
    kernel[(x2.shape[0],)](x2, weight.contiguous(), y, d, eps, BLOCK=block, num_warps=min(16, max(1, block // 256)))
    return y.reshape(x.shape)
