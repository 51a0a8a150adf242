"""QuantizedLinear against plain PyTorch on the dequantized weight."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bminf import QuantizedLinear
from bminf.quantization import dequantize_state_dict, quantize_, quantize_weight


def test_quantize_weight_rounding_bound():
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    w[3] = 0  # an all-zero row must not become NaN
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float16 and scale.shape == (64,)
    assert int(q.abs().max()) <= 127
    assert torch.equal(q[3], torch.zeros(48, dtype=torch.int8)) and float(scale[3]) == 0
    deq = q.float() * scale.float()[:, None]
    # every element within half a quantization step (plus fp32 slack), and each row's extreme maps to +-127
    assert ((deq - w).abs() <= scale.float()[:, None] / 2 + 1e-6).all()
    rows = [r for r in range(64) if r != 3]
    assert (q[rows].abs().amax(1) >= 126).all()


def test_quantize_weight_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        quantize_weight(torch.ones(3))
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_weight(torch.tensor([[1.0, float("nan")]]))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_forward_equals_linear_on_dequantized_weight(dtype, tol):
    linear = nn.Linear(40, 24)
    layer = QuantizedLinear.from_linear(linear)
    x = torch.randn(3, 5, 40)
    with torch.no_grad():
        ref = F.linear(x.double(), layer.dequantize(torch.float64), linear.bias.double())
        out = layer.to(dtype)(x.to(dtype))
    assert out.dtype == dtype and out.shape == (3, 5, 24)
    assert float((out.double() - ref).abs().max() / ref.abs().max()) < tol


def test_close_to_original_linear_and_shares_bias():
    linear = nn.Linear(64, 32)
    layer = QuantizedLinear.from_linear(linear)
    assert layer.bias is linear.bias
    x = torch.randn(8, 64)
    with torch.no_grad():
        err = (layer(x) - linear(x)).abs().max() / linear(x).abs().max()
    assert 0 < float(err) < 0.02


def test_input_gradient_flows_and_weights_stay_frozen():
    layer = QuantizedLinear.from_linear(nn.Linear(16, 8, bias=False))
    x = torch.randn(4, 16, requires_grad=True)
    layer(x).square().sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    F.linear(x_ref, layer.dequantize()).square().sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    assert layer.weight.grad is None and not layer.weight.requires_grad


def test_from_quantized_validates_shapes():
    q = torch.zeros(4, 6, dtype=torch.int8)
    with pytest.raises(ValueError, match="int8"):
        QuantizedLinear.from_quantized(q.float(), torch.ones(4))
    with pytest.raises(ValueError, match="scale"):
        QuantizedLinear.from_quantized(q, torch.ones(5))
    with pytest.raises(ValueError, match="bias"):
        QuantizedLinear.from_quantized(q, torch.ones(4), torch.ones(3))
    layer = QuantizedLinear.from_quantized(q, torch.ones(4, dtype=torch.float16), torch.arange(4.0))
    assert torch.equal(layer(torch.ones(2, 6)), torch.arange(4.0).expand(2, 4))
    with pytest.raises(ValueError, match="last dimension 6"):
        layer(torch.ones(2, 5))


def test_quantize_swaps_modules_and_state_dict_round_trips():
    net = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Sequential(nn.Linear(8, 4)))
    quantize_(net, predicate=lambda name, _: name != "0")
    assert type(net[0]) is nn.Linear and isinstance(net[2][0], QuantizedLinear)
    state = net.state_dict()
    assert state["2.0.weight"].dtype == torch.int8 and state["2.0.scale"].dtype == torch.float16
    plain = dequantize_state_dict(state)
    assert set(plain) == {"0.weight", "0.bias", "2.0.weight", "2.0.bias"}
    assert torch.equal(plain["2.0.weight"], net[2][0].dequantize())
    with torch.device("meta"):
        meta = quantize_(nn.Sequential(nn.Linear(8, 4)))
    assert meta[0].weight.is_meta and meta[0].weight.dtype == torch.int8
