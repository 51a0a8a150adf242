"""Checkpoint formats: BMInf's binary tree, ours (safetensors + config.json), HF CPM-1; the converter.

Every format must round-trip bit-exactly and refuse truncated or corrupt files with an error that
names the file. BMInf's format is also checked against an independent writer built from §5.2 of
the reference, and against the reference's byte totals for the released models.
"""
import builtins
import json
import os
import pickle
import re
import struct
import subprocess
import sys
import textwrap

import pytest
import torch

from bminf.cli import main
from bminf.checkpoint import (CheckpointError, bminf_format, detect_format, load_model, load_pretrained, save_model,
                              save_pretrained)
from bminf.checkpoint.common import build_model, preset_config
from bminf.models.gpt import GPTConfig
from bminf.quantization import QuantizedLinear, quantize_
from helpers import TINY_GPT, hf_gpt2, rel_err, tiny_gpt, tiny_t5


def int8_model(arch: str, seed: int = 0):
    """A tiny model as BMInf ships them: int8 linears, everything else float16."""
    return quantize_(tiny_gpt(seed) if arch == "gpt" else tiny_t5(seed)).half()


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def named(path, pattern: str) -> str:
    """A regex for an error message that starts by naming ``path``."""
    return re.escape(str(path)) + ": " + pattern


def flip(path, offset: int, value: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(value)


def cut(path, size: int, dst) -> str:
    with open(path, "rb") as f:
        data = f.read(size)
    with open(dst, "wb") as f:
        f.write(data)
    return str(dst)


# ------------------------------------------------------------------ BMInf's binary tree

def test_names_and_sizes_match_bminf_released_trees():
    # reference §3.1/§5.2: total bytes with int8 linears and fp16 elsewhere, and per-block bytes
    expected = {"cpm1": (2_679_040_000, [78_755_840]),
                "cpm2": (11_307_278_336, [193_036_288, 260_186_112]),
                "eva": (2_966_532_096, [48_283_648, 65_081_344])}
    for preset, (total, blocks) in expected.items():
        arch, cfg = preset_config(preset)
        model = build_model(arch, cfg, quantize=True)  # meta: no memory
        size = lambda m: sum(t.numel() * (1 if t.dtype == torch.int8 else 2) for t in m.state_dict().values())
        stacks = ["layers"] if arch == "gpt" else ["enc_layers", "dec_layers"]
        assert size(model) == total
        assert [size(getattr(model, s)[0]) for s in stacks] == blocks
    # the dotted paths of §5.2's trees
    keys = set(build_model("t5", preset_config("cpm2")[1], True).state_dict())
    for k in ["enc_layers.0.self_attn.project_q.weight", "enc_layers.0.self_attn.project_q.scale",
              "enc_layers.23.ff.linear_gated.scale", "dec_layers.0.ln_cross_attn.weight",
              "dec_layers.5.cross_attn.linear_out.weight", "ln_enc.weight", "ln_dec.weight",
              "input_embedding.weight", "output_embedding.weight", "position_bias_enc.weight",
              "position_bias_dec.weight"]:
        assert k in keys, k
    gpt = build_model("gpt", preset_config("cpm1")[1], True).state_dict()
    assert gpt["layers.31.ff.linear_in.weight"].shape == (10240, 2560)
    assert gpt["layers.0.self_attn.project_k.bias"].shape == (2560,)
    assert list(gpt)[:4] == ["token_embedding.weight", "position_embedding.weight", "layernorm.weight", "layernorm.bias"]


@pytest.mark.parametrize("arch", ["gpt", "t5"])
def test_bminf_roundtrip_is_bit_exact(tmp_path, arch):
    model = int8_model(arch)
    path = tmp_path / "a" / "checkpoint.pt"
    bminf_format.save(model, path)
    loaded = load_model(tmp_path / "a", config=model.config)
    assert_same_state(model, loaded)
    assert isinstance((loaded.layers[0] if arch == "gpt" else loaded.enc_layers[0]).ff.linear_in, QuantizedLinear)
    bminf_format.save(loaded, tmp_path / "b.pt")
    assert path.read_bytes() == (tmp_path / "b.pt").read_bytes()
    assert not [p for p in os.listdir(tmp_path / "a") if p != "checkpoint.pt"]  # no temp files left
    # into an existing fp32 CPU model: floats cast on the way in, int8 read straight
    target = quantize_(tiny_gpt(1) if arch == "gpt" else tiny_t5(1))
    bminf_format.load_into(target, path)
    for k, v in model.state_dict().items():
        assert torch.equal(target.state_dict()[k].to(v.dtype), v), k


def _pack_param(name: str, t: torch.Tensor) -> bytes:
    # written from §5.2 alone, independent of bminf_format's writer
    code = {torch.int8: 0, torch.float16: 1}[t.dtype]
    raw = t.contiguous().numpy().tobytes()
    return (struct.pack("<I", len(name)) + name.encode() + struct.pack("<B", t.dim())
            + b"".join(struct.pack("<I", d) for d in t.shape) + struct.pack("<I", len(raw))
            + struct.pack("<B", code) + raw)


def _pack_layer(tree: dict) -> bytes:
    params = [(k, v) for k, v in tree.items() if isinstance(v, torch.Tensor)]
    subs = [(k, v) for k, v in tree.items() if isinstance(v, dict)]
    out = struct.pack("<II", len(params), len(subs))
    out += b"".join(_pack_param(k, v) for k, v in params)
    for k, v in subs:
        out += struct.pack("<I", len(k)) + k.encode() + _pack_layer(v)
    return out


def test_hand_built_bminf_file_loads_to_its_tensors(tmp_path):
    cfg = GPTConfig(**TINY_GPT)
    g = torch.Generator().manual_seed(3)
    d, ff, v = cfg.d_model, cfg.d_ff, cfg.vocab_size
    h = lambda *s: torch.randn(*s, generator=g).half()
    q = lambda *s: torch.randint(-127, 128, s, generator=g, dtype=torch.int8)
    lin = lambda o, i: {"bias": h(o), "scale": h(o).abs(), "weight": q(o, i)}  # order differs from ours
    block = lambda: {"ff": {"linear_out": lin(d, ff), "linear_in": lin(ff, d)}, "ln_ff": {"weight": h(d), "bias": h(d)},
                     "self_attn": {p: lin(d, d) for p in ["linear_out", "project_v", "project_k", "project_q"]},
                     "ln_attn": {"bias": h(d), "weight": h(d)}}
    tree = {"layers": {str(i): block() for i in reversed(range(cfg.n_layers))},
            "layernorm": {"weight": h(d), "bias": h(d)}, "position_embedding": {"weight": h(cfg.max_positions, d)},
            "token_embedding": {"weight": h(v, d)}}
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(_pack_layer(tree))

    model = load_model(path, config=cfg)
    state = model.state_dict()

    def walk(node, prefix=""):
        for k, val in node.items():
            yield from walk(val, f"{prefix}{k}.") if isinstance(val, dict) else [(prefix + k, val)]
    expected = dict(walk(tree))
    assert set(state) == set(expected)
    for k, val in expected.items():
        assert state[k].dtype == val.dtype and torch.equal(state[k], val), k
    assert bminf_format.read_index(path)["token_embedding.weight"].shape == (v, d)


def test_bminf_config_comes_from_shapes_and_presets(tmp_path):
    model = int8_model("t5")
    path = tmp_path / "checkpoint.pt"
    bminf_format.save(model, path)
    arch, inferred = bminf_format.infer_config(bminf_format.read_index(path), str(path))
    assert arch == "t5" and inferred["n_heads"] == 4 and inferred["d_head"] == 8 and inferred["n_decoder_layers"] == 2
    with pytest.raises(CheckpointError, match=r"no single preset matches.*pass preset="):
        load_model(path)
    with pytest.raises(CheckpointError, match=r"preset 'eva'.*vocab_size: preset 'eva' has 30000, checkpoint has 101"):
        load_model(path, preset="eva")
    with pytest.raises(CheckpointError, match="preset 'cpm1' is gpt"):
        load_model(path, preset="cpm1")
    wrong = type(model.config)(**{**model.config.__dict__, "d_ff": 64})
    with pytest.raises(CheckpointError, match="does not match the given config: d_ff: given config has 64, checkpoint has 48"):
        load_model(path, config=wrong)


def test_bminf_strict_load_names_every_problem(tmp_path):
    model = int8_model("gpt")
    state = dict(model.state_dict())
    del state["layers.1.ln_ff.bias"]
    state["layers.0.ff.extra"] = torch.zeros(3, dtype=torch.float16)
    state["layers.2.self_attn.project_q.scale"] = torch.zeros(7, dtype=torch.float16)
    state["layers.0.ff.linear_out.weight"] = state["layers.0.ff.linear_out.weight"].half()
    path = tmp_path / "checkpoint.pt"
    bminf_format.save(state, path)
    with pytest.raises(CheckpointError) as e:
        bminf_format.load_into(int8_model("gpt"), path)
    msg = str(e.value)
    assert str(path) in msg
    assert "missing: layers.1.ln_ff.bias" in msg and "unexpected: layers.0.ff.extra" in msg
    assert "layers.2.self_attn.project_q.scale has shape (7,) in the checkpoint, (32,) in the model" in msg
    assert "layers.0.ff.linear_out.weight is torch.float16 in the checkpoint, torch.int8 in the model" in msg


def _bminf_file(tmp_path) -> str:
    path = tmp_path / "checkpoint.pt"
    bminf_format.save(int8_model("gpt"), path)
    return str(path)


def test_truncated_bminf_files_name_the_file(tmp_path):
    path = _bminf_file(tmp_path)
    index = bminf_format.read_index(path)
    first = index["token_embedding.weight"]
    size = os.path.getsize(path)
    # inside the root header, inside a name, inside a shape, inside data, the very last byte
    for n in [0, 3, 6, 10, first.offset - 8, first.offset + 5, size // 2, size - 1]:
        short = cut(path, n, tmp_path / f"cut{n}.pt")
        with pytest.raises(CheckpointError, match=named(short, ".*truncated")):
            load_model(short, config=GPTConfig(**TINY_GPT))


@pytest.mark.parametrize("damage, message", [
    ("dtype", "unknown dtype code 7"), ("nbytes", "which takes .* bytes, but claims"),
    ("count", "claims 0 parameters and 4294967295 sublayers"), ("name_len", "name length 4000000000"),
    ("utf8", "not valid utf-8"), ("trailing", "3 bytes follow the end of the layer tree"),
    ("zip", "zip archive"), ("ndim", "claims 200 dimensions")])
def test_corrupt_bminf_files_give_clear_errors(tmp_path, damage, message):
    path = _bminf_file(tmp_path)
    entry = bminf_format.read_index(path)["token_embedding.weight"]  # the first parameter in the file
    dtype_at, nbytes_at, ndim_at = entry.offset - 1, entry.offset - 5, entry.offset - 5 - 4 * 2 - 1
    edits = {"dtype": (dtype_at, b"\x07"), "nbytes": (nbytes_at, struct.pack("<I", 12)),
             "count": (4, struct.pack("<I", 0xFFFFFFFF)), "name_len": (8, struct.pack("<I", 4_000_000_000)),
             "utf8": (12, b"\xff\xfe"), "zip": (0, b"PK\x03\x04"), "ndim": (ndim_at, b"\xc8")}
    if damage == "trailing":
        with open(path, "ab") as f:
            f.write(b"xyz")
    else:
        flip(path, *edits[damage])
    with pytest.raises(CheckpointError, match=message) as e:
        load_model(path, config=GPTConfig(**TINY_GPT))
    assert path in str(e.value)


def test_failed_bminf_write_leaves_old_file_and_no_temp(tmp_path):
    path = _bminf_file(tmp_path)
    before = open(path, "rb").read()
    state = {"a.weight": torch.zeros(4, dtype=torch.int8), "b.weight": torch.zeros(4, dtype=torch.bfloat16)}
    with pytest.raises(ValueError, match="bfloat16 is not int8, float16 or float32"):
        bminf_format.save(state, path)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and Linux's ru_maxrss units")
def test_bminf_loading_reads_straight_into_place(tmp_path):
    # ~140 MB of weights; a loader that reads into a buffer and then copies would peak near 2x
    cfg = dict(vocab_size=16384, max_positions=512, d_model=1024, d_ff=4096, n_heads=16, d_head=64, n_layers=8)
    model = build_model("gpt", GPTConfig(**cfg), quantize=True).to_empty(device="cpu").half()
    path = tmp_path / "checkpoint.pt"
    bminf_format.save(model, path)
    size = os.path.getsize(path)
    del model
    script = textwrap.dedent(f"""
        import os, resource
        from bminf.checkpoint import load_model
        from bminf.checkpoint.common import build_model
        from bminf.models.gpt import GPTConfig
        # first use of the meta device imports torch's meta kernels (~75 MB): not the loader's cost
        build_model("gpt", GPTConfig(vocab_size=8, max_positions=8, d_model=8, d_ff=8, n_heads=2, d_head=4,
                                     n_layers=1), quantize=True)
        before = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")  # resident now
        try:  # reset the peak (VmHWM) to the current resident size, so earlier peaks do not count
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        model = load_model({str(path)!r}, config=GPTConfig(**{cfg!r}))
        status = dict(line.split(":", 1) for line in open("/proc/self/status"))
        peak = int(status["VmHWM"].split()[0]) * 1024  # peak resident since the reset, in bytes
        print(peak - before)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(__file__)),
                                                         os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    growth = int(out.stdout.split()[-1])
    assert growth > 0.9 * size          # the weights really became resident...
    assert growth < 1.5 * size, (growth, size)  # ...once: bound 1.5x, a double-buffering loader is ~2x


# ------------------------------------------------------------------ ours: safetensors + config.json

@pytest.mark.parametrize("arch, quantized", [("gpt", True), ("t5", True), ("gpt", False), ("t5", False)])
def test_safetensors_roundtrip_is_bit_exact(tmp_path, arch, quantized):
    model = int8_model(arch) if quantized else (tiny_gpt() if arch == "gpt" else tiny_t5())
    save_pretrained(model, tmp_path / "m")
    doc = json.loads((tmp_path / "m" / "config.json").read_text())
    assert doc["format"] == "bminf" and doc["format_version"] == 1 and doc["architecture"] == arch
    assert doc["quantization"] == ("int8-rowwise-absmax" if quantized else None)
    assert doc["config"] == model.config.__dict__
    loaded = load_model(tmp_path / "m")
    assert_same_state(model, loaded)
    assert loaded.config == model.config
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "model.safetensors"]


def test_safetensors_without_config_uses_the_preset(tmp_path):
    model = int8_model("gpt")
    save_pretrained(model, tmp_path / "m")
    os.remove(tmp_path / "m" / "config.json")
    with pytest.raises(CheckpointError, match="no config.json; pass a preset"):
        load_pretrained(tmp_path / "m")
    with pytest.raises(CheckpointError, match=r"model.safetensors: does not fit the GPT model: .*layernorm.weight has shape \(32,\) in the checkpoint, \(2560,\) in the model"):
        load_pretrained(tmp_path / "m", preset="cpm1")  # the preset's shapes are checked against the file


def test_safetensors_config_errors(tmp_path):
    model = int8_model("t5")
    save_pretrained(model, tmp_path / "m")
    cfg_path = tmp_path / "m" / "config.json"
    good = json.loads(cfg_path.read_text())
    with pytest.raises(CheckpointError, match=r"preset 'eva'.*n_heads: preset 'eva' has 32, checkpoint has 4"):
        load_model(tmp_path / "m", preset="eva")
    for doc, message in [({**good, "format_version": 2}, "format_version 2"),
                         ({**good, "quantization": "int4"}, "unknown quantization 'int4'"),
                         ({**good, "config": {**good["config"], "n_experts": 8}}, r"unknown fields \['n_experts'\]"),
                         ({**good, "architecture": "bert"}, "architecture 'bert'"),
                         ({**good, "config": {**good["config"], "n_decoder_layers": -1}},
                          named(cfg_path, r"invalid t5 config: T5Config\.n_decoder_layers must be >= 1")),
                         ({**good, "config": {**good["config"], "num_buckets": 7}}, "num_buckets must be even")]:
        cfg_path.write_text(json.dumps(doc))
        with pytest.raises(CheckpointError, match=message):
            load_model(tmp_path / "m")
    # files written before T5Config gained max_length load with its default
    cfg_path.write_text(json.dumps({**good, "config": {k: v for k, v in good["config"].items() if k != "max_length"}}))
    assert load_model(tmp_path / "m").config.max_length == 2048
    cfg_path.write_text('{"format": "bminf", ')
    with pytest.raises(CheckpointError, match=named(cfg_path, "not valid JSON")):
        load_model(tmp_path / "m")
    cfg_path.write_text(json.dumps({**good, "quantization": None}))  # says float, the file holds int8
    with pytest.raises(CheckpointError, match="unexpected: .*scale.*is torch.int8 in the checkpoint, torch.float32 in the model"):
        load_model(tmp_path / "m")


def test_truncated_and_corrupt_safetensors_name_the_file(tmp_path):
    save_pretrained(int8_model("gpt"), tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    data = weights.read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0]
    for n in [0, 5, 100, 8 + header_len + 10, len(data) - 1]:
        (tmp_path / "m" / "model.safetensors").write_bytes(data[:n])
        with pytest.raises(CheckpointError, match=named(weights, "not a readable safetensors file")):
            load_model(tmp_path / "m")
    for offset, value in [(0, b"\xff\xff\xff\xff\xff\xff\x00\x00"), (8, b"["), (30, b"\xfe")]:
        broken = bytearray(data)
        broken[offset:offset + len(value)] = value
        weights.write_bytes(bytes(broken))
        with pytest.raises(CheckpointError, match=named(weights, "not a readable safetensors file")):
            load_model(tmp_path / "m")


# ------------------------------------------------------------------ HF CPM-1 (GPT2LMHeadModel)

def _hf_dirs(tmp_path):
    model = tiny_gpt(seed=5)
    hf = hf_gpt2(model)
    hf.save_pretrained(tmp_path / "st")
    # transformers 5 writes safetensors only; this is what save_pretrained(safe_serialization=False)
    # wrote in the 4.x line that published CPM-Generate: config.json + torch.save(state_dict)
    hf.config.save_pretrained(tmp_path / "bin")
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    # and torch's pre-1.6 (non-zip) serialization, which cannot be memory-mapped
    hf.config.save_pretrained(tmp_path / "legacy")
    torch.save(hf.state_dict(), tmp_path / "legacy" / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    return model, hf


def test_hf_cpm1_loads_equal_to_hf(tmp_path):
    model, hf = _hf_dirs(tmp_path)
    x = torch.randint(0, TINY_GPT["vocab_size"], (2, 11))
    with torch.no_grad():
        ref = hf(x).logits
        for sub in ["st", "bin", "legacy"]:
            assert detect_format(tmp_path / sub)[0] == "hf"
            ours = load_model(tmp_path / sub, quantize=False)
            assert rel_err(ours(x), ref) < 1e-4
            assert_same_state(ours, model)
            int8 = load_model(tmp_path / sub)  # quantized on load by default
            assert_same_state(int8, quantize_(tiny_gpt(seed=5)))
    assert detect_format(tmp_path / "bin" / "pytorch_model.bin") == ("hf", str(tmp_path / "bin" / "pytorch_model.bin"))


def test_hf_pickle_with_code_is_refused_without_running_it(tmp_path):
    _hf_dirs(tmp_path)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return builtins.open, (str(marker), "w")  # would create the file if unpickled

    state = torch.load(tmp_path / "bin" / "pytorch_model.bin", weights_only=True)
    torch.save({**state, "payload": Payload()}, tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: refused: it pickles objects other than tensors"):
        load_model(tmp_path / "bin")
    assert not marker.exists()
    assert pickle.dumps(Payload())  # the payload is a real, working pickle


def test_hf_truncated_and_corrupt_files_name_the_file(tmp_path):
    _hf_dirs(tmp_path)
    path = tmp_path / "bin" / "pytorch_model.bin"
    data = path.read_bytes()
    for n in [0, 1, 100, len(data) // 2, len(data) - 30]:
        path.write_bytes(data[:n])
        with pytest.raises(CheckpointError, match=named(path, "")):
            load_model(tmp_path / "bin")
    broken = bytearray(data)
    broken[len(data) // 2] ^= 0xFF  # inside a tensor's bytes: only the zip CRC can tell
    path.write_bytes(bytes(broken))
    with pytest.raises(CheckpointError, match=named(path, "corrupt: checksum mismatch")):
        load_model(tmp_path / "bin")
    st = tmp_path / "st" / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match=named(st, "not a readable safetensors file")):
        load_model(tmp_path / "st")


def test_hf_config_and_keys_are_checked(tmp_path):
    _hf_dirs(tmp_path)
    cfg_path = tmp_path / "st" / "config.json"
    good = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**good, "activation_function": "relu"}))
    with pytest.raises(CheckpointError, match="activation_function 'relu'"):
        load_model(tmp_path / "st")
    cfg_path.write_text(json.dumps({**good, "n_layer": -2}))
    with pytest.raises(CheckpointError, match=r"config\.json: invalid GPT-2 config: GPTConfig\.n_layers must be >= 1"):
        load_model(tmp_path / "st")
    cfg_path.write_text(json.dumps({**good, "n_layer": 4}))
    with pytest.raises(CheckpointError, match="missing: layers.3.ff.linear_in.bias"):
        load_model(tmp_path / "st")
    cfg_path.write_text(json.dumps(good))
    with pytest.raises(CheckpointError, match="vocab_size: preset 'cpm1' has 30000, checkpoint has 97"):
        load_model(tmp_path / "st", preset="cpm1")


def test_hf_export_of_int8_requantizes_to_the_same_int8(tmp_path):
    model = int8_model("gpt")
    save_model(model, tmp_path / "hf", format="hf")
    from transformers import GPT2LMHeadModel
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, TINY_GPT["vocab_size"], (1, 9))
    with torch.no_grad():
        assert rel_err(hf(x).logits, load_model(tmp_path / "hf", quantize=False)(x)) < 1e-4
    back = load_model(tmp_path / "hf", dtype=torch.float16)
    assert_same_state(back, model)  # dequantized in fp32, quantized again: bit-exact
    with pytest.raises(ValueError, match="HF export covers CPM-1"):
        save_model(int8_model("t5"), tmp_path / "t5hf", format="hf")


# ------------------------------------------------------------------ detection, dtype, converter

def test_load_model_detection_and_dtype(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope"))):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="looked for checkpoint.pt .*model.safetensors .*pytorch_model.bin"):
        load_model(tmp_path / "empty")
    save_pretrained(int8_model("t5"), tmp_path / "m")
    os.link(tmp_path / "m" / "model.safetensors", tmp_path / "renamed.pt")
    with pytest.raises(CheckpointError, match="looks like a safetensors file"):
        load_model(tmp_path / "renamed.pt")
    m = load_model(tmp_path / "m", dtype=torch.float32)
    assert m.input_embedding.weight.dtype == torch.float32
    assert m.enc_layers[0].ff.linear_in.weight.dtype == torch.int8
    assert m.enc_layers[0].ff.linear_in.scale.dtype == torch.float16
    f = load_model(tmp_path / "m", quantize=False, dtype=torch.float32)
    assert type(f.enc_layers[0].ff.linear_in) is torch.nn.Linear
    x, y = torch.tensor([[3, 4, 5]]), torch.tensor([[1, 2]])
    with torch.no_grad():
        assert torch.allclose(f(x, decoder_input_ids=y), m(x, decoder_input_ids=y), atol=1e-5)


def test_load_and_save_take_dtype_names(tmp_path):
    save_pretrained(int8_model("gpt"), tmp_path / "m")
    for name, dtype in [("float16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)]:
        m = load_model(tmp_path / "m", dtype=name)
        assert m.token_embedding.weight.dtype == dtype and m.layers[0].ff.linear_in.scale.dtype == torch.float16
    with pytest.raises(ValueError, match=r"dtype='int8' is not a dtype; use one of float16"):
        load_model(tmp_path / "m", dtype="int8")
    with pytest.raises(TypeError, match="dtype must be a torch.dtype or its name, got int 16"):
        load_model(tmp_path / "m", dtype=16)
    with pytest.raises(TypeError, match="quantize must be None, True or False, got str 'yes'"):
        load_model(tmp_path / "m", quantize="yes")
    out = save_model(load_model(tmp_path / "m"), tmp_path / "hf", format="hf", dtype="float16")
    assert load_model(out, quantize=False).token_embedding.weight.dtype == torch.float16
    with pytest.raises(ValueError, match="unknown format 'onnx'"):
        save_model(load_model(tmp_path / "m"), tmp_path / "x", format="onnx")
    assert not (tmp_path / "x").exists()


def test_convert_cli_round_trips_every_format(tmp_path, capsys):
    model = int8_model("gpt")
    src = tmp_path / "orig" / "checkpoint.pt"
    bminf_format.save(model, src)
    # BMInf files carry no config: --preset only for released sizes, so the tiny config goes via ours
    save_pretrained(model, tmp_path / "ours")
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    out = capsys.readouterr().out
    assert "lossy relative to the original float model" in out and "-> " in out.splitlines()[-1]
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "ours2")]) == 0
    assert "quantized the float linears to int8" in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "ours2"), str(tmp_path / "back.pt")]) == 0
    # BMInf -> ours -> HF (fp32) -> ours (int8) -> BMInf gives back the very same bytes
    assert (tmp_path / "back.pt").read_bytes() == src.read_bytes()
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "float"), "--no-quantize"]) == 0
    assert json.loads((tmp_path / "float" / "config.json").read_text())["quantization"] is None
    assert main(["convert", str(tmp_path / "float"), str(tmp_path / "b2"), "--to", "bminf"]) == 0
    out = capsys.readouterr().out
    assert "quantized the float linears to int8: BMInf's format" in out and "cast float tensors to float16" in out
    assert (tmp_path / "b2" / "checkpoint.pt").read_bytes() == src.read_bytes()

    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "x.pt"), "--no-quantize"]) == 1
    assert "--no-quantize cannot be honoured" in capsys.readouterr().err
    assert main(["convert", str(src), str(tmp_path / "y"), "--preset", "cpm1"]) == 1
    assert "does not match the preset 'cpm1'" in capsys.readouterr().err
    save_pretrained(int8_model("t5"), tmp_path / "t5")
    assert main(["convert", str(tmp_path / "t5"), str(tmp_path / "t5hf"), "--to", "hf"]) == 1
    assert "HF export covers CPM-1" in capsys.readouterr().err
