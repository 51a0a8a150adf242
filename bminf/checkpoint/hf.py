"""Rename tables between our GPT and HuggingFace's ``GPT2LMHeadModel`` (the CPM-Generate release).

HF's GPT-2 uses ``Conv1D`` layers storing weights as (in, out) and one fused ``c_attn`` for Q, K, V;
ours are ``nn.Linear`` (out, in) with separate projections, as in BMInf's checkpoints.
"""
import re
from typing import Dict

import torch

# HF GPT-2 state dicts may carry these non-parameter buffers and the tied head; none is a weight of ours
_HF_IGNORED = re.compile(r"^(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)$|^lm_head\.weight$")

_HF_BLOCK = {
    "ln_1.weight": "ln_attn.weight", "ln_1.bias": "ln_attn.bias",
    "ln_2.weight": "ln_ff.weight", "ln_2.bias": "ln_ff.bias",
    "attn.c_proj.bias": "self_attn.linear_out.bias",
    "mlp.c_fc.bias": "ff.linear_in.bias", "mlp.c_proj.bias": "ff.linear_out.bias",
}
_HF_BLOCK_TRANSPOSED = {
    "attn.c_proj.weight": "self_attn.linear_out.weight",
    "mlp.c_fc.weight": "ff.linear_in.weight", "mlp.c_proj.weight": "ff.linear_out.weight",
}
_HF_TOP = {"wte.weight": "token_embedding.weight", "wpe.weight": "position_embedding.weight",
           "ln_f.weight": "layernorm.weight", "ln_f.bias": "layernorm.bias"}


def gpt_from_hf(hf_state: Dict[str, torch.Tensor], source: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """Map a ``GPT2LMHeadModel`` state dict to our GPT names (float weights, not yet quantized).

    Keys we do not know raise ``ValueError`` naming them; a tied ``lm_head.weight`` that differs from
    the token embedding is rejected, since our head is tied.
    """
    out, unknown = {}, []
    for key, value in hf_state.items():
        name = key[len("transformer."):] if key.startswith("transformer.") else key
        m = re.match(r"^h\.(\d+)\.(.+)$", name)
        if _HF_IGNORED.match(key):
            continue
        if name in _HF_TOP:
            out[_HF_TOP[name]] = value
        elif m and m.group(2) == "attn.c_attn.weight":
            q, k, v = value.t().chunk(3, dim=0)  # (in, 3*out) -> three (out, in)
            for proj, w in zip("qkv", (q, k, v)):
                out[f"layers.{m.group(1)}.self_attn.project_{proj}.weight"] = w.contiguous()
        elif m and m.group(2) == "attn.c_attn.bias":
            for proj, b in zip("qkv", value.chunk(3)):
                out[f"layers.{m.group(1)}.self_attn.project_{proj}.bias"] = b.contiguous()
        elif m and m.group(2) in _HF_BLOCK:
            out[f"layers.{m.group(1)}.{_HF_BLOCK[m.group(2)]}"] = value
        elif m and m.group(2) in _HF_BLOCK_TRANSPOSED:
            out[f"layers.{m.group(1)}.{_HF_BLOCK_TRANSPOSED[m.group(2)]}"] = value.t().contiguous()
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{source}: unexpected GPT-2 keys {sorted(unknown)[:8]}"
                         f"{' ...' if len(unknown) > 8 else ''}")
    head = hf_state.get("lm_head.weight")
    if head is not None and "token_embedding.weight" in out and not torch.equal(head, out["token_embedding.weight"]):
        raise ValueError(f"{source}: lm_head.weight differs from the token embedding; CPM-1's head is tied")
    return out


def gpt_to_hf(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Inverse of ``gpt_from_hf`` for float weights: our GPT names -> ``GPT2LMHeadModel`` names."""
    top = {v: k for k, v in _HF_TOP.items()}
    block = {v: k for k, v in _HF_BLOCK.items()}
    block_t = {v: k for k, v in _HF_BLOCK_TRANSPOSED.items()}
    out = {}
    for key, value in state.items():
        if key in top:
            out[f"transformer.{top[key]}"] = value
            continue
        i, rest = re.match(r"^layers\.(\d+)\.(.+)$", key).groups()
        prefix = f"transformer.h.{i}."
        if rest in block:
            out[prefix + block[rest]] = value
        elif rest in block_t:
            out[prefix + block_t[rest]] = value.t().contiguous()
        elif rest.startswith("self_attn.project_") and rest.endswith(".weight"):
            if rest.endswith("project_q.weight"):
                qkv = [state[f"layers.{i}.self_attn.project_{p}.weight"] for p in "qkv"]
                out[prefix + "attn.c_attn.weight"] = torch.cat(qkv, 0).t().contiguous()
        elif rest.startswith("self_attn.project_") and rest.endswith(".bias"):
            if rest.endswith("project_q.bias"):
                out[prefix + "attn.c_attn.bias"] = torch.cat(
                    [state[f"layers.{i}.self_attn.project_{p}.bias"] for p in "qkv"])
        else:
            raise ValueError(f"no GPT-2 name for {key}")
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return out
