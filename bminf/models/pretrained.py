"""What CPM1, CPM2 and EVA share: finding the files of a version, loading the backbone and its
tokenizer, placing it on a device within a memory budget, and running the generation loop.

>>> cpm2 = CPM2(version="cpm2-demo")                         # doctest: +SKIP  (a subclass)
>>> cpm2.device, cpm2.dtype                                  # doctest: +SKIP
(device(type='cpu'), torch.float32)
"""
import os
import sys
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..generation import GPTRunner, SamplingParams, T5Runner, decode
from ..kernels import compile_ahead
from ..units import parse_dtype, parse_size

__all__ = ["Pretrained", "EncoderDecoder", "Prepared", "InputTooLongError", "resolve_version", "available_version"]


class InputTooLongError(ValueError):
    """An input longer than the model takes where it cannot be cut; the message names it and the limit."""


@dataclass
class Prepared:
    """One input formatted for the decode loop by a model's ``prepare_*`` method: the task methods and
    the server (``bminf.serving``) build their work from these, so each task's format lives in one place.

    ``source``: the GPT prompt or the T5 encoder input; ``prefix``: the T5 decoder's start ids (None
    for GPT); ``new_row()``: a fresh row (``TextRow``/``BlankRow``) for one run; ``no_penalty`` ids are
    never counted for the penalties, ``filtered`` ids never sampled; ``positions``: fill_blank's blanks.
    """
    source: List[int]
    prefix: Optional[List[int]]
    new_row: Callable[[], object]
    no_penalty: List[int]
    filtered: List[int]
    positions: Optional[List[int]] = None


def _demo_versions() -> dict:
    from .. import demo
    return {v: demo.path(v) for v in demo.DEMO_VERSIONS.values()}


def resolve_version(model_key: str, version: Optional[str]) -> str:
    """The directory holding ``version``'s files, downloading a released version if needed.

    ``version``: None (the latest release of the model), a released name (``cpm2.1-new``), a demo
    that ships with bminf (``cpm2-demo``), ``file://DIR`` or a plain directory.
    """
    from .. import hub

    latest = hub.LATEST[model_key]
    if version is None:
        version = latest
    if not isinstance(version, (str, os.PathLike)):
        raise TypeError(f"version must be a version name or a directory, got {type(version).__name__} {version!r}")
    version = os.fspath(version)
    demos = _demo_versions()
    if version in demos:
        return demos[version]
    if version.startswith("file://"):
        directory = os.path.expanduser(version[len("file://"):])
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"version {version!r}: {directory} is not a directory")
        return directory
    if os.path.isdir(os.path.expanduser(version)):
        return os.path.expanduser(version)
    if version == latest:
        return hub.ensure_version(version)
    known = [latest] + [v for v in demos if v.startswith(model_key)]
    others = [v for v in hub.LATEST.values() if v != latest]
    hint = f" ({version} belongs to another model)" if version in others else ""
    raise ValueError(f"version {version!r} is not one this model runs{hint}; use one of {', '.join(known)}, "
                     "file://DIR or a directory holding checkpoint.pt and vocab.txt")


def available_version(model_key: str) -> Tuple[str, str]:
    """``(version, note)``: the model's released version when it is cached or can be downloaded now,
    else the small demo that ships with bminf, with a one-line ``note`` saying so (for demos and the CLI;
    the model classes themselves never swap in a demo).

    >>> available_version("cpm2")                                # doctest: +SKIP
    ('cpm2-demo', 'cpm2.1-new is not cached and cannot be downloaded here, so this runs cpm2-demo, ...')
    """
    from .. import demo, hub

    latest = hub.LATEST[model_key]
    try:
        hub.ensure_version(latest)
        return latest, ""
    except OSError:  # NotCachedError, DownloadError: offline, unreachable, or a failed download
        fallback = demo.DEMO_VERSIONS[model_key]
        return fallback, (f"{latest} is not cached and cannot be downloaded here, so this runs {fallback}, the small "
                          f"demo checkpoint that ships with bminf (bminf download {latest} fetches the real one)")


def _device(device_idx: Optional[int], device) -> torch.device:
    if device_idx is not None:
        if isinstance(device_idx, bool) or not isinstance(device_idx, int) or device_idx < 0:
            raise TypeError(f"device_idx must be a CUDA device index (int >= 0), got {device_idx!r}")
        if device is not None and torch.device(device) != torch.device("cuda", device_idx):
            raise ValueError(f"device_idx={device_idx} and device={device!r} disagree; pass one of them")
        device = torch.device("cuda", device_idx)
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a device such as 'cpu', 'cuda' or 'cuda:1'") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r}, but CUDA is not available here; use device='cpu'")
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ValueError(f"device={str(device)!r}, but there are {torch.cuda.device_count()} CUDA devices")
        device = torch.device("cuda", index)
    return device


def check_text(name: str, value) -> str:
    """``value`` if it is a non-empty str, else a TypeError/ValueError naming ``name``."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{name} is empty")
    return value


def check_stop_strings(stop_tokens) -> List[str]:
    """``stop_tokens`` as a list of non-empty strings (None: none; one string: that one)."""
    if stop_tokens is None:
        return []
    if isinstance(stop_tokens, str):
        stop_tokens = [stop_tokens]
    if not isinstance(stop_tokens, (list, tuple)):
        raise TypeError(f"stop_tokens must be a list of strings, got {type(stop_tokens).__name__}")
    for i, s in enumerate(stop_tokens):
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop_tokens[{i}] must be a non-empty string, got {s!r}")
    return list(stop_tokens)


def as_batch(name: str, value, is_one: Callable[[object], bool]) -> tuple:
    """``(inputs, single)``: ``[value], True`` for one input, ``list(value), False`` for a list of them."""
    if is_one(value) or not isinstance(value, (list, tuple)):
        return [value], True
    if not value:
        raise ValueError(f"{name} is an empty list; pass one input or a list of them")
    return list(value), False


class Pretrained(nn.Module):
    """A backbone with its tokenizer, loaded from a version and placed on a device.

    ``forward`` is the backbone's (logits); the task methods of the subclasses generate text.
    ``memory_limit`` (bytes or ``"6GiB"``) caps the GPU memory: blocks that do not fit stream from
    pinned host memory, and ``dynamic_memory`` of it is kept for activations and caches.
    """
    model_key = ""        # hub.LATEST key: "cpm1", "cpm2", "eva"
    arch = ""             # "gpt" or "t5"
    preset = ""           # the released version's preset
    max_input_tokens = 1024  # longest prompt encoded (T5: encoder tokens)

    def __init__(self, device_idx: Optional[int] = None, dynamic_memory: Union[int, str] = 512 << 20,
                 memory_limit: Union[int, str, None] = None, version: Optional[str] = None, *,
                 device=None, dtype=None, quantization: bool = True, cuda_graphs: bool = True):
        super().__init__()
        from .. import hub
        from ..checkpoint import load_model
        from ..checkpoint.common import architecture_of, cast_floats_, dequantize_

        # every argument is checked before anything is loaded
        device = _device(device_idx, device)
        reserve = parse_size(dynamic_memory, "dynamic_memory")
        limit = None if memory_limit is None else parse_size(memory_limit, "memory_limit")
        if limit is not None and device.type != "cuda":
            raise ValueError(f"memory_limit caps GPU memory, but device is {device}; leave it out on a CPU")
        dtype = parse_dtype(dtype) if dtype is not None else (torch.float16 if device.type == "cuda" else torch.float32)
        for name, flag in (("quantization", quantization), ("cuda_graphs", cuda_graphs)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}")
        directory = resolve_version(self.model_key, version)
        compile_ahead.set_up_in_background(device)  # Triton's own setup, while the checkpoint is read

        released = version in (None, hub.LATEST[self.model_key])
        backbone = load_model(directory, preset=self.preset if released else None)
        if architecture_of(backbone) != self.arch:
            raise ValueError(f"{directory} holds a {architecture_of(backbone)} model; {type(self).__name__} runs "
                             f"a {self.arch} model")
        if not quantization:
            dequantize_(backbone, dtype)
        cast_floats_(backbone, dtype)
        self.tokenizer = self._load_tokenizer(directory, backbone.config.vocab_size)
        self.version, self.directory = version or hub.LATEST[self.model_key], directory
        self.backbone = self._place(backbone, device, limit, reserve)
        self.device, self.dtype = device, dtype
        self.cuda_graphs = cuda_graphs
        self._graphed: "OrderedDict[tuple, object]" = OrderedDict()

    @classmethod
    def available(cls, version: Optional[str] = None, **kwargs) -> "Pretrained":
        """The model as the demos and the CLI load it: ``version`` if given, else the release when it is
        cached or can be downloaded, else the small demo that ships with bminf, said in one line on stderr.

        >>> cpm2 = CPM2.available(device="cpu")                      # doctest: +SKIP
        """
        if version is None:
            version, note = available_version(cls.model_key)
            if note:
                print(f"bminf: {note}", file=sys.stderr)
        return cls(version=version, **kwargs)

    def _load_tokenizer(self, directory: str, vocab_size: int):
        raise NotImplementedError

    @staticmethod
    def _place(backbone: nn.Module, device: torch.device, limit: Optional[int], reserve: int) -> nn.Module:
        if limit is None:
            try:
                return backbone.to(device)
            except torch.cuda.OutOfMemoryError as e:
                raise MemoryError(f"the model does not fit on {device}: pass memory_limit= (e.g. '6GiB') to "
                                  "stream the blocks that do not fit from host memory") from e
        from ..wrapping import wrapper
        return wrapper(backbone, quantization=False, memory_limit=limit, device=device, reserve=reserve, strict=True)

    def _control_ids(self, keep: Sequence[str] = ()) -> List[int]:
        """Ids of the vocabulary's control pieces that never belong in generated text (``<unk>``, ``<pad>``,
        ...): sampling skips them, so no output shows a literal ``<pad>``."""
        names = [n for n in ("<unk>", "<s>", "</s>", "<sep>", "<pad>", "<mask>") if n not in keep]
        return [i for i in map(self.tokenizer.token_to_id, names) if i is not None]

    def graphed(self, batch_size: int, length: int, source_length: int = 0):
        """A ``GraphedDecoder`` for ``batch_size`` rows of up to ``length`` cached tokens (and, for T5,
        ``source_length`` encoder tokens), or None (off CUDA, or ``cuda_graphs=False``: the model's own
        eager decode). Its one-token steps replay CUDA graphs; when some blocks stream from host memory,
        a graph per run of resident blocks, the streamed blocks eagerly between them. Decoders are kept
        for the next call (graphs take a moment to capture), the two most recently used of them."""
        from ..generation.graphs import GraphedDecoder

        if not self.cuda_graphs or self.device.type != "cuda":
            return None
        # round up, so that calls of similar sizes share a decoder (and its graphs)
        length = _round_up(length, getattr(self.backbone.config, "max_positions", None))
        source = _round_up(source_length, self.max_input_tokens) if source_length else 0
        key = (batch_size, length, source)
        decoder = self._graphed.pop(key, None)
        if decoder is None:
            while len(self._graphed) >= 2:
                self._graphed.popitem(last=False)  # its caches and graph memory go with it
            kwargs = dict(max_source_length=source) if source else {}
            decoder = GraphedDecoder(self.backbone, batch_size, length, **kwargs)
        self._graphed[key] = decoder
        return decoder

    def free(self) -> None:
        """Drop the kept CUDA-graph decoders and their caches (BMInf 1.x freed its memory pool here)."""
        self._graphed.clear()

    def extra_repr(self) -> str:
        return f"version={self.version!r}, device={self.device}, dtype={self.dtype}"

    # -- generation ---------------------------------------------------------------------------------
    def _params(self, max_tokens, top_n, top_p, temperature, frequency_penalty, presence_penalty,
                seed) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_n=top_n, top_p=top_p,
                              frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
                              seed=seed).check(self.tokenizer.vocab_size)

    def _check_stream(self, stream) -> bool:
        if not isinstance(stream, bool):
            raise TypeError(f"stream must be True or False, got {stream!r}")
        return stream

    def _generate(self, input_sentence, max_tokens, top_n, top_p, temperature, frequency_penalty, presence_penalty,
                  stop_tokens, seed, stream):
        """``generate`` of CPM-1 and CPM-2, which differ only in ``prepare_generate``."""
        texts, single = as_batch("input_sentence", input_sentence, lambda v: isinstance(v, str))
        names = ["input_sentence"] if single else [f"input_sentence[{i}]" for i in range(len(texts))]
        texts = [check_text(name, t) for name, t in zip(names, texts)]  # every input checked before any work
        params = self._params(max_tokens, top_n, top_p, temperature, frequency_penalty, presence_penalty, seed)
        stops = check_stop_strings(stop_tokens)
        stream = self._check_stream(stream)
        prepared = [self.prepare_generate(t, max_tokens, stops, name=name) for name, t in zip(names, texts)]
        return self._run(prepared, params, single, stream, lambda row, _: (row.text, row.stopped))

    def _run(self, prepared: List[Prepared], params: SamplingParams, single: bool, stream: bool,
             finish: Callable):
        """Generate for every prepared input, one row each, as one batch; ``finish(row, prepared)`` makes
        a result. Compute starts only here, after every argument was checked."""
        rows = [p.new_row() for p in prepared]
        inputs = [p.source for p in prepared]
        first = prepared[0]  # a task's batch shares the decoder prefix and the special ids

        def events() -> Iterator:
            runner = self._runner(inputs, params.max_tokens, first.prefix)
            yield from decode(runner, rows, params, inputs, self.tokenizer.vocab_size, first.no_penalty,
                              first.filtered)

        if stream:
            return _pieces(events(), single)
        for _ in events():
            pass
        results = [finish(row, p) for row, p in zip(rows, prepared)]
        return results[0] if single else results

    def _runner(self, inputs: List[List[int]], max_tokens: int, decoder_prefix: Optional[Sequence[int]]):
        longest = max(map(len, inputs))
        if decoder_prefix is None:
            graphed = self.graphed(len(inputs), longest + max_tokens)
            return GPTRunner(self.backbone, inputs, max_tokens, graphed)
        graphed = self.graphed(len(inputs), len(decoder_prefix) + max_tokens, longest)
        return T5Runner(self.backbone, inputs, decoder_prefix, max_tokens, graphed)


class EncoderDecoder(Pretrained):
    """What CPM-2 and EVA share: the T5 backbone's forward and their input bounds."""
    arch = "t5"
    max_decoder_tokens = 1024  # longest output: the decoder's cache is allocated for it

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                decoder_input_ids: Optional[torch.Tensor] = None,
                decoder_attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        home = self.backbone.input_embedding.weight.device
        move = (lambda t: t.to(home) if t is not None else None)
        return self.backbone(move(input_ids), move(attention_mask), move(decoder_input_ids),
                             move(decoder_attention_mask))

    def _encode_checked(self, ids: List[int], what: str) -> List[int]:
        if len(ids) > self.max_input_tokens:
            raise InputTooLongError(f"{what} is {len(ids)} tokens long; at most {self.max_input_tokens} are "
                                    "allowed")
        return ids

    def _check_max_tokens(self, max_tokens) -> None:
        if isinstance(max_tokens, int) and max_tokens > self.max_decoder_tokens:
            raise ValueError(f"max_tokens must be in [0, {self.max_decoder_tokens}], got {max_tokens}")


def vocab_file(directory: str) -> str:
    path = os.path.join(directory, "vocab.txt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory}: no vocab.txt beside the checkpoint")
    return path


def _round_up(n: int, cap: Optional[int]) -> int:
    """The next power of two from 64, at most ``cap``."""
    size = 64
    while size < n:
        size *= 2
    return min(size, cap) if cap else size


def _pieces(events: Iterator, single: bool) -> Iterator:
    for step in events:
        for i, out in step:
            yield out if single else (i, out)
