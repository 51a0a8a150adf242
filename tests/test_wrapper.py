"""bminf.wrapper on tiny random HF models (GPT-2, T5, BERT, Llama) on the CPU: the same outputs
as the original (exact without quantization, within int8 tolerance with it, tight against the
original carrying the dequantized weights), input gradients, and what is reported."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

tf = pytest.importorskip("transformers")

from bminf import wrapper  # noqa: E402
from bminf.offload import TransformerBlockList  # noqa: E402
from bminf.offload.stream import BlockWeights  # noqa: E402
from bminf.quantization import QuantizedLinear, quantize_weight  # noqa: E402
from bminf import WrapperWarning  # noqa: E402

V = 96


def gpt2():
    return tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=4, n_head=2, vocab_size=V, n_positions=64,
                                            bos_token_id=1, eos_token_id=2, pad_token_id=0))


def llama():
    return tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                              num_attention_heads=2, num_key_value_heads=1, vocab_size=V,
                                              bos_token_id=1, eos_token_id=2, pad_token_id=0))


def t5():
    return tf.T5ForConditionalGeneration(tf.T5Config(d_model=32, d_ff=64, num_layers=3, num_decoder_layers=3,
                                                     num_heads=2, d_kv=16, vocab_size=V, decoder_start_token_id=0,
                                                     pad_token_id=0, eos_token_id=2))


def bert():
    return tf.BertModel(tf.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                      num_attention_heads=2, vocab_size=V))


MODELS = {"gpt2": gpt2, "llama": llama, "t5": t5, "bert": bert}
LISTS = {"gpt2": ["transformer.h"], "llama": ["model.layers"], "t5": ["encoder.block", "decoder.block"],
         "bert": ["encoder.layer"]}


def build(name):
    torch.manual_seed(0)
    return MODELS[name]().eval()


def streaming_limit(model, name):
    """A limit that streams about half the blocks: 2 slots + a quarter of the blocks."""
    blocks = [b for path in LISTS[name] for b in model.get_submodule(path)]
    sizes = [BlockWeights(b).nbytes for b in blocks]
    return 2 * max(sizes) + sum(sizes) // 4


def run(model, name, ids, **kw):
    extra = {"decoder_input_ids": ids[:, :4]} if name == "t5" else {}
    out = model(input_ids=ids, **extra, **kw)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def wrap(model, name, quantization, stream):
    limit = streaming_limit(model, name) if stream else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", WrapperWarning)
        return wrapper(model, quantization=quantization, memory_limit=limit, device="cpu", reserve=0)


def dequantized_copy(model):
    """The original model with each Linear / Conv1D weight replaced by what int8 gives back
    (tied weights excepted: the wrapper leaves those unquantized)."""
    ref = copy.deepcopy(model)
    counts = {}
    for m in ref.modules():
        for p in m._parameters.values():
            counts[id(p)] = counts.get(id(p), 0) + 1
    for m in ref.modules():
        if (type(m) is nn.Linear or type(m).__name__ == "Conv1D") and counts[id(m.weight)] == 1:
            w = m.weight.data if type(m) is nn.Linear else m.weight.data.t()
            q, s = quantize_weight(w)
            d = q.float() * s.float()[:, None]
            m.weight.data = d if type(m) is nn.Linear else d.t().contiguous()
    return ref


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("stream", [False, True])
def test_unquantized_is_exact(name, stream):
    ref = build(name)
    model = wrap(copy.deepcopy(ref), name, False, stream)
    lists = [model.get_submodule(p) for p in LISTS[name]]
    assert all(isinstance(lst, TransformerBlockList) for lst in lists)
    assert any(lst.streamed_blocks for lst in lists) == stream
    ids = torch.randint(3, V, (2, 9))
    with torch.no_grad():
        assert torch.equal(run(model, name, ids), run(ref, name, ids))


@pytest.mark.parametrize("name", list(MODELS))
def test_quantized_within_int8_tolerance(name):
    ref = build(name)
    tight = dequantized_copy(ref)
    model = wrap(copy.deepcopy(ref), name, True, stream=True)
    n_quantized = sum(isinstance(m, QuantizedLinear) for m in model.modules())
    assert n_quantized >= 4 * len(list(model.get_submodule(LISTS[name][0])))
    ids = torch.randint(3, V, (2, 9))
    with torch.no_grad():
        got, want, want_tight = run(model, name, ids), run(ref, name, ids), run(tight, name, ids)
    assert torch.allclose(got, want_tight, rtol=1e-4, atol=1e-5)
    # int8 per-row rounding: a few percent of the output scale, not more
    assert (got - want).abs().max() <= 0.05 * want.abs().max()


@pytest.mark.parametrize("name", ["gpt2", "llama", "t5"])
def test_generate_matches_with_streaming(name):
    ref = build(name)
    model = wrap(copy.deepcopy(ref), name, False, stream=True)
    ids = torch.randint(3, V, (1, 6))
    with torch.no_grad():
        want = ref.generate(ids, max_new_tokens=6, do_sample=False)
        got = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("quantization", [False, True])
def test_input_gradients_match(name, quantization):
    ref = build(name)
    base = dequantized_copy(ref) if quantization else ref
    model = wrap(copy.deepcopy(ref), name, quantization, stream=True)
    torch.manual_seed(1)
    embeds = torch.randn(2, 7, 32)
    grads = []
    for m in (base, model):
        for p in m.parameters():
            p.requires_grad_(False)
        x = embeds.clone().requires_grad_()
        extra = {"decoder_inputs_embeds": x[:, :3] * 0.5} if name == "t5" else {}
        # a recompute in backward would append to a KV cache again: no cache while backpropagating
        out = m(inputs_embeds=x, **extra, **({} if name == "bert" else {"use_cache": False}))
        y = out.logits if hasattr(out, "logits") else out.last_hidden_state
        (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
        grads.append(x.grad)
    assert grads[1].abs().sum() > 0
    assert torch.allclose(grads[1], grads[0], rtol=1e-4, atol=1e-5)


def test_converted_modules_look_like_what_they_replace():
    ref = build("gpt2")
    model = wrap(copy.deepcopy(ref), "gpt2", True, stream=True)
    h = model.transformer.h
    assert isinstance(h, nn.ModuleList) and len(h) == 4 and len(h[1:3]) == 2
    assert [type(b).__name__ for b in h] == ["GPT2Block"] * 4 and h[-1] is list(h)[-1]
    c_attn = h[0].attn.c_attn
    # HF Conv1D stores (in, out): the QuantizedLinear holds the transposed (out, in) weight
    assert isinstance(c_attn, QuantizedLinear) and c_attn.weight.shape == (96, 32)
    assert (c_attn.in_features, c_attn.out_features, c_attn.nf, c_attn.nx) == (32, 96, 96, 32)
    assert c_attn.weight.dtype == torch.int8 and c_attn.scale.dtype == torch.float16
    x = torch.randn(3, 32)
    want = x @ ref.transformer.h[0].attn.c_attn.weight.detach() + ref.transformer.h[0].attn.c_attn.bias.detach()
    with torch.no_grad():
        assert (c_attn(x) - want).abs().max() <= 0.02 * want.abs().max()


def test_reports_what_it_cannot_convert():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.mixed = nn.ModuleList([nn.Linear(4, 4), nn.ReLU()])
            self.nested = nn.ModuleList([nn.ModuleList([nn.Linear(4, 4)]) for _ in range(2)])
            self.mha = nn.MultiheadAttention(4, 2)
            self.emb = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight  # tied

    with pytest.warns(WrapperWarning) as rec:
        model = wrapper(Odd(), device="cpu")
    text = str(rec[0].message)
    assert "mixed: ModuleList of mixed types" in text and "nested: ModuleList of containers" in text
    assert "mha.out_proj" in text and "head: weight tied to emb.weight" in text
    assert isinstance(model.mixed[0], QuantizedLinear)  # still quantized, just not a block list
    assert type(model.mha.out_proj) is not QuantizedLinear and type(model.head) is nn.Linear
    with pytest.raises(ValueError, match="mixed types"):
        wrapper(Odd(), device="cpu", strict=True)
    with pytest.warns(WrapperWarning, match="no nn.Linear"):
        wrapper(nn.Sequential(nn.ReLU()), device="cpu")


def test_gpt2_reports_its_tied_lm_head():
    with pytest.warns(WrapperWarning, match="lm_head: weight tied to transformer.wte.weight"):
        wrapper(build("gpt2"), device="cpu")


def test_too_small_budget_names_the_minimum_and_leaves_the_model_as_it_was():
    model = build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=r"bminf.wrapper: memory_limit of 1000 bytes is too small: at least \d+"):
        wrapper(model, memory_limit=1000, device="cpu", reserve=0)
    assert [type(m) for m in model.modules()] == kinds  # no QuantizedLinear, no TransformerBlockList
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # so a retry with a workable budget converts it fully
    model = wrapper(model, memory_limit=10 << 20, device="cpu", reserve=0)
    assert isinstance(model.model.layers, TransformerBlockList)
    assert any(isinstance(m, QuantizedLinear) for m in model.modules())


def test_blocks_sharing_weights_are_reported_and_left_resident():
    shared = nn.Linear(8, 8)
    net = nn.Sequential(nn.ModuleList([shared, shared, shared]))  # ALBERT-style: one block, used thrice
    with pytest.warns(WrapperWarning, match="0: blocks 0 and 1 share weights; left resident"):
        net = wrapper(net, quantization=False, device="cpu")
    assert type(net[0]) is nn.ModuleList


def test_encoder_decoder_shares_one_budget_and_prefers_the_decoder():
    torch.manual_seed(0)
    model = tf.T5ForConditionalGeneration(tf.T5Config(d_model=32, d_ff=64, num_layers=6, num_decoder_layers=3,
                                                      num_heads=2, d_kv=16, vocab_size=V)).eval()
    dec = [BlockWeights(b).nbytes for b in model.decoder.block]
    limit = 2 * max(dec) + sum(dec)  # the whole decoder and two slots: nothing left for the encoder
    model = wrapper(model, quantization=False, memory_limit=limit, device="cpu", reserve=0)
    assert model.decoder.block.streamed_blocks == []
    assert model.encoder.block.streamed_blocks == [0, 1, 2, 3, 4, 5]


def test_bminf_wrapper_stays_callable_after_importing_its_module():
    import bminf
    import bminf.wrapping  # noqa: F401  (a submodule import must not shadow the function)
    assert callable(bminf.wrapper) and bminf.wrapper is bminf.wrapping.wrapper
