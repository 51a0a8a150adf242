"""The backbones against HF transformers on the same weights, the KV cache against full recompute,
and padded batches against rows run alone. Tolerances: relative error (max |diff| / max |ref|) in fp32."""
import pytest
import torch

from bminf.layers import relative_position_bucket
from bminf.quantization import dequantize_state_dict, quantize_
from helpers import hf_gpt2, hf_t5, rel_err, tiny_gpt, tiny_t5

TOL = 1e-4


def ids(batch, seq, vocab, seed=0):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("quantized", [False, True])
def test_gpt_matches_hf_gpt2(quantized):
    model = tiny_gpt()
    if quantized:
        quantize_(model)
    hf = hf_gpt2(model, dequantize_state_dict(model.state_dict()))
    x = ids(2, 40, model.config.vocab_size)
    with torch.no_grad():
        ours, ref = model(x), hf(x).logits
    assert ours.shape == ref.shape == (2, 40, model.config.vocab_size)
    assert rel_err(ours, ref) < TOL


def test_quantization_changes_gpt_logits_only_slightly():
    model = tiny_gpt()
    x = ids(1, 20, model.config.vocab_size)
    with torch.no_grad():
        before = model(x)
        after = quantize_(model)(x)
    err = rel_err(after, before)
    assert 0 < err < 0.05  # int8 weights: visible but small


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("max_distance", [24, 128])
def test_t5_matches_hf_t5(quantized, max_distance):
    model = tiny_t5(max_distance=max_distance)
    if quantized:
        quantize_(model)
    hf = hf_t5(model, dequantize_state_dict(model.state_dict()))
    x, y = ids(2, 45, model.config.vocab_size, 1), ids(2, 37, model.config.vocab_size, 2)
    with torch.no_grad():
        ours = model(x, decoder_input_ids=y)
        ref = hf(input_ids=x, decoder_input_ids=y).logits
    assert rel_err(ours, ref) < TOL


def test_t5_matches_hf_with_encoder_padding():
    model = tiny_t5()
    hf = hf_t5(model)
    x, y = ids(2, 30, model.config.vocab_size, 3), ids(2, 9, model.config.vocab_size, 4)
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, 21:] = 0
    with torch.no_grad():
        ours = model(x, attention_mask=mask, decoder_input_ids=y)
        ref = hf(input_ids=x, attention_mask=mask, decoder_input_ids=y).logits
    assert rel_err(ours, ref) < TOL


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("max_distance", [128, 256])
def test_relative_buckets_match_hf(bidirectional, max_distance):
    from transformers.models.t5.modeling_t5 import T5Attention
    q, k = torch.arange(700), torch.arange(700)
    ours = relative_position_bucket(q, k, bidirectional, 32, max_distance)
    ref = T5Attention._relative_position_bucket(k[None, :] - q[:, None], bidirectional, 32, max_distance)
    assert torch.equal(ours, ref)


def test_gpt_cache_equals_full_recompute():
    model = quantize_(tiny_gpt())
    x = ids(2, 24, model.config.vocab_size, 5)
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2, max_length=32)
        steps = [model(x[:, :10], cache=cache)] + [model(x[:, i:i + 1], cache=cache) for i in range(10, 24)]
    assert cache.length == 24
    assert rel_err(torch.cat(steps, 1), full) < 1e-5


def test_t5_cache_equals_full_recompute():
    model = quantize_(tiny_t5())
    x, y = ids(2, 20, model.config.vocab_size, 6), ids(2, 12, model.config.vocab_size, 7)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[0, 15:] = False
    with torch.no_grad():
        full = model(x, mask, decoder_input_ids=y)
        enc = model.encode(x, mask)
        cache = model.new_cache(mask, max_length=16)
        steps = [model.decode(y[:, :3], enc, cache=cache)]
        steps += [model.decode(y[:, i:i + 1], None, cache=cache) for i in range(3, 12)]  # cross K/V reused
    assert all(cache.cross.filled)
    assert rel_err(torch.cat(steps, 1), full) < 1e-5


@pytest.mark.parametrize("side", ["left", "right"])
def test_gpt_padded_batch_equals_rows_alone(side):
    model = tiny_gpt()
    rows = [ids(1, n, model.config.vocab_size, n)[0] for n in (12, 7, 3)]
    batch = torch.zeros(3, 12, dtype=torch.long)
    mask = torch.zeros(3, 12, dtype=torch.bool)
    for i, r in enumerate(rows):
        sl = slice(12 - len(r), 12) if side == "left" else slice(0, len(r))
        batch[i, sl], mask[i, sl] = r, True
    with torch.no_grad():
        out = model(batch, mask)
        for i, r in enumerate(rows):
            alone = model(r[None])[0]
            assert rel_err(out[i][mask[i]], alone) < 1e-5


def test_gpt_left_padded_incremental_batch_equals_rows_alone():
    model = tiny_gpt()
    a, b = ids(1, 9, model.config.vocab_size, 8)[0], ids(1, 4, model.config.vocab_size, 9)[0]
    batch = torch.stack([a, torch.cat([torch.zeros(5, dtype=torch.long), b])])
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, :5] = False
    nxt = ids(2, 3, model.config.vocab_size, 10)
    with torch.no_grad():
        cache = model.new_cache(2, 16)
        model(batch, mask, cache=cache)
        steps = torch.cat([model(nxt[:, i:i + 1], cache=cache) for i in range(3)], 1)
        for row, prompt in enumerate((a, b)):
            alone = model(torch.cat([prompt, nxt[row]])[None])[0, -3:]
            assert rel_err(steps[row], alone) < 1e-5


def test_t5_padded_batch_equals_rows_alone():
    model = tiny_t5()
    srcs = [ids(1, n, model.config.vocab_size, n)[0] for n in (14, 6)]
    tgts = [ids(1, n, model.config.vocab_size, 20 + n)[0] for n in (5, 8)]

    def pad(rows, length):
        out = torch.zeros(len(rows), length, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, r in enumerate(rows):
            out[i, :len(r)], mask[i, :len(r)] = r, True
        return out, mask

    (x, xm), (y, ym) = pad(srcs, 14), pad(tgts, 8)
    with torch.no_grad():
        out = model(x, xm, decoder_input_ids=y, decoder_attention_mask=ym)
        for i in range(2):
            alone = model(srcs[i][None], decoder_input_ids=tgts[i][None])[0]
            assert rel_err(out[i][ym[i]], alone) < 1e-5


def test_bad_inputs_give_clear_errors():
    gpt, t5 = tiny_gpt(), tiny_t5()
    with pytest.raises(ValueError, match="outside"):
        gpt(torch.tensor([[1, gpt.config.vocab_size]]))
    with pytest.raises(ValueError, match="positions"):
        gpt(torch.zeros(1, gpt.config.max_positions + 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(batch, seq\)"):
        gpt(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="max_length"):
        cache = gpt.new_cache(1, 4)
        gpt(torch.ones(1, 5, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="decoder_input_ids"):
        t5(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="attention_mask|mask shape"):
        gpt(torch.tensor([[1, 2]]), torch.ones(1, 3))


def test_kv_cache_takes_one_device_per_layer():
    from bminf.layers import KVCache
    cache = KVCache(2, 1, 2, 8, 4, device=["cpu", "cpu"], mask_device="cpu")
    assert len(cache.k) == 2 and cache.k[1].shape == (1, 2, 8, 4) and cache.max_length == 8
    with pytest.raises(ValueError, match="3 devices given for 2 layers"):
        KVCache(2, 1, 2, 8, 4, device=["cpu"] * 3)
