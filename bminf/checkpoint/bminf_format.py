"""BMInf 1.x's binary ``checkpoint.pt`` (cpm1-new, cpm2.1-new, eva-int8-new): read and write.

The file is the model's layer tree, depth first, little-endian::

    Layer := u32 n_params, u32 n_sublayers, n_params x (Str name, Param), n_sublayers x (Str name, Layer)
    Str   := u32 byte_len, utf-8 bytes
    Param := u8 ndim, ndim x u32 dims, u32 nbytes, u8 dtype, nbytes raw bytes (C order)
    dtype := 0 int8, 1 float16, 2 float32 (BMInf 0.0.x only)

A parameter's path in the tree is its name in our models' state dicts (``layers.3.ff.linear_in.bias``).
The file carries no config and no quantization metadata: shapes give most of the config, a preset
the rest, and a Linear is int8 exactly where the tree holds its ``scale``.

>>> index = read_index("checkpoint.pt")                       # doctest: +SKIP
>>> index["token_embedding.weight"].shape                     # doctest: +SKIP
(30000, 2560)
>>> model = load("checkpoint.pt")                             # doctest: +SKIP  (cpm1-new, int8)
>>> save(model, "/tmp/copy/checkpoint.pt")                    # doctest: +SKIP
"""
import math
import os
import re
import struct
import sys
from typing import Dict, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn as nn
from tqdm import tqdm

from .common import CheckpointError, build_model, copy_into, materialize_, resolve_config, write_atomic

__all__ = ["Entry", "read_index", "load_into", "load", "save", "infer_config"]

PROGRESS_BYTES = 1 << 30  # files this large show a progress bar while loading (on a terminal)
_DTYPES = {0: torch.int8, 1: torch.float16, 2: torch.float32}
_CODES = {dtype: code for code, dtype in _DTYPES.items()}
# limits far above anything BMInf wrote; a corrupt count or length fails here instead of allocating
_MAX_NAME = 1024
_MAX_NDIM = 8
_MAX_DEPTH = 32
_MIN_PARAM = 4 + 1 + 4 + 1  # empty name, ndim 0, nbytes, dtype
_MIN_LAYER = 4 + 4 + 4      # empty name, n_params, n_sublayers


class Entry(NamedTuple):
    offset: int              # where the raw bytes start
    shape: Tuple[int, ...]
    dtype: torch.dtype
    nbytes: int


def _check_byteorder() -> None:
    # the format is little-endian and we copy raw bytes into tensors
    if sys.byteorder != "little":
        raise NotImplementedError("BMInf checkpoints are little-endian; this machine is big-endian")


class _Parser:
    """Walks the headers of an open file, seeking over the data, and records an ``Entry`` per parameter."""

    def __init__(self, f, path: str):
        self.f, self.path = f, path
        self.size = os.fstat(f.fileno()).st_size
        self.entries: Dict[str, Entry] = {}

    def fail(self, problem: str):
        raise CheckpointError(f"{self.path}: not a valid BMInf checkpoint: {problem}")

    def take(self, n: int, what: str) -> bytes:
        pos = self.f.tell()
        data = self.f.read(n)
        if len(data) < n:
            self.fail(f"truncated: {what} at byte {pos} needs {n} bytes, but the file ends at byte {self.size}")
        return data

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    def name(self, where: str) -> str:
        pos = self.f.tell()
        n = self.u32(f"the length of a name in {where}")
        if n == 0 or n > _MAX_NAME:
            self.fail(f"name length {n} at byte {pos} in {where} is not in 1..{_MAX_NAME}")
        raw = self.take(n, f"a name in {where}")
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"name at byte {pos + 4} in {where} is not valid utf-8: {raw[:40]!r}")
        if "." in name:
            self.fail(f"name {name!r} at byte {pos + 4} in {where} contains '.', which no layer name has")
        return name

    def param(self, path: str) -> None:
        ndim = self.take(1, f"the ndim of {path}")[0]
        if ndim > _MAX_NDIM:
            self.fail(f"{path} claims {ndim} dimensions (at most {_MAX_NDIM})")
        shape = struct.unpack(f"<{ndim}I", self.take(4 * ndim, f"the shape of {path}"))
        nbytes = self.u32(f"the byte count of {path}")
        code = self.take(1, f"the dtype of {path}")[0]
        if code not in _DTYPES:
            self.fail(f"{path} has unknown dtype code {code} (known: 0 int8, 1 float16, 2 float32)")
        dtype = _DTYPES[code]
        need = math.prod(shape) * dtype.itemsize
        if nbytes != need:
            self.fail(f"{path} is {dtype} of shape {shape}, which takes {need} bytes, but claims {nbytes}")
        offset = self.f.tell()
        if offset + nbytes > self.size:
            self.fail(f"truncated: the data of {path} runs from byte {offset} to {offset + nbytes}, "
                      f"but the file ends at byte {self.size}")
        self.entries[path] = Entry(offset, tuple(shape), dtype, nbytes)
        self.f.seek(nbytes, os.SEEK_CUR)

    def layer(self, prefix: str, depth: int) -> None:
        where = f"layer {prefix!r}" if prefix else "the root layer"
        if depth > _MAX_DEPTH:
            self.fail(f"{where} is nested {depth} deep (at most {_MAX_DEPTH})")
        n_params = self.u32(f"the parameter count of {where}")
        n_sub = self.u32(f"the sublayer count of {where}")
        left = self.size - self.f.tell()
        if n_params * _MIN_PARAM + n_sub * _MIN_LAYER > left:
            self.fail(f"{where} claims {n_params} parameters and {n_sub} sublayers, "
                      f"more than the {left} bytes left can hold (truncated or corrupt)")
        seen = set()
        for _ in range(n_params):
            name = self.name(where)
            if name in seen:
                self.fail(f"{where} holds {name!r} twice")
            seen.add(name)
            self.param(prefix + name)
        for _ in range(n_sub):
            name = self.name(where)
            if name in seen:
                self.fail(f"{where} holds {name!r} twice")
            seen.add(name)
            self.layer(prefix + name + ".", depth + 1)


def read_index(path: Union[str, os.PathLike]) -> Dict[str, Entry]:
    """Parse the headers of a BMInf checkpoint without reading its data.

    Returns ``{dotted name: Entry(offset, shape, dtype, nbytes)}`` in file order. Any truncation,
    absurd count or length, unknown dtype code, byte count that disagrees with the shape, data past
    the end of the file, bad utf-8 or trailing garbage raises ``CheckpointError`` naming the file.

    >>> read_index("checkpoint.pt")["enc_layers.0.self_attn.project_q.weight"]   # doctest: +SKIP
    Entry(offset=1234, shape=(4096, 4096), dtype=torch.int8, nbytes=16777216)
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        parser = _Parser(f, path)
        head = f.read(9)
        f.seek(0)
        if head.startswith(b"PK"):
            parser.fail("it is a zip archive (a torch.save file such as pytorch_model.bin?)")
        if head[8:9] == b"{":
            parser.fail("it looks like a safetensors file (a JSON header after an 8-byte length)")
        parser.layer("", 0)
        end = f.tell()
    if end != parser.size:
        parser.fail(f"{parser.size - end} bytes follow the end of the layer tree at byte {end}")
    return parser.entries


def _readinto(f, tensor: torch.Tensor, entry: Entry, path: str, name: str) -> None:
    # a uint8 view of the tensor's own storage: the OS copies the file's bytes straight into it
    view = memoryview(tensor.detach().reshape(-1).view(torch.uint8).numpy())
    f.seek(entry.offset)
    done = 0
    while done < entry.nbytes:
        n = f.readinto(view[done:])
        if not n:
            raise CheckpointError(f"{path}: the file ended while reading {name} (changed since it was indexed?)")
        done += n


def load_into(model: nn.Module, path: Union[str, os.PathLike], index: Optional[Dict[str, Entry]] = None) -> nn.Module:
    """Fill ``model`` from a BMInf checkpoint, strictly: missing, unexpected, mis-shaped and mis-typed
    parameters are named in the error. Each tensor is read straight into the model's storage; tensors
    still on the meta device are first allocated on the CPU with the file's dtype.

    >>> with torch.device("meta"):                                # doctest: +SKIP
    ...     model = quantize_(GPT(GPTConfig(**GPT_PRESETS["cpm1"])))
    >>> load_into(model, "cpm1-new/checkpoint.pt")                # doctest: +SKIP
    """
    _check_byteorder()
    path = os.fspath(path)
    index = read_index(path) if index is None else index
    dest = materialize_(model, {k: (e.shape, e.dtype) for k, e in index.items()}, path)
    entries = sorted(index.items(), key=lambda kv: kv[1].offset)
    total = sum(e.nbytes for _, e in entries)
    # a bar only where loading takes a while (the released files are 2.7-11.3 GB), and only on a terminal
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"Loading {os.path.basename(os.path.dirname(path))}",
               disable=None if total >= PROGRESS_BYTES else True, leave=False)
    # unbuffered, so large reads go from the page cache into the tensor with no copy in between
    with open(path, "rb", buffering=0) as f, bar:
        for name, entry in entries:
            target = dest[name]
            direct = target.dtype == entry.dtype and target.device.type == "cpu" and target.is_contiguous()
            buf = target if direct else torch.empty(entry.shape, dtype=entry.dtype)
            _readinto(f, buf, entry, path, name)
            if not direct:
                copy_into(target, buf)  # a model already on another device or dtype: one tensor at a time
            bar.update(entry.nbytes)
    return model


def infer_config(index: Dict[str, Entry], path: str) -> Tuple[str, dict]:
    """``(architecture, fields)``: the config fields the tree's shapes determine.

    CPM-1's head count is not among them (2560 = 32 x 80 = 40 x 64 ...), nor are norm epsilons
    and T5's max_distance; those come from a preset or an explicit config.
    """
    def shape(name: str) -> Tuple[int, ...]:
        if name not in index:
            raise CheckpointError(f"{path}: cannot tell the model's shape: the tree has no {name!r}")
        return index[name].shape

    def count(prefix: str) -> int:
        return len({m.group(1) for k in index for m in [re.match(re.escape(prefix) + r"\.(\d+)\.", k)] if m})

    if "token_embedding.weight" in index:
        vocab, d_model = shape("token_embedding.weight")
        return "gpt", dict(vocab_size=vocab, d_model=d_model,
                           max_positions=shape("position_embedding.weight")[0],
                           d_ff=shape("layers.0.ff.linear_in.weight")[0], n_layers=count("layers"))
    if "input_embedding.weight" in index:
        vocab, d_model = shape("input_embedding.weight")
        heads, buckets = shape("position_bias_enc.weight")
        inner = shape("enc_layers.0.self_attn.project_q.weight")[0]
        if heads == 0 or inner % heads:
            raise CheckpointError(f"{path}: {inner} attention features do not split into {heads} heads")
        return "t5", dict(vocab_size=vocab, d_model=d_model, d_ff=shape("enc_layers.0.ff.linear_in.weight")[0],
                          n_heads=heads, d_head=inner // heads, num_buckets=buckets,
                          n_encoder_layers=count("enc_layers"), n_decoder_layers=count("dec_layers"))
    raise CheckpointError(f"{path}: neither a GPT tree (token_embedding) nor a T5 tree (input_embedding); "
                          "BMInf 0.0.x trees (cpm1, cpm2.1, eva-int8) are not supported, use the -new versions")


def load(path: Union[str, os.PathLike], preset: Optional[str] = None, config=None) -> nn.Module:
    """Build the model a BMInf checkpoint holds and read it in, with peak memory about the file's size.

    The config comes from the shapes plus ``config``, ``preset`` (``"cpm1"``, ``"cpm2"``, ``"eva"``
    or BMInf's version names) or the one preset the shapes match; a disagreement names the field.

    >>> model = load("~/.cache/bigmodels/cpm2.1-new/checkpoint.pt")   # doctest: +SKIP
    """
    path = os.fspath(path)
    index = read_index(path)
    arch, inferred = infer_config(index, path)
    config = resolve_config(arch, inferred, path, preset, config)
    # the tree records quantization structurally: a Linear is int8 where its scale is stored
    model = build_model(arch, config, quantize=lambda name, _: f"{name}.scale" in index)
    return load_into(model, path, index).eval()


def _tree(state: Dict[str, torch.Tensor]) -> dict:
    root: dict = {"params": {}, "subs": {}}
    for key, tensor in state.items():
        *layers, leaf = key.split(".")
        if not all(key.split(".")):
            raise ValueError(f"cannot write {key!r}: empty path component")
        node = root
        for part in layers:
            if part in node["params"]:
                raise ValueError(f"cannot write {key!r}: {part!r} is both a parameter and a layer")
            node = node["subs"].setdefault(part, {"params": {}, "subs": {}})
        if leaf in node["subs"] or leaf in node["params"]:
            raise ValueError(f"cannot write {key!r}: the name is both a parameter and a layer")
        node["params"][leaf] = tensor
    return root


def _str(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<I", len(raw)) + raw


def _write_layer(f, node: dict, prefix: str) -> None:
    f.write(struct.pack("<II", len(node["params"]), len(node["subs"])))
    for name, t in node["params"].items():
        if t.dtype not in _CODES:
            raise ValueError(f"cannot write {prefix + name}: {t.dtype} is not int8, float16 or float32")
        t = t.detach().cpu().contiguous()
        nbytes = t.numel() * t.element_size()
        if nbytes >= 2 ** 32 or any(d >= 2 ** 32 for d in t.shape):
            raise ValueError(f"cannot write {prefix + name}: {nbytes} bytes exceed the format's u32 fields")
        f.write(_str(name) + struct.pack(f"<B{t.dim()}IIB", t.dim(), *t.shape, nbytes, _CODES[t.dtype]))
        f.write(t.reshape(-1).view(torch.uint8).numpy().data)
    for name, sub in node["subs"].items():
        f.write(_str(name))
        _write_layer(f, sub, prefix + name + ".")


def save(model_or_state: Union[nn.Module, Dict[str, torch.Tensor]], path: Union[str, os.PathLike]) -> None:
    """Write a BMInf checkpoint, in state-dict order, to a temporary file renamed into place only
    when complete, so a failed write never leaves a half-written ``checkpoint.pt``.

    BMInf 1.x reads it when linears are int8 (``quantize_``) and other tensors float16; float32 is
    written as dtype 2, which only 0.0.x and bminf read.

    >>> save(quantize_(model).half(), "cpm1-new/checkpoint.pt")   # doctest: +SKIP
    """
    _check_byteorder()
    path = os.fspath(path)
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    tree = _tree(state)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            _write_layer(f, tree, "")
    write_atomic(path, write)
