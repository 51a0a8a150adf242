"""HuggingFace-format CPM-1 (``GPT2LMHeadModel``, the CPM-Generate release): rename tables, loading
and saving.

HF's GPT-2 uses ``Conv1D`` layers storing weights as (in, out) and one fused ``c_attn`` for Q, K, V;
ours are ``nn.Linear`` (out, in) with separate projections, as in BMInf's checkpoints.

>>> model = load_hf_gpt("CPM-Generate")                 # doctest: +SKIP  (int8; quantize=False keeps float)
>>> save_hf_gpt(model, "out/cpm1-hf")                   # doctest: +SKIP  (dequantized, float32)
"""
import json
import os
import pickle
import re
import zipfile
from contextlib import ExitStack
from typing import Dict, Tuple, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from ..models.gpt import GPT, GPTConfig
from ..quantization import QuantizedLinear, dequantize_state_dict, quantize_weight
from .common import CheckpointError, build_model, copy_into, materialize_, write_atomic
from .safetensors_format import open_safetensors, tensor_specs

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


# ---------------------------------------------------------------------------------------------
# Loading and saving HF-format CPM-1 (CPM-Generate): config.json + pytorch_model.bin or model.safetensors

HF_CONFIG = "config.json"
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_HF_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def is_hf_dir(directory: str) -> bool:
    """A directory holding an HF ``config.json`` (a ``model_type``) and weights or a shard index."""
    try:
        with open(os.path.join(directory, HF_CONFIG), encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(doc, dict) and "model_type" in doc and \
        any(os.path.isfile(os.path.join(directory, n)) for n in HF_WEIGHTS + _HF_INDEXES)


def read_hf_config(directory: Union[str, os.PathLike]) -> GPTConfig:
    """Our ``GPTConfig`` from an HF GPT-2 ``config.json``; settings our GPT cannot run are errors.

    >>> read_hf_config("CPM-Generate").n_layers                  # doctest: +SKIP
    32
    """
    path = os.path.join(os.fspath(directory), HF_CONFIG)
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: no {HF_CONFIG} beside the HF weights") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("model_type") != "gpt2":
        raise CheckpointError(f"{path}: model_type is {doc.get('model_type') if isinstance(doc, dict) else None!r}; "
                              "only GPT-2 layout (CPM-1) is supported")
    missing = [k for k in ("vocab_size", "n_embd", "n_layer", "n_head") if not isinstance(doc.get(k), int)]
    if missing:
        raise CheckpointError(f"{path}: lacks integer {missing}")
    problems = []
    if doc.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        problems.append(f"activation_function {doc['activation_function']!r} (CPM-1 uses gelu_new)")
    if doc.get("scale_attn_weights", True) is not True or doc.get("scale_attn_by_inverse_layer_idx", False):
        problems.append("attention scaling other than 1/sqrt(d_head)")
    if doc.get("add_cross_attention", False):
        problems.append("cross-attention")
    if doc["n_embd"] % doc["n_head"]:
        problems.append(f"n_embd {doc['n_embd']} not divisible by n_head {doc['n_head']}")
    if problems:
        raise CheckpointError(f"{path}: unsupported GPT-2 settings: {'; '.join(problems)}")
    try:
        return GPTConfig(vocab_size=doc["vocab_size"], max_positions=doc.get("n_positions", 1024),
                         d_model=doc["n_embd"], d_ff=doc.get("n_inner") or 4 * doc["n_embd"], n_heads=doc["n_head"],
                         d_head=doc["n_embd"] // doc["n_head"], n_layers=doc["n_layer"],
                         eps=doc.get("layer_norm_epsilon", 1e-5))
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise CheckpointError(f"{path}: invalid GPT-2 config: {e}") from None


def _torch_load(path: str) -> Dict[str, torch.Tensor]:
    with open(path, "rb") as f:
        is_zip = f.read(2) == b"PK"
    if is_zip:
        # torch never checks the zip's CRCs, so a flipped byte in the data would load as garbage
        try:
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise CheckpointError(f"{path}: not a readable zip archive (truncated or corrupt?): {e}") from None
        if bad is not None:
            raise CheckpointError(f"{path}: corrupt: checksum mismatch in {bad}")
    try:
        # weights_only=True uses torch's restricted unpickler: it rebuilds tensors and plain containers
        # only and refuses every other global, so a malicious pickle cannot run code. mmap leaves the
        # weights in the page cache instead of copying them all into memory at once.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused: it pickles objects other than tensors "
                              f"({str(e).splitlines()[-1][:200]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint (truncated or corrupt?): "
                              f"{type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    return state


def _hf_files(path: str) -> list:
    """The weight files to read: ``path`` itself if a file, else the directory's single file
    (safetensors preferred) or the shards its index lists."""
    if os.path.isfile(path):
        return [path]
    for name in HF_WEIGHTS:
        if os.path.isfile(os.path.join(path, name)):
            return [os.path.join(path, name)]
    for name in _HF_INDEXES:
        index_path = os.path.join(path, name)
        if os.path.isfile(index_path):
            try:
                with open(index_path, encoding="utf-8") as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{index_path}: not a valid shard index: {e!r}") from None
            return [os.path.join(path, s) for s in shards]
    raise CheckpointError(f"{path}: no {' or '.join(HF_WEIGHTS + _HF_INDEXES)}")


class _HFTensors:
    """HF weights by name, read lazily from one file or several shards."""

    def __init__(self, files: list, stack: ExitStack):
        self.specs: Dict[str, Tuple[Tuple[int, ...], torch.dtype]] = {}
        self._get = {}
        for path in files:
            if path.endswith(".safetensors"):
                f = stack.enter_context(open_safetensors(path))
                for name, spec in tensor_specs(f, path).items():
                    self.specs[name] = spec
                    self._get[name] = (f, name, path)
            else:
                for name, t in _torch_load(path).items():
                    self.specs[name] = (tuple(t.shape), t.dtype)
                    self._get[name] = t

    def get(self, name: str) -> torch.Tensor:
        got = self._get[name]
        return got if isinstance(got, torch.Tensor) else _st_get(*got)


def _st_get(f, name: str, path: str) -> torch.Tensor:
    try:
        return f.get_tensor(name)
    except SafetensorError as e:
        raise CheckpointError(f"{path}: reading {name} failed: {e}") from None


def load_hf_gpt(path: Union[str, os.PathLike], quantize: bool = True) -> GPT:
    """Load HF-format CPM-1 (``GPT2LMHeadModel``: ``config.json`` + ``pytorch_model.bin`` or
    ``model.safetensors``) as our GPT, int8 by default. No pickle code runs (see ``_torch_load``).

    Block by block, so peak memory is the finished model plus one block of float weights; linears
    are quantized as they arrive, never held as a whole float model.

    >>> model = load_hf_gpt("CPM-Generate")                       # doctest: +SKIP
    """
    path = os.fspath(path)
    directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    config = read_hf_config(directory)
    with ExitStack() as stack:
        files = _hf_files(path)
        source = _HFTensors(files, stack)
        where = files[0] if len(files) == 1 else directory
        # map names and shapes on the meta device: no data is read for the strict check
        meta = {k: torch.empty(s, dtype=d, device="meta") for k, (s, d) in source.specs.items() if k != "lm_head.weight"}
        try:
            mapped = gpt_from_hf(meta, where)
        except (ValueError, RuntimeError) as e:
            raise CheckpointError(str(e) if where in str(e) else f"{where}: {e}") from None
        model = build_model("gpt", config, quantize)
        int8 = {name for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
        found = {}
        for name, t in mapped.items():
            layer = name.rpartition(".")[0]
            if layer in int8 and name.endswith(".weight"):
                found[name] = (tuple(t.shape), torch.int8)
                found[f"{layer}.scale"] = ((t.shape[0],), torch.float16)
            else:
                found[name] = (tuple(t.shape), t.dtype)
        dest = materialize_(model, found, where)

        groups: Dict[str, list] = {}
        for key in source.specs:
            m = re.match(r"^(?:transformer\.)?h\.(\d+)\.", key)
            groups.setdefault(m.group(1) if m else "top", []).append(key)
        for keys in groups.values():
            for name, value in gpt_from_hf({k: source.get(k) for k in keys}, where).items():
                layer = name.rpartition(".")[0]
                if layer in int8 and name.endswith(".weight"):
                    q, scale = quantize_weight(value)
                    copy_into(dest[name], q)
                    copy_into(dest[f"{layer}.scale"], scale)
                else:
                    copy_into(dest[name], value)
    return model.eval()


def save_hf_gpt(model: GPT, directory: Union[str, os.PathLike], dtype: torch.dtype = torch.float32) -> None:
    """Write ``model`` as HF ``GPT2LMHeadModel`` (``config.json`` + ``model.safetensors``).

    Int8 linears are dequantized (``weight * scale``) in ``dtype``; in float32 that is exact, and
    quantizing the result again gives back the same int8 weights and scales.

    >>> save_hf_gpt(model, "out/cpm1-hf")                         # doctest: +SKIP
    """
    directory = os.fspath(directory)
    if not isinstance(model, GPT):
        raise ValueError(f"HF export covers CPM-1 (GPT) only, not {type(model).__name__}")
    c = model.config
    if c.n_heads * c.d_head != c.d_model:
        raise ValueError(f"GPT-2 needs n_heads * d_head == d_model; got {c.n_heads} x {c.d_head} != {c.d_model}")
    state = dequantize_state_dict(model.state_dict(), dtype)
    hf = gpt_to_hf({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()})
    hf.pop("lm_head.weight")  # tied to wte: HF re-ties it on load, and safetensors refuses shared tensors
    hf = {k: v.detach().cpu().contiguous() for k, v in hf.items()}
    doc = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
           "n_positions": c.max_positions, "n_embd": c.d_model, "n_layer": c.n_layers, "n_head": c.n_heads,
           "n_inner": c.d_ff, "activation_function": "gelu_new", "layer_norm_epsilon": c.eps,
           "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "scale_attn_weights": True,
           "tie_word_embeddings": True, "dtype": str(dtype).replace("torch.", "")}
    os.makedirs(directory, exist_ok=True)
    write_atomic(os.path.join(directory, "model.safetensors"),
                 lambda tmp: save_file(hf, tmp, metadata={"format": "pt"}))

    def write_config(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
    write_atomic(os.path.join(directory, HF_CONFIG), write_config)
