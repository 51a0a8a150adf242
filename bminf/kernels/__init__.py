"""Device kernels behind one small interface.

``int8_linear`` (with its grouped forms) and ``attention`` are the entry points the rest of the
package calls. The portable path below is plain PyTorch; faster device kernels plug in here without
touching callers.
"""
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import cpm_kernels_bridge, triton_attention, triton_gemv, triton_int8, triton_norm, w8a8

__all__ = ["attention", "int8_linear", "int8_linear_group", "int8_gated_gelu", "int8_linear_gelu", "int8_linear_add"]


class _FusedInt8Linear(torch.autograd.Function):
    """A device kernel's forward, with the input (and bias) gradient from the dequantized weight."""

    @staticmethod
    def forward(ctx, kernel, x, weight, scale, bias):
        ctx.save_for_backward(weight, scale)
        ctx.has_bias = bias is not None
        return kernel(x, weight, scale, bias)

    @staticmethod
    def backward(ctx, grad):
        weight, scale = ctx.saved_tensors
        grad_x, grad_b = _linear_grads(grad, weight, scale, ctx.needs_input_grad[1],
                                       ctx.has_bias and ctx.needs_input_grad[4])
        return None, grad_x, None, None, grad_b


def _dequantized(weight, scale, dtype):
    # int8 * float promotes to the float dtype, and the product of an int8 and a 16-bit scale is exact
    # in the fp32 it is computed in, so this equals widening first, then scaling, in one pass; on CUDA
    # a Triton kernel gives the same numbers at HBM speed
    if triton_int8.can_dequantize(weight, scale, dtype):
        return triton_int8.dequantize(weight, scale, dtype)
    return weight * scale.to(dtype)[:, None]


def _linear_grads(grad, weight, scale, want_x: bool, want_b: bool):
    """Input and bias gradients of ``x @ (weight * scale[:, None]).T + bias``, from the dequantized weight."""
    grad_x = grad @ _dequantized(weight, scale, grad.dtype) if want_x else None
    grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if want_b else None
    return grad_x, grad_b


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ (weight * scale[:, None]).T + bias`` for an int8 ``weight`` (out, in) and fp16 ``scale`` (out,).

    The kernel is chosen by device, dtype and shape alone, never by grad mode, so that a block
    recomputed for backward sees the numbers its forward saw.
    """
    # fused int8 decode kernel: weight-only, the weight read once (the memory-bandwidth limit)
    if triton_int8.supports(x, weight):
        return _FusedInt8Linear.apply(triton_int8.int8_linear, x, weight, scale, bias)
    # cpm_kernels (W8A8) where it loaded and passed its self-check on this device
    if x.is_cuda and cpm_kernels_bridge.usable(x.device) and cpm_kernels_bridge.supports(x, weight):
        return _FusedInt8Linear.apply(cpm_kernels_bridge.int8_linear, x, weight, scale, bias)
    # opt-in W8A8 for long inputs (BMINF_PREFILL=w8a8): int8 tensor cores, activations rounded too
    if w8a8.supports(x, weight):
        return w8a8.int8_linear(x, weight, scale, bias)
    # the weight dequantized in one pass, then cuBLAS
    return F.linear(x, _dequantized(weight, scale, x.dtype), None if bias is None else bias.to(x.dtype))


def _one_launch(x: torch.Tensor, linears: Sequence[nn.Module]) -> bool:
    """Whether these int8 linears (``QuantizedLinear``s of one shape) can run on ``x`` as one launch of
    the GEMV (one row) or of the split-K matmul (up to 64 rows): on CUDA where the Triton kernels
    apply. Chosen by device, dtype and shape alone, never by grad mode (see ``int8_linear``)."""
    if x.dim() == 0 or x.numel() // max(x.shape[-1], 1) > triton_int8.MAX_ROWS:
        return False
    first = linears[0]
    for lin in linears:
        weight = getattr(lin, "weight", None)
        if (weight is None or weight.dtype != torch.int8 or getattr(lin, "scale", None) is None
                or weight.shape != first.weight.shape or (lin.bias is None) != (first.bias is None)):
            return False
        if not triton_int8.supports(x, weight):
            return False
    return True


class _GroupInt8Linear(torch.autograd.Function):
    """``int8_linear_many``'s forward; the input and bias gradients from the dequantized weights."""

    @staticmethod
    def forward(ctx, n: int, x, *params):
        weights, scales, biases = params[:n], params[n:2 * n], params[2 * n:]
        ctx.n, ctx.has_bias = n, bool(biases)
        ctx.save_for_backward(*weights, *scales)
        return tuple(triton_int8.int8_linear_many(x, weights, scales, biases or None))

    @staticmethod
    def backward(ctx, *grads):
        n, saved = ctx.n, ctx.saved_tensors
        grad_x, grad_b = None, []
        for i, (g, w, s) in enumerate(zip(grads, saved[:n], saved[n:])):  # unused outputs get zero grads
            want_b = ctx.has_bias and ctx.needs_input_grad[2 + 2 * n + i]
            gx, gb = _linear_grads(g, w, s, ctx.needs_input_grad[1], want_b)
            grad_x = gx if grad_x is None else grad_x + gx
            grad_b.append(gb)
        return (None, grad_x, *([None] * 2 * n), *(grad_b if ctx.has_bias else []))


def int8_linear_group(x: torch.Tensor, linears: Sequence[nn.Module]) -> List[torch.Tensor]:
    """``[lin(x) for lin in linears]`` for up to three int8 linears of one shape on one input
    (attention's q/k/v): one launch on CUDA for up to 64 rows (see ``_one_launch``), the modules one by
    one elsewhere."""
    if 0 < len(linears) <= triton_gemv.MAX_GROUP and _one_launch(x, linears):
        weights, scales = [lin.weight for lin in linears], [lin.scale for lin in linears]
        biases = [lin.bias for lin in linears] if linears[0].bias is not None else []
        if torch.is_grad_enabled() and (x.requires_grad or any(b.requires_grad for b in biases)):
            return list(_GroupInt8Linear.apply(len(linears), x, *weights, *scales, *biases))
        return triton_int8.int8_linear_many(x, weights, scales, biases or None)  # the same, without autograd
    return [lin(x) for lin in linears]


class _Epilogue(torch.autograd.Function):
    """A kernel with its epilogue fused (``triton_int8.int8_linear_gelu`` and kin); gradients from the
    unfused PyTorch formula, recomputed (the kernel is chosen by device, dtype and shape alone)."""

    @staticmethod
    def forward(ctx, fused, formula, *inputs):
        ctx.formula = formula
        ctx.save_for_backward(*inputs)
        return fused(*inputs)

    @staticmethod
    def backward(ctx, grad):
        grads = triton_norm._reference_grads(ctx.needs_input_grad[2:], ctx.saved_tensors,
                                             lambda *t: (ctx.formula(*t),), (grad,))
        return (None, None, *grads)


def _fused(fused, formula, *inputs):
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        return _Epilogue.apply(fused, formula, *inputs)
    return fused(*inputs)


def _gelu_formula(x, weight, scale, bias):
    return F.gelu(F.linear(x, _dequantized(weight, scale, x.dtype), bias), approximate="tanh")


def _gated_formula(x, w_in, s_in, w_gated, s_gated):
    a = F.linear(x, _dequantized(w_in, s_in, x.dtype))
    return F.gelu(a, approximate="tanh") * F.linear(x, _dequantized(w_gated, s_gated, x.dtype))


def _add_formula(x, weight, scale, bias, residual):
    return residual + F.linear(x, _dequantized(weight, scale, x.dtype), bias)


def _bias(linear: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    return None if linear.bias is None else linear.bias.to(x.dtype)


def int8_gated_gelu(x: torch.Tensor, linear_in: nn.Module, linear_gated: nn.Module) -> torch.Tensor:
    """``gelu_tanh(linear_in(x)) * linear_gated(x)`` (T5 v1.1's feed-forward input): for up to 64 rows
    on CUDA one launch reads both weights and applies the GELU and product before its store (the
    two fp16 roundings of the torch ops kept); elsewhere the modules and torch ops."""
    pair = (linear_in, linear_gated)
    if linear_in.bias is None and _one_launch(x, pair):
        return _fused(triton_int8.int8_linear_gated, _gated_formula, x, linear_in.weight, linear_in.scale,
                      linear_gated.weight, linear_gated.scale)
    return F.gelu(linear_in(x), approximate="tanh") * linear_gated(x)


def int8_linear_gelu(x: torch.Tensor, linear: nn.Module) -> torch.Tensor:
    """``gelu_tanh(linear(x))`` (GPT's feed-forward input): the GELU in the kernels' epilogue for up to
    64 rows on CUDA, the module and ``F.gelu`` elsewhere."""
    if _one_launch(x, (linear,)):
        return _fused(triton_int8.int8_linear_gelu, _gelu_formula, x, linear.weight, linear.scale, _bias(linear, x))
    return F.gelu(linear(x), approximate="tanh")


def int8_linear_add(x: torch.Tensor, linear: nn.Module, residual: torch.Tensor) -> torch.Tensor:
    """``residual + linear(x)`` (a block's residual connection): the add in the kernels' epilogue for up
    to 64 rows on CUDA (the product rounded to fp16 first, as the two torch ops round)."""
    if (_one_launch(x, (linear,)) and residual.dtype == x.dtype
            and residual.shape == (*x.shape[:-1], linear.weight.shape[0])):
        return _fused(triton_int8.int8_linear_add, _add_formula, x, linear.weight, linear.scale, _bias(linear, x),
                      residual)
    return residual + linear(x)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """``softmax(q k^T * scale + bias) v`` for (batch, heads, seq, d_head) tensors and an additive
    ``bias`` (mask and position bias): one query row on CUDA fp16 takes the Triton decode kernel,
    everything else ``F.scaled_dot_product_attention``."""
    if triton_attention.supports(q, k, v):
        return triton_attention.attend_one(q, k, v, bias, scale)
    return triton_attention.reference(q, k, v, bias, scale)
