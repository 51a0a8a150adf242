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


# ---------------------------------------------------------------- bad input never does harm

@pytest.mark.parametrize("field, value, error, message", [
    ("n_layers", -1, ValueError, r"GPTConfig\.n_layers must be >= 1, got -1"),
    ("n_layers", 0, ValueError, r"GPTConfig\.n_layers must be >= 1"),
    ("vocab_size", 2.5, TypeError, r"GPTConfig\.vocab_size must be an int, got float"),
    ("d_ff", True, TypeError, r"GPTConfig\.d_ff must be an int, got bool"),
    ("eps", 0.0, ValueError, r"GPTConfig\.eps must be a finite number > 0"),
    ("eps", float("nan"), ValueError, r"GPTConfig\.eps must be a finite number > 0"),
    ("eps", "1e-5", TypeError, r"GPTConfig\.eps must be a number, got str"),
    ("d_head", 7, ValueError, r"n_heads \* d_head \(4 \* 7\) must equal d_model \(32\)"),
])
def test_gpt_config_is_validated(field, value, error, message):
    from bminf.models.gpt import GPTConfig
    from helpers import TINY_GPT
    with pytest.raises(error, match=message):
        GPTConfig(**{**TINY_GPT, field: value})


@pytest.mark.parametrize("field, value, error, message", [
    ("n_encoder_layers", 0, ValueError, r"T5Config\.n_encoder_layers must be >= 1, got 0"),
    ("n_heads", -2, ValueError, r"T5Config\.n_heads must be >= 1"),
    ("max_length", "2048", TypeError, r"T5Config\.max_length must be an int, got str"),
    ("num_buckets", 31, ValueError, r"num_buckets must be even and >= 4, got 31"),
    ("num_buckets", 2, ValueError, r"num_buckets must be even and >= 4, got 2"),
    ("max_distance", 16, ValueError, r"max_distance \(16\) must exceed num_buckets // 2 \(16\)"),
    ("eps", -1e-6, ValueError, r"T5Config\.eps must be a finite number > 0"),
])
def test_t5_config_is_validated(field, value, error, message):
    from bminf.models.t5 import T5Config
    from helpers import TINY_T5
    with pytest.raises(error, match=message):
        T5Config(**{**TINY_T5, field: value})


def test_t5_refuses_inputs_beyond_max_length_before_allocating():
    model = tiny_t5(max_length=16)
    # 100k ids: refused from the length alone, before the embedding or any attention is allocated
    huge = torch.zeros(1, 100_000, dtype=torch.long)
    with pytest.raises(ValueError, match=r"input_ids has 100000 tokens, more than the model's max_length \(16\)"):
        model.encode(huge)
    with pytest.raises(ValueError, match=r"decoder_input_ids has 17 tokens, more than the model's max_length"):
        model.decode(torch.zeros(1, 17, dtype=torch.long), torch.zeros(1, 4, 32))
    with pytest.raises(ValueError, match=r"max_length 17 exceeds the model's max_length \(16\)"):
        model.new_cache(torch.ones(1, 4, dtype=torch.bool), max_length=17)
    with pytest.raises(ValueError, match=r"encoder_mask covers 17 tokens, more than the model's max_length"):
        model.new_cache(torch.ones(1, 17, dtype=torch.bool), max_length=8)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        model.new_cache(torch.ones(0, 4, dtype=torch.bool), max_length=8)
    assert model.encode(torch.ones(1, 16, dtype=torch.long)).shape == (1, 16, 32)
    gpt = tiny_gpt()
    with pytest.raises(ValueError, match=r"max_length 65 exceeds the model's max_positions \(64\)"):
        gpt.new_cache(1, 65)
    with pytest.raises(TypeError, match="batch_size must be an int"):
        gpt.new_cache(2.0, 8)


@pytest.mark.parametrize("quantized", [False, True])
def test_t5_padded_decoder_prefixes_continue_on_the_cache_like_rows_alone(quantized):
    model = tiny_t5(seed=3)
    if quantized:
        quantize_(model)
    v = model.config.vocab_size
    srcs = [ids(1, n, v, 30 + n)[0] for n in (9, 5, 7)]
    prefixes = [ids(1, n, v, 40 + n)[0] for n in (3, 6, 2)]
    sides = ["right", "none", "left"]
    x = torch.zeros(3, 9, dtype=torch.long)
    xm = torch.zeros(3, 9, dtype=torch.bool)
    y = torch.zeros(3, 6, dtype=torch.long)
    ym = torch.zeros(3, 6, dtype=torch.bool)
    for i, (src, pre, side) in enumerate(zip(srcs, prefixes, sides)):
        x[i, :len(src)], xm[i, :len(src)] = src, True
        sl = slice(6 - len(pre), 6) if side == "left" else slice(0, len(pre))
        y[i, sl], ym[i, sl] = pre, True
    nxt = ids(3, 4, v, 50)
    with torch.no_grad():
        enc = model.encode(x, xm)
        cache = model.new_cache(xm, max_length=12)
        first = model.decode(y, enc, decoder_attention_mask=ym, cache=cache)
        steps = torch.cat([model.decode(nxt[:, i:i + 1], cache=cache) for i in range(4)], 1)
        for i in range(3):
            alone = model(srcs[i][None], decoder_input_ids=torch.cat([prefixes[i], nxt[i]])[None])[0]
            assert rel_err(first[i][ym[i]], alone[:len(prefixes[i])]) < 1e-5, sides[i]
            assert rel_err(steps[i], alone[len(prefixes[i]):]) < 1e-5, sides[i]


def test_one_token_steps_check_ids_on_cpu():
    gpt, t5 = tiny_gpt(), tiny_t5()
    cache = gpt.new_cache(1, 8)
    gpt(torch.tensor([[1, 2]]), cache=cache)
    with pytest.raises(ValueError, match=r"input_ids holds ids outside \[0, 97\)"):
        gpt(torch.tensor([[97]]), cache=cache)
    assert cache.length == 2  # refused before the cache moved
    mask = torch.ones(1, 3, dtype=torch.bool)
    tcache = t5.new_cache(mask, max_length=8)
    t5.decode(torch.tensor([[1]]), t5.encode(torch.tensor([[3, 4, 5]])), cache=tcache)
    with pytest.raises(ValueError, match=r"decoder_input_ids holds ids outside \[0, 101\)"):
        t5.decode(torch.tensor([[-1]]), cache=tcache)
    assert tcache.length == 1


def test_t5_encoder_output_must_match_the_batch():
    model = tiny_t5()
    x = ids(1, 5, model.config.vocab_size, 1)
    with torch.no_grad():
        enc1 = model.encode(x)
        mask = torch.ones(3, 5, dtype=torch.bool)
        cache = model.new_cache(mask, max_length=8)
        y = ids(3, 2, model.config.vocab_size, 2)
        with pytest.raises(ValueError, match=r"encoder_output must be \(batch=3, source_len, 32\).*got \(1, 5, 32\)"):
            model.decode(y, enc1, cache=cache)
        with pytest.raises(ValueError, match=r"encoder_output must be \(batch=3"):
            model.decode(y, enc1, torch.ones(1, 5, dtype=torch.bool))
        assert cache.length == 0 and not any(cache.cross.filled)
        with pytest.raises(ValueError, match="decode needs encoder_output on a cache's first step"):
            model.decode(y, cache=cache)
        with pytest.raises(ValueError, match=r"encoder mask of shape \(3, 4\) does not match encoder_output \(3, 5\)"):
            model.decode(y, enc1.expand(3, 5, 32), torch.ones(3, 4, dtype=torch.bool))
        with pytest.raises(ValueError, match=r"does not match encoder_output"):
            model.decode(y, model.encode(ids(3, 6, model.config.vocab_size, 3)), cache=cache)
        assert cache.length == 0


def test_t5_cache_reset_starts_a_new_prompt():
    model = tiny_t5()
    v = model.config.vocab_size
    x1, x2 = ids(2, 6, v, 11), ids(2, 6, v, 12)
    m2 = torch.ones(2, 6, dtype=torch.bool)
    m2[1, 4:] = False
    y = ids(2, 5, v, 13)
    with torch.no_grad():
        cache = model.new_cache(torch.ones(2, 6, dtype=torch.bool), max_length=8)
        model.decode(y[:, :3], model.encode(x1), cache=cache)
        model.decode(y[:, 3:4], cache=cache)
        cache.reset(m2)
        assert cache.length == 0 and not any(cache.cross.filled)
        again = torch.cat([model.decode(y[:, :2], model.encode(x2, m2), cache=cache),
                           model.decode(y[:, 2:5], cache=cache)], 1)
        fresh = model(x2, m2, decoder_input_ids=y)
    assert rel_err(again, fresh) < 1e-5
    with pytest.raises(ValueError, match=r"encoder_mask of shape \(2, 7\) does not fit this cache's \(2, 6\)"):
        cache.reset(torch.ones(2, 7, dtype=torch.bool))


def test_t5_fp16_overflow_is_clamped_as_in_hf():
    model = tiny_t5().half()
    with torch.no_grad():
        model.enc_layers[0].ff.linear_out.weight.mul_(1e5)  # the residual overflows fp16 in block 0
        x = ids(1, 6, model.config.vocab_size, 4)
        out = model.encode(x)
        assert torch.isfinite(out).all()
        logits = model(x, decoder_input_ids=ids(1, 3, model.config.vocab_size, 5))
        assert torch.isfinite(logits).all()
    from bminf.models.t5 import clamp_fp16
    h = torch.tensor([1e30, 1.0])
    assert clamp_fp16(h) is h  # other dtypes pass untouched
    limit = float(torch.tensor(65504 - 1000, dtype=torch.float16))  # 64512 on fp16's grid
    big = torch.tensor([float("inf"), -float("inf"), 1.0], dtype=torch.float16)
    assert clamp_fp16(big).tolist() == [limit, -limit, 1.0]
    assert torch.equal(clamp_fp16(torch.tensor([65504.0, 1.0], dtype=torch.float16)),
                       torch.tensor([65504.0, 1.0], dtype=torch.float16))  # no inf: unchanged
