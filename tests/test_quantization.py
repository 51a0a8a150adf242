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


# ---------------------------------------------------------------- bad input never does harm

def test_quantized_linear_takes_a_linear_as_bminf_2_did():
    linear = nn.Linear(12, 5)
    layer = QuantizedLinear(linear)
    assert (layer.in_features, layer.out_features) == (12, 5) and layer.bias is linear.bias
    ref = QuantizedLinear.from_linear(linear)
    assert torch.equal(layer.weight, ref.weight) and torch.equal(layer.scale, ref.scale)
    assert QuantizedLinear(nn.Linear(3, 2, bias=False)).bias is None
    empty = QuantizedLinear(4, 3, bias=False)  # today's form still works
    assert empty.weight.shape == (3, 4) and empty.weight.dtype == torch.int8
    with pytest.raises(TypeError, match="nn.Linear, or in_features and out_features"):
        QuantizedLinear(nn.Conv1d(2, 2, 1))
    with pytest.raises(TypeError, match="nn.Linear, or in_features"):
        QuantizedLinear("12")
    with pytest.raises(TypeError, match="needs out_features"):
        QuantizedLinear(12)
    with pytest.raises(TypeError, match="takes no out_features"):
        QuantizedLinear(linear, 5)
    with pytest.raises(TypeError, match="out_features must be a non-negative int"):
        QuantizedLinear(4, -3)


@pytest.mark.parametrize("absmax", [10.0, 1.0, 1e-2, 1e-3, 1e-4, 6e-5, 1e-5, 8e-6])
def test_small_rows_keep_their_accuracy(absmax):
    # rows spanning fp16's normal and subnormal ranges: the scale is rounded up, never clipping at 127
    w = torch.linspace(-1, 1, 255)[None].repeat(3, 1) * torch.tensor([[absmax], [absmax * 0.77], [absmax * 0.5]])
    q, scale = quantize_weight(w)
    assert int(q.abs().max()) <= 127 and (scale.float() >= w.abs().amax(1) / 127).all()
    deq = q.float() * scale.float()[:, None]
    rel = float(((deq - w).abs().amax(1) / w.abs().amax(1)).max())
    # half a step of the scale, which is absmax/127 rounded up to fp16's grid (step 2**-24 at the bottom)
    bound = float(((w.abs().amax(1) / 127 * (1 + 2 ** -10) + 2 ** -24) / 2 / w.abs().amax(1)).max())
    assert rel <= bound + 1e-7
    # int8's usual 1/254 where the scale is an fp16 normal (absmax >= 127 * 2**-14), and within 1%
    # down to max|w| = 8e-6 (round-to-nearest gave 24% at 1e-5, and rows below 3.8e-6 became 0)
    assert rel < (1 / 254 * (1 + 2 ** -10) if absmax * 0.5 >= 127 * 2 ** -14 else 0.01)


def test_tiny_rows_warn_and_vanishing_rows_raise():
    w = torch.ones(4, 8)
    w[2] *= 1e-6  # only 17 int8 levels left: warned, with the row named
    with pytest.warns(UserWarning, match=r"layers\.0\.w: rows 2 .*fewer than 64 int8 levels"):
        q, scale = quantize_weight(w, "layers.0.w")
    assert int(q[2].abs().max()) == 17 and float(scale[2]) == 2 ** -24
    w[1] = 1e-8  # would quantize to all zeros: refused, naming the layer and row
    with pytest.raises(ValueError, match=r"cannot quantize layers\.0\.w: rows 1 have absmax below"):
        quantize_weight(w, "layers.0.w")
    big = torch.ones(2, 3)
    big[1] *= 1e7
    with pytest.raises(ValueError, match="rows 1 are too large"):
        quantize_weight(big)
    net = nn.Sequential(nn.Linear(3, 2))
    with torch.no_grad():
        net[0].weight[0] = 1e-9
    with pytest.raises(ValueError, match=r"cannot quantize 0\.weight: rows 0"):
        quantize_(net)


@pytest.mark.parametrize("cast", [lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.double(),
                                  lambda m: m.to("cpu", torch.bfloat16), lambda m: m.float()])
def test_dtype_casts_keep_the_scale_fp16(cast):
    net = nn.Sequential(QuantizedLinear(nn.Linear(16, 8)))
    scale = net[0].scale.clone()
    out = cast(net)
    assert out[0].scale.dtype == torch.float16 and torch.equal(out[0].scale, scale)
    assert out[0].weight.dtype == torch.int8
    moved = out.to("meta", torch.bfloat16)  # a device move still moves the scale
    assert moved[0].scale.is_meta and moved[0].scale.dtype == torch.float16


def test_scale_stays_fp16_through_model_casts_and_save(tmp_path):
    from bminf.checkpoint import save_model
    from helpers import tiny_gpt
    model = quantize_(tiny_gpt()).to(torch.bfloat16)
    scales = [m.scale.dtype for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert scales and set(scales) == {torch.float16}
    assert model.token_embedding.weight.dtype == torch.bfloat16
    save_model(model.half(), tmp_path / "m", format="bminf")  # refused before: the scales were bf16


def test_from_quantized_refuses_scales_fp16_cannot_hold():
    q = torch.ones(3, 4, dtype=torch.int8)
    for bad, what in [(1e5, "65504"), (1e-8, "rows"), (float("nan"), "finite"), (-1.0, ">= 0")]:
        scale = torch.tensor([0.5, bad, 0.25])
        with pytest.raises(ValueError, match=r"rows \[1\]") as info:
            QuantizedLinear.from_quantized(q, scale)
        assert what in str(info.value)
    layer = QuantizedLinear.from_quantized(q, torch.tensor([0.5, 0.0, 2 ** -24]))
    assert layer.scale.dtype == torch.float16 and layer.scale.tolist() == [0.5, 0.0, 2 ** -24]


def test_loading_float_weights_into_int8_refuses():
    net = quantize_(nn.Sequential(nn.Linear(8, 4)))
    before = net[0].weight.clone()
    float_state = nn.Sequential(nn.Linear(8, 4)).state_dict()
    for strict in (True, False):
        with pytest.raises(ValueError, match=r"0\.weight: a torch\.float32 tensor cannot load into this int8"):
            net.load_state_dict(float_state, strict=strict)
    assert torch.equal(net[0].weight, before)
    net.load_state_dict(net.state_dict())  # int8 into int8 still loads


def test_a_refused_load_leaves_every_module_as_it_was():
    net = quantize_(nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 4), nn.Linear(4, 2)))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    donor = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 4), nn.Linear(4, 2))
    with torch.no_grad():
        donor[0].weight.fill_(3.0)
    with pytest.raises(ValueError, match=r"1\.weight: a torch\.float32 tensor .* \(nothing was loaded\)"):
        net.load_state_dict(donor.state_dict())
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # the LayerNorm too
    outer = nn.Sequential(net)  # as a submodule, under a prefix
    with pytest.raises(ValueError, match=r"0\.1\.weight"):
        outer.load_state_dict({"0." + k: v for k, v in donor.state_dict().items()})
    quantize_(net)  # a second quantize_ adds no second guard
    assert len(net._load_state_dict_pre_hooks) == 1


def test_dequantize_state_dict_of_a_bare_quantized_linear():
    layer = QuantizedLinear(nn.Linear(6, 3))
    plain = dequantize_state_dict(layer.state_dict())
    assert set(plain) == {"weight", "bias"} and torch.equal(plain["weight"], layer.dequantize())
    linear = nn.Linear(6, 3)
    linear.load_state_dict(plain)
