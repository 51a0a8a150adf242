"""Bad input to bminf.wrapper and TransformerBlockList: a clear error naming the argument, raised
before anything changes; a failed call leaves the model exactly as it was; deepcopy never shares
weights with the original. CPU only (streaming runs through the same CPU path as test_offload)."""
import copy

import pytest
import torch
import torch.nn as nn

import bminf
from bminf import wrapper
from bminf.offload import TransformerBlockList, kernel_scratch
from bminf.offload.place import parse_device
from bminf.offload.stream import BlockWeights
from bminf.quantization import QuantizedLinear

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")


class Block(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class Net(nn.Module):
    def __init__(self, n=6, d=16):
        super().__init__()
        self.embed = nn.Linear(d, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(n))
        self.head = nn.Linear(d, d)

    def forward(self, x):
        x = self.embed(x)
        for block in self.layers:
            x = block(x)
        return self.head(x)


def net(seed=0):
    torch.manual_seed(seed)
    return Net().eval()


def block_bytes(quantized=False):
    return max(BlockWeights(bminf.quantization.quantize_(b) if quantized else b).nbytes for b in net().layers)


def streaming_limit(quantized=True):
    """Non-block weights are not counted on the CPU: two slots and two resident blocks."""
    return 4 * block_bytes(quantized)


def snapshot(model):
    return {
        "types": [(n, type(m)) for n, m in model.named_modules()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "ptrs": {k: v.data_ptr() for k, v in model.state_dict().items()},
        "grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "forwards": [n for n, m in model.named_modules() if "forward" in m.__dict__],
    }


def same(a, b):
    """Bit for bit, NaNs included."""
    return a.dtype == b.dtype and a.shape == b.shape and \
        torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def assert_unchanged(model, before, x, want):
    after = snapshot(model)
    assert after["types"] == before["types"]
    assert after["grad"] == before["grad"]
    assert after["ptrs"] == before["ptrs"]  # the very same storage: nothing moved to a host buffer
    assert after["forwards"] == before["forwards"]
    assert after["state"].keys() == before["state"].keys()
    assert all(same(after["state"][k], v) for k, v in before["state"].items())
    with torch.no_grad():
        assert same(model(x), want)


# ---------------------------------------------------------------- argument types


def test_memory_sizes_as_strings():
    a = wrapper(net(), memory_limit=streaming_limit(), device="cpu", reserve=0)
    b = wrapper(net(), memory_limit=f"{streaming_limit()}B", device="cpu", reserve="0B")
    assert a.layers.streamed_blocks == b.layers.streamed_blocks != []
    c = wrapper(net(), memory_limit="6GB", device="cpu")
    assert c.layers.streamed_blocks == []
    layers = TransformerBlockList(list(net().layers), "cpu", memory_limit=f"{4 * block_bytes() / 1024}KiB",
                                  reserve="0MiB")
    assert len(layers.streamed_blocks) == 4


@pytest.mark.parametrize("kw, error, match", [
    (dict(memory_limit=1.5), TypeError, "memory_limit must be a number of bytes or a string like '6GiB', got float"),
    (dict(memory_limit="6 gigs"), ValueError, "memory_limit='6 gigs' is not a size"),
    (dict(memory_limit=-1), ValueError, "memory_limit must be positive, got -1"),
    (dict(memory_limit=True), TypeError, "memory_limit must be a number of bytes"),
    (dict(reserve=-5), ValueError, "reserve must be >= 0, got -5"),
    (dict(reserve=[1]), TypeError, "reserve must be a number of bytes"),
    (dict(slots=0), ValueError, "slots must be an int >= 1, got 0"),
    (dict(slots="2"), TypeError, "slots must be an int >= 1, got str '2'"),
    (dict(device=3.5), TypeError, "device must be a device"),
    (dict(device="gpu:0"), ValueError, "device='gpu:0' is not a device"),
    (dict(device=[]), ValueError, "device is an empty list"),
    (dict(dtype="int8"), ValueError, "dtype='int8' is not a dtype"),
    (dict(quantization="yes"), TypeError, "quantization must be True or False, got str 'yes'"),
    (dict(strict=1), TypeError, "strict must be True or False, got int 1"),
])
def test_wrapper_rejects_bad_arguments_before_changing_anything(kw, error, match):
    model = net()
    x = torch.randn(2, 16)
    with torch.no_grad():
        want = model(x)
    before = snapshot(model)
    kw.setdefault("device", "cpu")
    with pytest.raises(error, match=match):
        wrapper(model, **kw)
    assert_unchanged(model, before, x, want)


@pytest.mark.parametrize("kw, error, match", [
    (dict(memory_limit="lots"), ValueError, "memory_limit='lots' is not a size"),
    (dict(reserve=2.5), TypeError, "reserve must be a number of bytes"),
    (dict(slots=-1), ValueError, "slots must be an int >= 1"),
    (dict(device=object()), TypeError, "device must be a device"),
])
def test_block_list_rejects_bad_arguments_before_changing_anything(kw, error, match):
    blocks = list(net().layers)
    ptrs = [p.data_ptr() for b in blocks for p in b.parameters()]
    kw.setdefault("device", "cpu")
    with pytest.raises(error, match=match):
        TransformerBlockList(blocks, **kw)
    assert [p.data_ptr() for b in blocks for p in b.parameters()] == ptrs
    assert all(p.requires_grad for b in blocks for p in b.parameters())


def test_place_block_lists_checks_its_lists_and_priorities():
    from bminf.offload import place_block_lists
    with pytest.raises(TypeError, match="lists must be TransformerBlockLists .*; item 0 is ModuleList"):
        place_block_lists([nn.ModuleList([nn.Linear(2, 2)])], "cpu")
    lst = TransformerBlockList(list(net().layers), place=False)
    with pytest.raises(ValueError, match="priorities: one per list, got 2 for 1 lists"):
        place_block_lists([lst], "cpu", priorities=[0, 1])
    assert lst._weights == [] and not lst._wrapped


def test_wrapper_of_a_non_module_names_the_argument():
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got str 'x'"):
        wrapper("x")
    with pytest.raises(TypeError, match="blocks must be nn.Modules; item 1 is int"):
        TransformerBlockList([nn.Linear(2, 2), 3], "cpu")


@NO_CUDA
@pytest.mark.parametrize("device", ["cuda", "cuda:0", 0, [0], [("cuda:0", "4GiB")]])
def test_cuda_without_cuda_is_a_clear_error_before_anything_changes(device):
    model = net()
    x = torch.randn(2, 16)
    with torch.no_grad():
        want = model(x)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"CUDA is not available on this machine"):
        wrapper(model, device=device, memory_limit="1GiB")
    assert_unchanged(model, before, x, want)
    with pytest.raises(ValueError, match=r"CUDA is not available on this machine"):
        TransformerBlockList(list(model.layers), device)
    assert_unchanged(model, before, x, want)


def test_bminf2_style_list_of_device_indices_parses_to_cuda_devices():
    # TransformerBlockList(blocks, [0]) as in BMInf 2.0: the parse is checked here, the run on the GPU tests
    assert parse_device(0) == torch.device("cuda", 0)
    assert parse_device("cuda:1") == torch.device("cuda", 1)
    assert parse_device(torch.device("cpu")) == torch.device("cpu")


def test_dtype_argument_casts_the_model_first():
    model = wrapper(net(), dtype="bfloat16", device="cpu", quantization=False)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model = wrapper(net(), dtype=torch.float16, device="cpu")
    assert model.layers[0].norm.weight.dtype == torch.float16
    assert model.layers[0].fc1.weight.dtype == torch.int8


# ---------------------------------------------------------------- failing part-way


def test_block_with_an_instance_forward_fails_cleanly_naming_its_path():
    model = net()
    x = torch.randn(2, 16)
    hooked = model.layers[3]
    hooked.forward = hooked.forward  # what accelerate's hooks leave: an instance-level forward
    with torch.no_grad():
        want = model(x)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"layers\.3 already has an instance-level forward"):
        wrapper(model, memory_limit=streaming_limit(), device="cpu", reserve=0)
    assert_unchanged(model, before, x, want)
    del hooked.forward
    model = wrapper(model, memory_limit=streaming_limit(), device="cpu", reserve=0)
    assert model.layers.streamed_blocks


def test_quantization_failure_part_way_leaves_the_model_as_it_was():
    model = net()
    x = torch.randn(2, 16)
    with torch.no_grad():
        want = model(x)
        model.layers[4].fc2.weight[0, 0] = float("nan")  # quantizing this one fails, after others were swapped
        want_nan = model(x)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"layers\.4\.fc2: cannot quantize"):
        wrapper(model, memory_limit=streaming_limit(), device="cpu", reserve=0)
    assert_unchanged(model, before, x, want_nan)
    with torch.no_grad():
        model.layers[4].fc2.weight[0, 0] = 0.0
    model = wrapper(model, memory_limit=streaming_limit(), device="cpu", reserve=0)
    assert isinstance(model.layers[4].fc2, QuantizedLinear) and model.layers.streamed_blocks
    del want


def test_failure_while_moving_blocks_to_host_buffers_is_rolled_back(monkeypatch):
    model = net()
    x = torch.randn(2, 16)
    with torch.no_grad():
        want = model(x)
    before = snapshot(model)
    calls = []
    real = BlockWeights.to_host

    def flaky(self, pin):
        calls.append(self.index)
        if len(calls) == 3:  # e.g. pinned memory runs out on the third streamed block
            raise RuntimeError("out of pinned memory")
        return real(self, pin)
    monkeypatch.setattr(BlockWeights, "to_host", flaky)
    with pytest.raises(RuntimeError, match="out of pinned memory"):
        wrapper(model, quantization=False, memory_limit=streaming_limit(False), device="cpu", reserve=0)
    assert len(calls) == 3
    assert_unchanged(model, before, x, want)
    monkeypatch.setattr(BlockWeights, "to_host", real)
    model = wrapper(model, quantization=False, memory_limit=streaming_limit(False), device="cpu", reserve=0)
    with torch.no_grad():
        assert torch.equal(model(x), want)


def test_block_list_failure_is_rolled_back(monkeypatch):
    blocks = list(net().layers)
    ptrs = [p.data_ptr() for b in blocks for p in b.parameters()]
    monkeypatch.setattr(BlockWeights, "to_host", lambda self, pin: (_ for _ in ()).throw(MemoryError("pinned")))
    with pytest.raises(MemoryError):
        TransformerBlockList(blocks, "cpu", memory_limit=streaming_limit(False), reserve=0)
    assert [p.data_ptr() for b in blocks for p in b.parameters()] == ptrs
    assert all(p.requires_grad for b in blocks for p in b.parameters())
    assert not any("forward" in b.__dict__ for b in blocks)


def test_strict_refusal_leaves_the_model_as_it_was():
    model = net()
    model.head.weight = model.embed.weight  # a tied Linear: reported, and strict makes that an error
    x = torch.randn(2, 16)
    with torch.no_grad():
        want = model(x)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"head: weight tied to embed.weight(.|\n)*the model was left as it was"):
        wrapper(model, memory_limit=streaming_limit(), device="cpu", reserve=0, strict=True)
    assert_unchanged(model, before, x, want)


def test_wrapping_twice_is_a_clear_error_and_changes_nothing():
    model = wrapper(net(), memory_limit=streaming_limit(), device="cpu", reserve=0)
    x = torch.randn(2, 16)
    with torch.no_grad():
        want = model(x)
    host = {i: model.layers._weights[i].host.data_ptr() for i in model.layers.streamed_blocks}
    with pytest.raises(ValueError, match=r"already wrapped: layers is a TransformerBlockList"):
        wrapper(model, memory_limit=streaming_limit(), device="cpu", reserve=0)
    assert {i: model.layers._weights[i].host.data_ptr() for i in model.layers.streamed_blocks} == host
    for i in model.layers.streamed_blocks:  # idle streamed weights still point into their host buffer
        h = model.layers._weights[i].host
        assert h.data_ptr() <= model.layers[i].fc1.weight.data_ptr() < h.data_ptr() + h.numel()
    with torch.no_grad():
        assert torch.equal(model(x), want)


# ---------------------------------------------------------------- deepcopy


def test_deepcopy_of_streamed_blocks_is_a_clear_error():
    model = wrapper(net(), memory_limit=streaming_limit(), device="cpu", reserve=0)
    assert model.layers.streamed_blocks
    x = torch.randn(2, 16)
    with torch.no_grad():
        want = model(x)
    with pytest.raises(TypeError, match=r"cannot deepcopy a TransformerBlockList that streams blocks"):
        copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(model(x), want)


def test_deepcopy_of_resident_blocks_is_independent():
    model = wrapper(net(), memory_limit="1GiB", device="cpu")
    assert model.layers.streamed_blocks == []
    x = torch.randn(2, 16)
    with torch.no_grad():
        want = model(x)
    twin = copy.deepcopy(model)
    assert isinstance(twin.layers, TransformerBlockList)
    with torch.no_grad():
        twin.layers[0].norm.weight.add_(1.0)  # the copy's weights are its own
        assert torch.equal(model(x), want) and not torch.equal(twin(x), want)
        twin.layers[0].norm.weight.sub_(1.0)
    del model
    with torch.no_grad():
        assert torch.equal(twin(x), want)


# ---------------------------------------------------------------- the budget


def test_kernel_scratch_counts_the_activation_width():
    blocks = list(net().layers)
    largest = max(p.numel() for b in blocks for p in b.parameters())
    q = [bminf.quantization.quantize_(copy.deepcopy(b)) for b in blocks]
    assert kernel_scratch(q) == 2 * 4 * largest  # fp32 norms and biases: fp32 activations
    half = [bminf.quantization.quantize_(copy.deepcopy(b).half()) for b in blocks]
    assert kernel_scratch(half) == 2 * 2 * largest
