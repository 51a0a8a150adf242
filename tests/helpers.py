"""Tiny configs, random weights and HF rename tables shared by the backbone and checkpoint tests."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bminf.models.gpt import GPT, GPTConfig
from bminf.models.t5 import T5, T5Config

TINY_GPT = dict(vocab_size=97, max_positions=64, d_model=32, d_ff=64, n_heads=4, d_head=8, n_layers=3)
TINY_T5 = dict(vocab_size=101, d_model=32, d_ff=48, n_heads=4, d_head=8, n_encoder_layers=2, n_decoder_layers=2,
               num_buckets=32, max_distance=24)


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Fill every float parameter with N(0, std) (norm gains around 1) so that no weight is trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.is_floating_point():
                continue
            noise = torch.randn(p.shape, generator=gen) * std
            p.copy_(1 + noise if name.endswith(("ln_attn.weight", "ln_ff.weight", "ln_cross_attn.weight",
                                                   "layernorm.weight", "ln_enc.weight", "ln_dec.weight"))
                    else noise)
    return model


def tiny_gpt(seed: int = 0, **overrides) -> GPT:
    return randomize_(GPT(GPTConfig(**{**TINY_GPT, **overrides})), seed).eval()


def tiny_t5(seed: int = 0, **overrides) -> T5:
    return randomize_(T5(T5Config(**{**TINY_T5, **overrides})), seed).eval()


def hf_gpt2(model: GPT, state=None):
    """An HF GPT2LMHeadModel holding ``state`` (our names, float) or the model's own weights."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from bminf.checkpoint.hf import gpt_to_hf
    c = model.config
    assert c.n_heads * c.d_head == c.d_model
    hf = GPT2LMHeadModel(GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.max_positions, n_embd=c.d_model, n_layer=c.n_layers,
        n_head=c.n_heads, n_inner=c.d_ff, activation_function="gelu_new", layer_norm_epsilon=c.eps,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=0)).eval()
    missing, unexpected = hf.load_state_dict(gpt_to_hf(state or model.state_dict()), strict=False)
    assert not unexpected and all(k.endswith(("attn.bias", "attn.masked_bias")) for k in missing), missing
    return hf


def t5_to_hf(state: dict) -> dict:
    """Our T5 names -> HF ``T5ForConditionalGeneration`` names (float weights)."""
    out = {"shared.weight": state["input_embedding.weight"],
           "encoder.embed_tokens.weight": state["input_embedding.weight"],
           "decoder.embed_tokens.weight": state["input_embedding.weight"],
           "lm_head.weight": state["output_embedding.weight"],
           "encoder.final_layer_norm.weight": state["ln_enc.weight"],
           "decoder.final_layer_norm.weight": state["ln_dec.weight"],
           "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": state["position_bias_enc.weight"].t(),
           "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": state["position_bias_dec.weight"].t()}
    attn = {"project_q": "q", "project_k": "k", "project_v": "v", "linear_out": "o"}
    ff = {"linear_in": "wi_0", "linear_gated": "wi_1", "linear_out": "wo"}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] not in ("enc_layers", "dec_layers"):
            continue
        stack = "encoder" if parts[0] == "enc_layers" else "decoder"
        prefix, sub = f"{stack}.block.{parts[1]}.layer", parts[2]
        ff_layer = 1 if stack == "encoder" else 2
        if sub == "ln_attn":
            out[f"{prefix}.0.layer_norm.weight"] = value
        elif sub == "self_attn":
            out[f"{prefix}.0.SelfAttention.{attn[parts[3]]}.weight"] = value
        elif sub == "ln_cross_attn":
            out[f"{prefix}.1.layer_norm.weight"] = value
        elif sub == "cross_attn":
            out[f"{prefix}.1.EncDecAttention.{attn[parts[3]]}.weight"] = value
        elif sub == "ln_ff":
            out[f"{prefix}.{ff_layer}.layer_norm.weight"] = value
        elif sub == "ff":
            out[f"{prefix}.{ff_layer}.DenseReluDense.{ff[parts[3]]}.weight"] = value
    return out


def hf_t5(model: T5, state=None):
    """An HF T5ForConditionalGeneration (gated-gelu, untied head) holding the same weights."""
    from transformers import T5Config as HFT5Config, T5ForConditionalGeneration
    c = model.config
    hf = T5ForConditionalGeneration(HFT5Config(
        vocab_size=c.vocab_size, d_model=c.d_model, d_kv=c.d_head, d_ff=c.d_ff, num_layers=c.n_encoder_layers,
        num_decoder_layers=c.n_decoder_layers, num_heads=c.n_heads, relative_attention_num_buckets=c.num_buckets,
        relative_attention_max_distance=c.max_distance, dropout_rate=0.0, layer_norm_epsilon=c.eps,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0)).eval()
    mapped = t5_to_hf(state or model.state_dict())
    head = mapped.pop("lm_head.weight")
    missing, unexpected = hf.load_state_dict(mapped, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    # newer transformers tie lm_head to `shared` whatever the config says: untie it explicitly
    hf.lm_head.weight = torch.nn.Parameter(head.clone())
    assert not getattr(hf.config, "scale_decoder_outputs", False)
    return hf


class LargestAllocation(TorchDispatchMode):
    """Records the largest tensor any torch op creates on a real device (meta tensors cost nothing)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and not t.is_meta:
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


class Replayed:
    """A CUDA graph's stand-in on the CPU: ``replay`` runs the captured function again and writes its
    results into the tensors the capture returned, as a graph writes into its output buffers."""

    def __init__(self, run, out):
        self.run, self.out, self.replays = run, out, 0

    def replay(self):
        self.replays += 1
        new, out = self.run(), self.out
        pairs = zip(out, new) if isinstance(out, tuple) else [(out, new)]
        for a, b in pairs:
            if a is not None:
                a.copy_(b)


def recorder(made):
    def record(run, warm_ups, fused):
        for _ in range(warm_ups):
            run()
        out = run()
        made.append(Replayed(run, out))
        return made[-1], out
    return record
