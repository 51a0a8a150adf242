"""TransformerBlockList on the CPU: the placement policy, and the streaming engine run with CPU
"slots" (synchronous copies), which exercises the same slot / prefetch / recompute logic as CUDA."""
import copy
import gc
import logging
import weakref

import pytest
import torch
import torch.nn as nn

from bminf.offload import TransformerBlockList, place_block_lists
from bminf.offload.plan import MIB, default_reserve, plan_residency, split_contiguous, spread
from bminf.offload.stream import BlockWeights


# -- the planner -------------------------------------------------------------------------------------
def test_everything_fits_means_no_slots():
    plan = plan_residency([100] * 10, limit=2000, baseline=500, reserve=500)
    assert plan.slots == 0 and all(plan.resident) and plan.streamed == []


def test_too_small_names_the_minimum_and_the_minimum_runs():
    with pytest.raises(ValueError, match=r"at least 1400 bytes"):
        plan_residency([100] * 10, limit=1399, baseline=1000, reserve=200)
    plan = plan_residency([100] * 10, limit=1400, baseline=1000, reserve=200)
    assert plan.slots == 2 and not any(plan.resident)


def test_default_reserve_minimum_is_exact():
    sizes = [50 * MIB] * 8
    with pytest.raises(ValueError) as err:
        plan_residency(sizes, limit=10, baseline=30 * MIB, scratch=7 * MIB)
    minimum = int(str(err.value).split("at least ")[1].split()[0])
    plan = plan_residency(sizes, limit=minimum, baseline=30 * MIB, scratch=7 * MIB)
    assert plan.reserve == default_reserve(minimum, 7 * MIB)
    with pytest.raises(ValueError):
        plan_residency(sizes, limit=minimum - 1, baseline=30 * MIB, scratch=7 * MIB)


@pytest.mark.parametrize("limit", [700, 1000, 1500, 2100, 3000])
@pytest.mark.parametrize("baseline", [0, 150])
def test_plan_stays_within_the_limit(limit, baseline):
    sizes = [100] * 12 + [130] * 12
    try:
        plan = plan_residency(sizes, limit, baseline=baseline, reserve=100, priorities=[0] * 12 + [1] * 12)
    except ValueError:
        assert limit < baseline + 100 + 2 * 130
        return
    assert baseline + plan.reserve + plan.device_bytes(sizes) <= limit
    assert all(sizes[i] <= plan.slot_bytes for i in plan.streamed)


def test_decoder_priority_and_even_spread():
    # 24 encoder blocks of 10, 24 decoder blocks of 13: the decoder stays resident first
    plan = plan_residency([10] * 24 + [13] * 24, limit=600, reserve=50, priorities=[0] * 24 + [1] * 24)
    assert all(plan.resident[24:])
    assert plan.streamed == [7, 15, 23]
    assert spread(24, 4) == [5, 11, 17, 23] and spread(5, 0) == [] and spread(3, 3) == [0, 1, 2]


def test_split_contiguous_follows_capacity():
    assert split_contiguous([1] * 10, [1, 1]) == [(0, 5), (5, 10)]
    assert split_contiguous([1] * 9, [1, 2]) == [(0, 3), (3, 9)]
    runs = split_contiguous([1] * 3, [0, 100, 100])
    assert [b - a for a, b in runs] == [1, 1, 1]  # everyone gets a block while there are enough


# -- a toy backbone used like ours: blocks take (x, bias, cache) and return one tensor -------------
class Block(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.drop = nn.Dropout(0.1)
        self.register_buffer("gain", torch.rand(d) + 0.5)

    def forward(self, x, bias, cache=None):
        h = self.fc2(torch.relu(self.fc1(self.norm(x)))) * self.gain + bias
        if cache is not None:
            cache.append(h.detach().sum().item())
        return x + self.drop(h)


def block_bytes(d=16):
    return BlockWeights(Block(d)).nbytes


def make(n=8, seed=0):
    torch.manual_seed(seed)
    return nn.ModuleList(Block() for _ in range(n)).eval()


def run_loop(layers, x, bias, passes=1, cache=None):
    for _ in range(passes):
        for block in layers:
            x = block(x, bias, cache)
    return x


def test_cpu_without_limit_is_plain_resident():
    layers = TransformerBlockList(list(make()), "cpu")
    assert layers.streamed_blocks == [] and layers.streamer_stats == {}
    assert all("forward" not in b.__dict__ for b in layers)  # nothing wrapped on the hot path


@pytest.mark.parametrize("resident", [0, 3, 5])
def test_streamed_equals_resident_bit_for_bit(resident):
    ref = make()
    layers = TransformerBlockList(copy.deepcopy(list(ref)), "cpu", memory_limit=(resident + 2) * block_bytes(),
                                  reserve=0)
    assert len(layers.streamed_blocks) == 8 - resident
    x, bias = torch.randn(2, 5, 16), torch.randn(16)
    with torch.no_grad():
        want = run_loop(ref, x, bias, passes=3)
        got_loop = run_loop(layers, x, bias, passes=3)
        got_forward = layers(layers(layers(x, bias), bias), bias)
    assert torch.equal(got_loop, want) and torch.equal(got_forward, want)
    # idle streamed weights live in their host buffer, not in a slot
    for i in layers.streamed_blocks:
        host = layers._weights[i].host
        assert host.data_ptr() <= layers[i].fc1.weight.data_ptr() < host.data_ptr() + host.numel()


def test_reserve_at_least_streams_blocks_before_the_pass_that_needs_the_room():
    ref = make()
    layers = TransformerBlockList(copy.deepcopy(list(ref)), "cpu", memory_limit=8 * block_bytes(), reserve=0)
    assert layers.streamed_blocks == []
    layers.reserve_at_least(0)  # already kept: nothing moves
    assert layers.streamed_blocks == []
    layers.reserve_at_least(3 * block_bytes())  # 5 blocks' room left: 2 slots and 3 resident
    assert len(layers.streamed_blocks) == 5
    layers.reserve_at_least(0)  # blocks never come back on their own
    assert len(layers.streamed_blocks) == 5
    layers.reserve_at_least(100 * block_bytes())  # more than the budget can give: as much as it can
    assert len(layers.streamed_blocks) == 8
    x, bias = torch.randn(2, 5, 16), torch.randn(16)
    with torch.no_grad():
        assert torch.equal(run_loop(layers, x, bias, passes=2), run_loop(ref, x, bias, passes=2))
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="nbytes"):
            layers.reserve_at_least(bad)
    unlimited = TransformerBlockList(list(make()), "cpu")
    unlimited.reserve_at_least(1 << 40)  # no limit: nothing to keep free
    assert unlimited.streamed_blocks == []


def test_a_grown_reserve_streams_only_the_blocks_it_needs_and_keeps_those_streamed():
    # 24 blocks, 5 streamed: one block's more reserve streams one more block, not a new spread of
    # six (whose positions share only two with the five: nine streamed in all, as it once did)
    bb = block_bytes()
    ref = make(24)
    layers = TransformerBlockList(copy.deepcopy(list(ref)), "cpu", memory_limit=21 * bb, reserve=0)
    before = set(layers.streamed_blocks)
    assert len(before) == 5
    for extra in (1, 3):
        layers.reserve_at_least(extra * bb)
        now = set(layers.streamed_blocks)
        assert len(now) == 5 + extra and now > before, (sorted(before), sorted(now))
    x, bias = torch.randn(2, 5, 16), torch.randn(16)
    with torch.no_grad():
        assert torch.equal(run_loop(layers, x, bias, passes=2), run_loop(ref, x, bias, passes=2))


def test_prefetch_loads_each_streamed_block_once_per_pass():
    layers = TransformerBlockList(list(make()), "cpu", memory_limit=4 * block_bytes(), reserve=0)
    n = len(layers.streamed_blocks)
    assert n == 6
    x, bias = torch.randn(1, 3, 16), torch.randn(16)
    with torch.no_grad():
        run_loop(layers, x, bias, passes=1)
        loads_one = layers.streamer_stats["cpu"][0]
        run_loop(layers, x, bias, passes=4)
    loads, nbytes = layers.streamer_stats["cpu"]
    # the prefetch wraps around from the last block to the first: no extra loads in later passes
    assert loads - loads_one == 4 * n
    assert nbytes == loads * layers._weights[0].nbytes


def test_list_behaves_like_a_module_list():
    ref = make()
    layers = TransformerBlockList(copy.deepcopy(list(ref)), "cpu", memory_limit=4 * block_bytes(), reserve=0)
    assert isinstance(layers, nn.ModuleList) and len(layers) == 8
    assert isinstance(layers[-1], Block) and isinstance(layers[2:5], nn.ModuleList) and len(layers[2:5]) == 3
    assert [type(b) for b in layers] == [Block] * 8
    sd, want = layers.state_dict(), ref.state_dict()
    assert sd.keys() == want.keys() and all(torch.equal(sd[k], want[k]) for k in sd)
    x, bias = torch.randn(1, 3, 16), torch.randn(16)
    with torch.no_grad():  # HF Llama style: iterate a slice
        assert torch.equal(run_loop(layers[:5], x, bias), run_loop(ref[:5], x, bias))
    with pytest.raises(RuntimeError, match="before wrapping"):
        layers.half()


def test_input_gradients_through_streamed_blocks():
    ref = make()
    layers = TransformerBlockList(copy.deepcopy(list(ref)), "cpu", memory_limit=5 * block_bytes(), reserve=0)
    for p in ref.parameters():
        p.requires_grad_(False)
    x0, b0 = torch.randn(2, 4, 16), torch.randn(16)
    grads = []
    for model in (ref, layers):
        x, bias = x0.clone().requires_grad_(), b0.clone().requires_grad_()
        out = run_loop(model, x, bias)
        (out * torch.arange(16.0)).sum().backward()
        grads.append((out.detach(), x.grad, bias.grad))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert all(not p.requires_grad for i in layers.streamed_blocks for p in layers[i].parameters())


def test_recompute_replays_dropout():
    ref = make().train()
    layers = TransformerBlockList(copy.deepcopy(list(ref)), "cpu", memory_limit=4 * block_bytes(), reserve=0)
    for p in ref.parameters():
        p.requires_grad_(False)
    grads = []
    for model in (ref, layers):
        torch.manual_seed(123)
        x = torch.ones(1, 3, 16, requires_grad=True)
        model(x, torch.zeros(16)).sum().backward() if model is layers else run_loop(model, x, torch.zeros(16)).sum().backward()
        grads.append(x.grad)
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_shared_budget_prefers_the_decoder_and_learns_the_call_order():
    torch.manual_seed(1)
    enc = TransformerBlockList([Block() for _ in range(4)], place=False)
    dec = TransformerBlockList([Block() for _ in range(4)], place=False)
    size = block_bytes()
    place_block_lists([enc, dec], "cpu", memory_limit=4 * size, reserve=0, priorities=[0, 1])
    assert enc.streamed_blocks == [0, 1, 2, 3] and dec.streamed_blocks == [1, 3]
    x, bias = torch.randn(1, 2, 16), torch.randn(16)
    with torch.no_grad():
        for _ in range(3):  # one prompt: encode once, then decode steps
            h = run_loop(enc, x, bias)
            for _ in range(4):
                h = run_loop(dec, h, bias)
        loads = enc.streamer_stats["cpu"][0]
        h = run_loop(enc, x, bias)
        for _ in range(4):
            h = run_loop(dec, h, bias)
    # steady state: 4 encoder + 4 x 2 decoder loads, plus one miss where the next prompt starts
    assert enc.streamer_stats["cpu"][0] - loads <= 4 + 8 + 1


def test_dropping_a_streamed_list_frees_it_at_once():
    """No reference cycles: slots and pinned buffers go when the model goes, not at the next
    run of the cycle collector (BMInf 2.0 users saw GPU memory grow across requests)."""
    gc.collect()
    gc.disable()
    try:
        layers = TransformerBlockList(list(make()), "cpu", memory_limit=4 * block_bytes(), reserve=0)
        with torch.no_grad():
            run_loop(layers, torch.randn(1, 3, 16), torch.randn(16), passes=2)
        refs = [weakref.ref(layers), weakref.ref(layers._parts[0].streamer.slots[0].buf),
                weakref.ref(layers._weights[layers.streamed_blocks[0]].host), weakref.ref(layers[0])]
        del layers
        assert [r() for r in refs] == [None] * 4
    finally:
        gc.enable()


def test_shared_weights_cannot_stream():
    shared = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="shares a tensor"):
        TransformerBlockList([nn.Sequential(shared), nn.Sequential(shared)], "cpu", memory_limit=10)


def test_demote_moves_blocks_off_the_device_and_stays_exact():
    ref = make()
    layers = TransformerBlockList(copy.deepcopy(list(ref)), "cpu", memory_limit=10 * block_bytes(), reserve=0)
    assert layers.streamed_blocks == []
    part = layers._parts[0]
    part.demote(reserve=5 * block_bytes())  # as after a pass that went over the limit
    assert len(layers.streamed_blocks) == 5
    x, bias = torch.randn(1, 3, 16), torch.randn(16)
    with torch.no_grad():
        assert torch.equal(run_loop(layers, x, bias, passes=2), run_loop(ref, x, bias, passes=2))


def test_split_across_two_devices():
    ref = make()
    size = block_bytes()
    layers = TransformerBlockList(copy.deepcopy(list(ref)), [("cpu", 3 * size), ("cpu", 3 * size)], reserve=0)
    assert len(layers._parts) == 2 and [len(p.blocks) for p in layers._parts] == [4, 4]
    assert layers.streamed_blocks == [0, 1, 3, 4, 5, 7]
    x, bias = torch.randn(1, 3, 16), torch.randn(16)
    with torch.no_grad():
        assert torch.equal(layers(x, bias), run_loop(ref, x, bias))


def _tiny_t5_and_streamed_copy():
    """Our T5 backbone, and a copy wrapped into a budget of 4 decoder blocks (so some of each stack stream)."""
    from bminf import wrapper
    from bminf.models.t5 import T5, T5Config
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=64, d_model=32, d_ff=64, n_heads=2, d_head=16, n_encoder_layers=4, n_decoder_layers=4)
    ref = T5(cfg).eval()
    dec_block = BlockWeights(ref.dec_layers[0]).nbytes
    return ref, wrapper(copy.deepcopy(ref), quantization=False, device="cpu", memory_limit=4 * dec_block, reserve=0)


def test_our_t5_backbone_streams_exactly_with_its_kv_cache():
    ref, model = _tiny_t5_and_streamed_copy()
    assert len(model.dec_layers.streamed_blocks) == 2 and len(model.enc_layers.streamed_blocks) == 4
    ids, mask = torch.randint(0, 64, (2, 7)), torch.ones(2, 7, dtype=torch.bool)
    with torch.no_grad():
        outs = []
        for m in (ref, model):
            enc = m.encode(ids, mask)
            cache, tok, steps = m.new_cache(mask, max_length=5), torch.zeros(2, 1, dtype=torch.long), []
            for _ in range(5):
                steps.append(m.decode(tok, enc, cache=cache))
                tok = steps[-1][:, -1:].argmax(-1)
            outs.append(torch.cat(steps, 1))
    assert torch.equal(outs[0], outs[1])


def test_our_t5_backbone_input_gradients_through_streamed_blocks():
    ref, model = _tiny_t5_and_streamed_copy()
    assert model.enc_layers.streamed_blocks and model.dec_layers.streamed_blocks
    for p in ref.parameters():
        p.requires_grad_(False)
    x0 = torch.randn(2, 7, 32)
    grads = []
    for m in (ref, model):
        x = x0.clone().requires_grad_()
        logits = m.decode(torch.randint(0, 64, (2, 3), generator=torch.Generator().manual_seed(1)),
                          m.encode(inputs_embeds=x))
        logits.square().mean().backward()
        grads.append(x.grad)
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[1], grads[0], rtol=1e-5, atol=1e-7)


# -- the cpm_kernels bridge's self-check, with stand-in kernels --------------------------------------
def _w8a8(x, weight, scale):
    """A CPU emulation of a W8A8 kernel: per-row int8 activations, then the int8 GEMM."""
    sx = x.float().abs().amax(-1, keepdim=True) / 127
    qx = torch.round(x.float() / sx).clamp(-127, 127)
    return ((qx @ weight.float().t()) * sx * scale.float()).to(x.dtype)


def test_bridge_self_check_accepts_w8a8_and_rejects_wrong_kernels(caplog):
    from bminf.kernels import cpm_kernels_bridge as bridge
    ok, err = bridge.self_check(_w8a8, torch.device("cpu"), dtype=torch.float32)
    assert ok and err < bridge.TOLERANCE
    ok, err = bridge.self_check(lambda x, w, s: _w8a8(x, w.flip(0), s), torch.device("cpu"), dtype=torch.float32)
    assert not ok and err > 0.5
    assert not bridge.usable(torch.device("cpu"))
    with caplog.at_level(logging.INFO, logger="bminf"):
        assert not bridge.probe(torch.device("cpu"), loader=lambda: (_ for _ in ()).throw(OSError("no kernel image")))
    assert len(caplog.records) == 1 and "no kernel image" in caplog.records[0].getMessage()


def test_bridge_skips_gpus_its_kernels_do_not_cover(monkeypatch, caplog):
    from bminf.kernels import cpm_kernels_bridge as bridge
    probed = []
    monkeypatch.setattr(bridge, "probe", lambda device: probed.append(device) or True)
    monkeypatch.setattr(bridge, "_state", {})
    monkeypatch.delenv("BMINF_CPM_KERNELS", raising=False)
    capability = {0: (9, 0), 1: (8, 6)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability[device.index])
    with caplog.at_level(logging.INFO, logger="bminf"):
        assert not bridge.usable(torch.device("cuda", 0))  # Hopper: no import, no self-check
        assert bridge.usable(torch.device("cuda", 1))
    assert probed == [torch.device("cuda", 1)]
    assert [r.getMessage() for r in caplog.records] == [
        "bminf: cpm_kernels not used on cuda:0 (no kernels for compute capability 9.0 and later); "
        "using the PyTorch int8 path"]


def test_load_state_dict_reaches_streamed_blocks_already_in_a_slot():
    torch.manual_seed(0)
    blocks = [nn.Linear(8, 8) for _ in range(6)]
    layers = TransformerBlockList(copy.deepcopy(blocks), "cpu", memory_limit=4 * 512, reserve=0)
    x = torch.randn(2, 8)
    with torch.no_grad():
        layers(x)  # leaves streamed blocks in the slots
        new = {k: v * 2 for k, v in layers.state_dict().items()}
        layers.load_state_dict(new)
        ref = nn.ModuleList(blocks)
        ref.load_state_dict(new)
        want = x
        for block in ref:
            want = block(want)
        assert layers.streamed_blocks and torch.equal(layers(x), want)


def test_devices_as_a_tuple_or_with_a_malformed_entry():
    blocks = [nn.Linear(8, 8) for _ in range(4)]
    layers = TransformerBlockList(copy.deepcopy(blocks), ("cpu", "cpu"), memory_limit=4096, reserve=0)
    assert len(layers._parts) == 2
    with pytest.raises(ValueError, match=r"device entry \('cpu', 1, 2\): expected a device or a \(device, memory_limit\) pair"):
        TransformerBlockList(copy.deepcopy(blocks), [("cpu", 1, 2)], memory_limit=4096)
