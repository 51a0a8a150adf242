"""One-token decode steps replayed from CUDA graphs, for the generation loop.

Eager PyTorch spends ~30 ms of host time per CPM-2 token launching ~1,700 kernels, while the GPU
needs ~1.3 ms to read the weights. A CUDA graph records the whole step (every layer and the LM
head) once and replays it with one launch. A graph replays fixed addresses and shapes, so the step
is written against static state (llama2.c's ``RunState``, gpt-fast's static ``KVCache``):

* the KV cache is the model's own preallocated cache, owned here and reused for every prompt;
* the new token's keys/values go to a position held in a device tensor (``index_copy_``; on CUDA
  the one-query attention kernel stores them as it attends), and
  attention runs over a fixed-length prefix of the buffer (a bucket: 64, 128, 256, ... tokens)
  with a mask, instead of slicing to the current length;
* the mask and GPT's per-row positions are device tensors updated inside the graph;
* T5's cross-attention keys/values are padded to ``max_source_length`` (the padding masked).

One graph is captured per cache-length bucket (lazily, or all at once with ``warm_up()``), for the
batch size this object was made for. The prompt pass (GPT prefill, T5's first decoder step, which
also projects the cross-attention keys/values) runs through the model itself, into the same cache,
so both paths share one state: replayed from a graph per prompt width (up to ``PROMPT_GRAPH_WIDTH``;
GPT's runner pads prompts to a power of two), with the kernels and numbers of the eager pass. On an
H200 the prompt of the decoder benchmarks (a 256-token source and the first step; CPM-1: a 256-token
prefill) took CPM-2 13 ms against 73 eager, EVA 8 against 79, CPM-1 54 against 71; CPM-1's
``generate`` got its first token of a short prompt in 3.9 ms against 45 (h200_run97_prompt_graphs.log,
h200_run98_models_run_ahead.log, h200_run99.log). When blocks stream from host memory (``TransformerBlockList``
under a budget), a step replays a graph per run of resident blocks and runs the streamed blocks
eagerly between them (``_segmented``); prompts and the encoder then run eagerly. Off CUDA, with
``use_graphs=False``, or when blocks span several GPUs, the same static step runs eagerly: that path
is what the CPU tests check against the model's eager ``decode``.

Measured on an H200 (benchmark/results/h200_cpm2_decoder_run10.json, CPM-2, batch 1): 408 tokens/s
(2.45 ms/step, 0.47 ms of it on the host) against 16-40 for the eager step (host-bound, so it varies
with the machine's CPU); capturing the buckets of a 256-token cache takes ~1.5 s on first use.

T5's encoder is replayed from graphs too, one per prompt length padded (and masked) to a bucket of
``max_source_length``: a 256-token CPM-2 prompt took 8.7 ms against 20.3 ms eager
(benchmark/results/h200_cpm2_encoder_run11.json). Its kernels are the ones eager ``encode`` picks.

Numerics: a graph step runs the same modules as the eager step; it differs only in attending over
masked padding (exactly zero weight, but other kernel tilings) and, on CUDA, in using the fused int8
kernel for small weights too. Logits agree with the eager path to fp16 rounding (checked to
``1e-2`` relative on the GPU, ``1e-5`` in fp32 on the CPU), greedy tokens are the same.

>>> # model = T5(...).cuda().half(); dec = GraphedDecoder(model, batch_size=1, max_length=256)
>>> # enc = dec.encode(ids, mask); cache = dec.new_cache(mask)      # the encoder from a graph too
>>> # logits = dec.decode(start_ids, enc, cache=cache)       # eager: fills the cross-attention cache
>>> # logits = dec.decode(token[:, None], cache=cache)       # graph replay
"""
import contextlib
import functools
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import attention, compile_ahead, dependent_launch, triton_attention
from ..kernels.triton_int8 import always_fused, available
from ..layers import additive_mask, check_ids
from ..layers.position_bias import relative_position_bucket
from ..models.t5 import add_and_norm
from .loop import input_embedding

__all__ = ["GraphedDecoder", "StaticLayerKV", "buckets_for"]


class StaticLayerKV:
    """A layer's cache seen by a graphed step: this step's keys/values go to the position in the
    device tensor ``pos`` (one for every row, or one per row); attention reads the first ``length``
    positions (the bucket)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, length: int):
        self.k, self.v, self.pos, self.length = k, v, pos, length  # k, v: (batch, heads, max_length, d_head)

    def update(self, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        # k, v: (batch, heads, 1, d_head); pos: one position for every row, or one per row
        if self.pos.numel() == 1:
            self.k.index_copy_(2, self.pos, k)
            self.v.index_copy_(2, self.pos, v)
        else:
            at = self.pos.view(-1, 1, 1, 1).expand_as(k)
            self.k.scatter_(2, at, k)
            self.v.scatter_(2, at, v)
        return self.k[:, :, :self.length], self.v[:, :, :self.length]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
               scale: float) -> torch.Tensor:
        # on CUDA one kernel stores the new key/value and attends (three kernels apart)
        if triton_attention.supports(q, self.k, self.v):
            return triton_attention.attend_and_store(q, self.k, self.v, bias, scale, self.length, k, v, self.pos)
        return attention(q, *self.update(k, v), bias, scale)


@functools.lru_cache(maxsize=None)
def _warm_up_stream(device: torch.device) -> torch.cuda.Stream:
    # One side stream per device for every capture's warm-up calls: torch keeps a cuBLAS workspace
    # (up to 32 MiB by its defaults) for each stream that ran a GEMM until the process ends, and a new
    # stream per capture kept one per bucket and encoder length: memory that a budget counts as in use
    return torch.cuda.Stream(device)


# Prompts up to this many tokens run from graphs (GPT's prefill, T5's first decoder step): a graph keeps its
# activations for good, and they grow with the square of the width (attention scores), while past a few
# hundred tokens the pass's compute, not the host's launches, sets its time
PROMPT_GRAPH_WIDTH = 256


def power_of_two(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for 0 or 1).

    >>> power_of_two(5), power_of_two(64)
    (8, 64)
    """
    return 1 << max(0, n - 1).bit_length()


def prompt_width(longest: int) -> Optional[int]:
    """The width GPT prompts of up to ``longest`` tokens are padded to (on the left, masked) for a prefill
    graph: the next power of two from 8, or None past ``PROMPT_GRAPH_WIDTH``.

    >>> prompt_width(10), prompt_width(300)
    (16, None)
    """
    width = power_of_two(max(longest, 8))
    return width if width <= PROMPT_GRAPH_WIDTH else None


def buckets_for(max_length: int, smallest: int = 64) -> List[int]:
    """Attention lengths to capture: powers of two from ``smallest``, then ``max_length``.

    >>> buckets_for(300)
    [64, 128, 256, 300]
    """
    out, b = [], smallest
    while b < max_length:
        out.append(b)
        b *= 2
    return out + [max_length]


def _streams_or_splits(layers: nn.Module) -> bool:
    """Whether a block list streams from host memory or spans devices (one graph cannot hold that)."""
    return bool(_streamed(layers)) or _splits(layers)


def _streamed(layers: nn.Module) -> Tuple[int, ...]:
    """The indices of the blocks that stream from host memory (none for a plain module list)."""
    return tuple(getattr(layers, "streamed_blocks", []) or [])


def _splits(layers: nn.Module) -> bool:
    return len(set(map(str, getattr(layers, "block_devices", []) or []))) > 1


def segments(blocks: int, streamed: Sequence[int]) -> List[Tuple[int, int, bool]]:
    """A step over ``blocks`` blocks cut at the ``streamed`` ones: ``(start, end, eager)`` runs in order,
    each streamed block a run of its own (eager), the resident blocks between them runs for graphs.
    The first run also does the step's head (embedding, biases) and the last its tail (norm, LM head),
    so both are graph runs, empty of blocks when a streamed block is first or last; between two
    streamed blocks there is none (a graph of nothing).

    >>> segments(5, [1, 2])
    [(0, 1, False), (1, 2, True), (2, 3, True), (3, 5, False)]
    """
    out, start = [], 0
    for i in sorted(streamed):
        if i > start or not out:
            out.append((start, i, False))
        out.append((i, i + 1, True))
        start = i + 1
    return out + [(start, blocks, False)]


class GraphedDecoder:
    """Replays one-token decode steps of a ``GPT`` or ``T5`` from CUDA graphs (see the module doc).

    GPT: ``cache = dec.new_cache()``, prefill ``dec(ids, attention_mask=mask, cache=cache)``, steps
    ``dec(token[:, None], cache=cache)``. T5: ``enc = dec.encode(ids, mask)``,
    ``cache = dec.new_cache(mask)``, first step ``dec.decode(dec_ids, enc, cache=cache)``, steps
    ``dec.decode(token[:, None], cache=cache)``. A prompt's pass replays a graph of its width (with the
    eager pass's numbers), a step a graph of its bucket. Logits come back as fresh tensors.
    ``warm_up()`` captures every bucket now (else each is captured on first use) and returns seconds.
    """

    def __init__(self, model: nn.Module, batch_size: int, max_length: int, max_source_length: int = 512,
                 use_graphs: Optional[bool] = None, buckets: Optional[List[int]] = None):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        self.model = model
        self.is_t5 = hasattr(model, "dec_layers")
        self.layers = model.dec_layers if self.is_t5 else model.layers
        weight = input_embedding(model).weight
        self.device, self.dtype = weight.device, weight.dtype
        if not self.is_t5 and max_length > model.config.max_positions:
            raise ValueError(f"max_length {max_length} exceeds the model's {model.config.max_positions} positions")
        can_graph = self.device.type == "cuda" and not _streams_or_splits(self.layers)
        if use_graphs and not can_graph:
            raise ValueError("use_graphs=True needs a CUDA model whose blocks are resident on one device")
        self.use_graphs = can_graph if use_graphs is None else use_graphs
        # blocks streaming on one GPU: the steps replay a graph per run of resident blocks (see _segmented)
        self.segmented = (use_graphs is None and self.device.type == "cuda" and bool(_streamed(self.layers))
                          and not _splits(self.layers))
        self.segments: Dict[Tuple[int, int], list] = {}
        self.segments_plan: Tuple[int, ...] = ()  # the streamed blocks the segments were captured for
        self.batch_size, self.max_length = batch_size, max_length
        self.buckets = sorted(buckets) if buckets else buckets_for(max_length)
        if self.buckets[-1] < max_length:
            raise ValueError(f"the largest bucket {self.buckets[-1]} is shorter than max_length {max_length}")
        self.max_source_length = max_source_length
        # static inputs of the step: the token ids and the position it is written to
        self.ids = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self.key_pos = torch.arange(self.buckets[-1], device=self.device)
        self.fused_biases = self.device.type == "cuda" and available()
        if self.is_t5:
            bias = model.position_bias_dec  # its bucket of each distance back, for the fused biases
            self.bucket_of_distance = relative_position_bucket(self.key_pos, self.key_pos[:1], False, bias.num_buckets,
                                                               bias.max_distance)[:, 0].to(torch.int32)
            mask = torch.ones(batch_size, max_source_length, dtype=torch.bool, device=self.device)
            self.cache = model.new_cache(mask, max_length)
        else:
            self.cache = model.new_cache(batch_size, max_length)
        self.graphs: Dict[Tuple[int, int], Tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # T5's encoder: one graph per padded prompt length (static embeddings, mask, graph, output)
        self.source_buckets = buckets_for(max_source_length)
        self.encoders: Dict[int, Tuple[torch.Tensor, torch.Tensor, torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # a prompt's pass on the empty cache (T5's first decoder step, GPT's prefill): one graph per width
        self.prompts: Dict[Tuple[str, int], Tuple[List[torch.Tensor], torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs or self.segmented else None
        self.capture_s = 0.0  # total time spent capturing (warm-up), for reporting

    # -- the static step --------------------------------------------------------------------------
    def _kv(self):  # the self-attention KVCache of either model
        return self.cache.self_kv if self.is_t5 else self.cache

    def _step(self, length: int) -> torch.Tensor:
        """One token at position ``self.pos`` for every row, attending over ``length`` positions.
        Only device tensors change between calls, so this is what a graph records."""
        return self._keyed_step((self.batch_size, length))

    def _parts(self, key: tuple) -> tuple:
        """``(cache, ids, pos, length)`` that the step of graph ``key`` runs on (``_static_step``'s
        arguments): here the whole cache; a server's slots take a view of their running rows."""
        return self.cache, self.ids, self.pos, key[1]

    def _finish(self, parts: tuple) -> None:
        """What the step of ``parts`` does after its LM head (a server's slots advance their positions)."""

    def _keyed_step(self, key: tuple) -> torch.Tensor:
        """The step of graph ``key``, run whole: what its graph records, and the eager fallback."""
        parts = self._parts(key)
        out = self._static_step(*parts)
        self._finish(parts)
        return out

    def _static_step(self, cache, ids: torch.Tensor, pos: torch.Tensor, length: int) -> torch.Tensor:
        """``_step`` over ``cache`` (this decoder's, or a view of some of its rows), ``ids`` (rows, 1) and
        ``pos``: the column every row writes (one element) or each row's own (one per row)."""
        state = self._head(cache, ids, pos, length)
        state = self._blocks(state, cache, pos, length, 0, len(self.layers))
        return self._tail(state, cache)

    def _head(self, cache, ids: torch.Tensor, pos: torch.Tensor, length: int) -> tuple:
        """The step before its blocks: the biases and the embedding. The state the blocks pass on: T5
        ``(x, ff, self_bias, cross_bias)`` (``ff`` the feed-forward output not yet added), GPT
        ``(x, self_bias)``."""
        kv = cache.self_kv if self.is_t5 else cache
        self_bias, cross_bias = self._biases(cache, kv, pos, length)
        if self.is_t5:
            return self.model.input_embedding(ids).to(self.dtype), None, self_bias, cross_bias
        # GPT: a row's position is the number of real tokens it has seen
        return self.model.token_embedding(ids) + self.model.position_embedding(kv.n_valid[:, None]), self_bias

    def _blocks(self, state: tuple, cache, pos: torch.Tensor, length: int, start: int, end: int) -> tuple:
        """Blocks ``start`` to ``end`` (excluded) of the step on ``state`` (see ``_head``)."""
        kv = cache.self_kv if self.is_t5 else cache
        if self.is_t5:
            x, ff, self_bias, cross_bias = state
            for i in range(start, end):
                layer_kv = StaticLayerKV(kv.k[i], kv.v[i], pos, length)
                x, ff = self.layers[i](x, ff, self_bias, None, cross_bias, layer_kv, cache.cross.layer(i))
            return x, ff, self_bias, cross_bias
        x, self_bias = state
        for i in range(start, end):
            x = self.layers[i](x, self_bias, StaticLayerKV(kv.k[i], kv.v[i], pos, length))
        return x, self_bias

    def _tail(self, state: tuple, cache) -> torch.Tensor:
        """The step after its blocks: the count of valid positions, the last norm and the LM head."""
        kv = cache.self_kv if self.is_t5 else cache
        kv.n_valid += 1
        if self.is_t5:
            x, ff = state[:2]
            return self.model.lm_head(add_and_norm(x, ff, self.model.ln_dec)[1])
        return self.model.lm_head(self.model.layernorm(state[0]))

    def _biases(self, cache, kv, pos: torch.Tensor, length: int):
        """The step's self-attention bias (T5: position bias plus mask, (batch, heads, 1, length); GPT: the
        mask, (batch, 1, 1, length)) and T5's cross-attention mask (batch, 1, 1, source), with the step's
        key marked in the cache's key mask. On CUDA one kernel (``triton_attention.step_biases``), the
        same numbers as the torch ops here (CPM-2's step ran some twenty small kernels for them)."""
        encoder_mask = cache.encoder_mask if self.is_t5 else None
        if self.fused_biases:
            position = (self.model.position_bias_dec.weight, self.bucket_of_distance) if self.is_t5 else None
            return triton_attention.step_biases(kv.key_mask, pos, length, self.dtype, position, encoder_mask)
        key_pos = self.key_pos[:length]
        if pos.numel() == 1:
            kv.key_mask.index_fill_(1, pos, True)
        else:
            kv.key_mask.scatter_(1, pos[:, None], True)
        allowed = kv.key_mask[:, :length] & (key_pos <= pos[:, None])    # (batch, length)
        mask_bias = additive_mask(allowed, self.dtype)[:, None, None, :]    # (batch, 1, 1, length)
        if not self.is_t5:
            return mask_bias, None
        self_bias = self.model.position_bias_dec(pos[:, None], key_pos).to(self.dtype) + mask_bias
        return self_bias, additive_mask(encoder_mask, self.dtype)[:, None, None, :]

    def _step_state(self):
        """A function that puts back the cache's key mask and counts as they are now: what ``_step``
        changes besides the keys and values at the next position, which the real step overwrites."""
        kv = self._kv()
        saved = kv.key_mask.clone(), kv.n_valid.clone()

        def put_back():
            kv.key_mask.copy_(saved[0])
            kv.n_valid.copy_(saved[1])
        return put_back

    def _capture(self, length: int) -> Tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        return self._record(lambda: self._step(length), warm_ups=2, fused=True, after_warm_up=self._step_state())

    def _record(self, run, warm_ups: int, fused: bool, after_warm_up=None, compile_also=None):
        """``(graph, output)`` of ``run()`` captured into this object's pool, after ``warm_ups`` calls
        on a side stream (they set up cuBLAS) and ``after_warm_up()``; ``fused``: under
        ``always_fused`` (the fused int8 kernels for small weights too). Before them, ``run()`` (and
        ``compile_also()``) once with our kernels compiled on threads instead of run
        (``kernels.compile_ahead``). Our kernels launch with programmatic dependent launch in all of
        these (``kernels.dependent_launch``)."""
        t = time.perf_counter()
        kernels = always_fused if fused else contextlib.nullcontext
        stream = _warm_up_stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream), kernels(), dependent_launch.within_a_step(), torch.no_grad():
            if compile_ahead.available():
                with compile_ahead.compiling_only(self.device):
                    run()
                    if compile_also is not None:
                        compile_also()
            for _ in range(warm_ups):
                run()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if after_warm_up is not None:
            after_warm_up()
        graph = torch.cuda.CUDAGraph()
        with kernels(), dependent_launch.within_a_step(), torch.no_grad(), torch.cuda.graph(graph, pool=self.pool):
            out = run()
        self.capture_s += time.perf_counter() - t
        return graph, out

    def _steps_compiled(self) -> None:
        """Under ``compile_ahead.compiling_only``: the step of every bucket not captured yet, so that their
        kernels compile with the prompt's, on the same threads, before the eager first step
        needs most of them. Each bucket has an attention kernel of its own: compiled when its graph was
        first captured, one after another, they took about 2 s of CPM-2's first call on an H200 (the
        first call +5.2 s against +3.3 s with every bucket here; h200_run42.log, h200_run45.log). The
        steps' host-side state is put back after."""
        lengths = [n for n in self.buckets if (self.batch_size, n) not in self.graphs]
        if not lengths:
            return
        put_back = self._step_state()
        filled = list(self.cache.cross.filled) if self.is_t5 else None
        if self.is_t5:
            self.cache.cross.filled = [True] * len(filled)  # the step reads the (unfilled) buffers
        try:
            with always_fused():
                for length in lengths:
                    self._step(length)
        finally:
            put_back()
            if self.is_t5:
                self.cache.cross.filled = filled

    def _replay(self, ids: torch.Tensor) -> torch.Tensor:
        kv = self._kv()
        if ids.shape != (self.batch_size, 1):
            raise ValueError(f"a decode step takes ids of shape ({self.batch_size}, 1), got {tuple(ids.shape)}")
        if kv.length >= self.max_length:
            raise ValueError(f"sequence of {kv.length + 1} tokens exceeds max_length {self.max_length}")
        length = next(b for b in self.buckets if b > kv.length)
        self.ids.copy_(ids)
        self.pos.fill_(kv.length)
        out = self._run((self.batch_size, length), lambda: self._capture(length), lambda: self._step(length))
        kv.length += 1
        return out.clone()  # the graph's output buffer is overwritten by the next replay

    def graph_count(self) -> int:
        """CUDA graphs captured so far: whole steps, and with blocks streaming each step's runs."""
        return len(self.graphs) + sum(g is not None for pieces in self.segments.values() for g, *_ in pieces)

    def _run(self, key, capture, step) -> torch.Tensor:
        """The output of the graph under ``key`` replayed (``capture()`` makes it on first use); with
        blocks that stream, of the graphs of its runs of resident blocks and the streamed blocks between
        (``_segmented``); without graphs, of ``step()`` run eagerly."""
        if self.segmented:
            return self._segmented(key)
        if not self.use_graphs:
            with torch.no_grad():
                return step()
        if key not in self.graphs:
            self.graphs[key] = capture()
        graph, out = self.graphs[key]
        graph.replay()
        return out

    # -- blocks that stream: a graph per run of resident blocks -------------------------------------
    def _segmented(self, key: tuple) -> torch.Tensor:
        """The step of graph ``key`` when some blocks stream from host memory (``TransformerBlockList``
        under a budget): each run of resident blocks (with the step's head or tail) replays a graph, and
        the streamed blocks run eagerly between them, as they must (each waits for its copy into a device
        slot, whose address changes with the slot). Run whole eagerly, CPM-2's step under 6 GiB took 58.7
        ms of host time for 28 ms of copies on one H200 machine (h200_run119.log, 48% of the budget's
        floor); on another, alternated, 29-30 ms eagerly against 23 ms this way, 32.4 / 34.4 against
        35.3 / 35.3 tok/s, the floor 35.5 (h200_run121_segments.log). The streamed blocks run the graphs'
        kernels (``always_fused``), so the numbers are those of a step replayed whole. A re-plan that
        moves blocks (a pass over the limit) drops the graphs, which hold the old addresses."""
        plan = _streamed(self.layers)
        if plan != self.segments_plan:
            self.segments.clear()
            self.segments_plan = plan
        with torch.no_grad():
            if key not in self.segments:
                pieces = self._capture_segments(key, plan)
                if pieces is None:  # the plan changed while capturing: this step eagerly
                    with always_fused():
                        return self._keyed_step(key)
                self.segments[key] = pieces
            return self._run_segments(self.segments[key], key, plan)

    def _run_segments(self, pieces: list, key: tuple, plan: Tuple[int, ...]) -> torch.Tensor:
        # the step's parts once: a server's slots make views of every layer's cache for them
        state, parts = None, self._parts(key)
        for graph, start, end, buffers, out in pieces:
            if graph is not None:
                for i, buffer in buffers:  # what the streamed block before wrote, where the graph reads it
                    buffer.copy_(state[i])
                graph.replay()
                state = out
                continue
            state = self._eager_blocks(state, parts, start, end)
            if _streamed(self.layers) != plan:
                # the block's release found the pass over the limit and moved blocks: the graphs after it
                # read the old addresses, so the rest of the step runs eagerly
                self.segments.clear()
                state = self._eager_blocks(state, parts, end, len(self.layers))
                with always_fused():
                    return self._ending(state, parts)
        return state

    def _eager_blocks(self, state: tuple, parts: tuple, start: int, end: int) -> tuple:
        # blocks run between the graphs take the graphs' kernels, so the numbers stay those of a whole graph
        cache, _, pos, length = parts
        with always_fused():
            return self._blocks(state, cache, pos, length, start, end)

    def _ending(self, state: tuple, parts: tuple) -> torch.Tensor:
        """The step's tail on ``state`` and what follows it (``_finish``)."""
        out = self._tail(state, parts[0])
        self._finish(parts)
        return out

    def _capture_segments(self, key: tuple, plan: Tuple[int, ...]) -> Optional[list]:
        """``(graph, start, end, buffers, out)`` per run of ``segments``: a graph with the static
        ``buffers`` it reads the state from (``(index, tensor)``, after a streamed block) and its
        ``out``, or ``(None, start, end, None, None)`` for a streamed block. Capturing runs the pieces
        once in order, on the real cache; the key mask, counts (and a server's positions) are put back
        after, and the caller runs the step. None if the plan changed meanwhile."""
        put_back = self._step_state()
        runs = segments(len(self.layers), plan)
        parts = self._parts(key)
        cache, ids, pos, length = parts
        pieces, state, static = [], None, set()
        try:
            for n, (start, end, eager) in enumerate(runs):
                if eager:
                    state = self._eager_blocks(state, parts, start, end)
                    pieces.append((None, start, end, None, None))
                    if _streamed(self.layers) != plan:
                        return None
                    continue
                first, last = n == 0, n == len(runs) - 1
                inputs = state
                buffers = []
                if not first:  # what a streamed block made is fresh each step: it goes into a static buffer
                    inputs = list(state)
                    for i, t in enumerate(state):
                        if isinstance(t, torch.Tensor) and id(t) not in static:
                            inputs[i] = torch.empty_like(t).copy_(t)
                            buffers.append((i, inputs[i]))
                    inputs = tuple(inputs)

                def run(inputs=inputs, start=start, end=end, first=first, last=last):
                    s = self._head(cache, ids, pos, length) if first else inputs
                    s = self._blocks(s, cache, pos, length, start, end)
                    return self._ending(s, parts) if last else s
                graph, out = self._record(run, warm_ups=2, fused=True)
                graph.replay()  # a capture runs nothing: the next piece starts from this one's output
                pieces.append((graph, start, end, buffers, out))
                state = out
                static.update(id(t) for t in (out if isinstance(out, tuple) else (out,)) if isinstance(t, torch.Tensor))
            return pieces
        finally:
            put_back()

    def warm_up(self) -> float:
        """Capture a graph for every bucket now; returns the seconds it took. The cache is left empty."""
        if not self.use_graphs:
            return 0.0
        t = time.perf_counter()
        if self.is_t5:
            self.cache.cross.filled = [True] * len(self.cache.cross.filled)  # the graphs read the buffers
        kv = self._kv()
        for length in self.buckets:
            kv.length = length - 1
            self.pos.fill_(kv.length)
            if (self.batch_size, length) not in self.graphs:
                self.graphs[(self.batch_size, length)] = self._capture(length)
        torch.cuda.synchronize(self.device)
        self._reset()
        return time.perf_counter() - t

    def _reset(self) -> None:
        self._kv().reset()
        if self.is_t5:
            self.cache.cross.filled = [False] * len(self.cache.cross.filled)

    def _own(self, cache) -> None:
        if cache is not self.cache:
            raise ValueError("pass the cache from this GraphedDecoder's new_cache(): graphs replay its buffers")

    # -- the calls the generation loop makes ------------------------------------------------------
    def new_cache(self, encoder_mask: Optional[torch.Tensor] = None, max_length: Optional[int] = None):
        """This decoder's cache, emptied. T5 takes the encoder mask (batch, source_len), padded here
        to ``max_source_length``; ``max_length`` may not exceed the one given at construction."""
        if max_length is not None and max_length > self.max_length:
            raise ValueError(f"max_length {max_length} exceeds this decoder's {self.max_length}")
        self._reset()
        if self.is_t5:
            if encoder_mask is None or encoder_mask.dim() != 2 or encoder_mask.shape[0] != self.batch_size:
                got = None if encoder_mask is None else tuple(encoder_mask.shape)
                raise ValueError(f"encoder_mask must be ({self.batch_size}, source_len), got {got}")
            if encoder_mask.shape[1] > self.max_source_length:
                raise ValueError(f"encoder_mask holds {encoder_mask.shape[1]} positions, more than "
                                 f"max_source_length {self.max_source_length}")
            self.cache.encoder_mask.zero_()
            self.cache.encoder_mask[:, :encoder_mask.shape[1]] = encoder_mask.to(self.device, torch.bool)
        return self.cache

    def __call__(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, cache=None):
        """GPT: ``model(input_ids, attention_mask=..., cache=cache)``; one-token steps replay a graph."""
        self._own(cache)
        if input_ids.shape[1] == 1 and attention_mask is None and cache.length > 0:
            return self._replay(input_ids)
        if self.use_graphs and compile_ahead.available() and (self.batch_size, self.buckets[0]) not in self.graphs:
            with torch.no_grad(), dependent_launch.within_a_step(), compile_ahead.compiling_only(self.device):
                self._steps_compiled()
        with torch.no_grad(), dependent_launch.within_a_step():  # the same kernels as the graphs'
            if not (self._prompt_graph_takes(input_ids, cache.length == 0)
                    and (attention_mask is None or (isinstance(attention_mask, torch.Tensor)
                                                    and attention_mask.shape == input_ids.shape))):
                return self.model(input_ids, attention_mask=attention_mask, cache=cache)
            # the check (a host sync) and the embedding eagerly, on the real ids, as encode() does
            check_ids(input_ids, self.model.config.vocab_size)
            mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else \
                attention_mask.to(self.device, torch.bool)
            logits = self._prompt_replay(("gpt", input_ids.shape[1]), [self.model.token_embedding(input_ids), mask],
                                         self._prefill)
            cache.length = input_ids.shape[1]  # what the captured call's commit did on the host
            return logits

    def _prefill(self, emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """GPT's prompt on the empty cache, from embeddings: CPM-1's ~1,000 kernels, launched from the host
        eagerly, took longer than twenty graphed steps. ``prompt_width`` pads prompts to a few widths, so
        that few graphs serve every prompt."""
        self.cache.length = 0
        return self.model(inputs_embeds=emb, attention_mask=mask, cache=self.cache)

    def prompt_width(self, longest: int, room: int) -> int:
        """How wide a GPT runner pads (on the left, masked) prompts of up to ``longest`` tokens that will
        take ``room`` more: the next power of two from 8 with graphs (one prefill graph serves each width),
        when the cache still holds ``room`` after it and a graph serves it; else ``longest``.

        >>> # GraphedDecoder(model, 1, max_length=256).prompt_width(10, 128) == 16 on a GPU
        """
        width = prompt_width(longest)
        return width if self.use_graphs and width is not None and width + room <= self.max_length else longest

    def encode(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """T5's encoder output. With graphs, the prompt is padded (masked) to the next bucket of
        ``max_source_length`` and the encoder replayed from that bucket's graph: eager, a 256-token
        CPM-2 prompt spends most of its time launching kernels from the host."""
        graphable = (self.use_graphs and self.is_t5 and isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2
                     and input_ids.shape[0] == self.batch_size and 0 < input_ids.shape[1] <= self.max_source_length)
        with torch.no_grad(), dependent_launch.within_a_step():
            if not graphable:
                return self.model.encode(input_ids, attention_mask)
            # the checks (a host sync) and the embedding run eagerly, on the real ids and mask
            x, mask = self.model._embed(input_ids, None, attention_mask, "input_ids")
            n = input_ids.shape[1]
            length = next(b for b in self.source_buckets if b >= n)
            if length not in self.encoders:
                self.encoders[length] = self._capture_encoder(length)
            emb, pad_mask, graph, out = self.encoders[length]
            emb[:, n:].zero_()
            emb[:, :n] = x
            pad_mask.zero_()
            pad_mask[:, :n] = mask
            graph.replay()
            return out[:, :n].clone()  # the graph's buffer is overwritten by its next replay

    def _capture_encoder(self, length: int):
        emb = torch.zeros(self.batch_size, length, self.model.config.d_model, dtype=self.dtype, device=self.device)
        mask = torch.ones(self.batch_size, length, dtype=torch.bool, device=self.device)
        # the kernels eager ``encode`` would pick (not fused): a prompt's rows are many, so the graph
        # saves host time, not a choice of kernel, and the numbers stay the eager path's
        graph, out = self._record(lambda: self.model.encode_embeddings(emb, mask), warm_ups=1, fused=False,
                                  compile_also=self._steps_compiled)
        return emb, mask, graph, out

    def decode(self, decoder_input_ids: torch.Tensor, encoder_output: Optional[torch.Tensor] = None, cache=None):
        """T5: ``model.decode(ids, encoder_output, cache=cache)``; after the first call, one-token
        steps (``encoder_output`` not needed) replay a graph."""
        self._own(cache)
        if all(cache.cross.filled) and decoder_input_ids.shape[1] == 1:
            return self._replay(decoder_input_ids)
        if encoder_output is None:
            raise ValueError("the first decode call needs encoder_output")
        pad = self.max_source_length - encoder_output.shape[1]
        encoder_output = F.pad(encoder_output, (0, 0, 0, pad))  # zero rows, masked out
        with torch.no_grad(), dependent_launch.within_a_step():
            if not self._prompt_graph_takes(decoder_input_ids, cache.length == 0 and not any(cache.cross.filled)):
                return self.model.decode(decoder_input_ids, encoder_output, cache=cache)
            # the checks (a host sync) and the embedding eagerly, on the real ids, as encode() does
            x, _ = self.model._embed(decoder_input_ids, None, None, "decoder_input_ids", step=True)
            self.model._check_encoder_output(encoder_output, cache.encoder_mask, self.batch_size)
            logits = self._prompt_replay(("t5", x.shape[1]), [x, encoder_output], self._first_step)
            # what the captured call did on the host: its cache's commit and cross-attention fill
            cache.self_kv.length = x.shape[1]
            cache.cross.filled = [True] * len(cache.cross.filled)
            return logits

    def _first_step(self, emb: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """T5's first decoder step on the empty cache, from embeddings and the padded encoder output. Eager,
        it launched some 1,700 kernels from the host, as long as ten graphed steps for CPM-2: it projects
        the cross-attention keys/values of every layer and runs the prefix."""
        self.cache.self_kv.length = 0
        self.cache.cross.filled = [False] * len(self.cache.cross.filled)
        return self.model.decode(decoder_inputs_embeds=emb, encoder_output=source, cache=self.cache)

    def _prompt_graph_takes(self, ids, empty: bool) -> bool:
        """Whether a prompt's pass of ``ids`` replays a prompt graph: graphs on, the cache ``empty``, and
        (batch_size, width) ids no wider than the cache or ``PROMPT_GRAPH_WIDTH``; else it runs eagerly."""
        return (self.use_graphs and empty and isinstance(ids, torch.Tensor) and ids.dim() == 2
                and ids.shape[0] == self.batch_size and 0 < ids.shape[1] <= min(self.max_length, PROMPT_GRAPH_WIDTH))

    def _prompt_replay(self, key, values: List[torch.Tensor], run) -> torch.Tensor:
        """The output of ``run(*buffers)`` replayed from the graph under ``key`` (captured on first use), on
        ``values`` copied into its static buffers: a prompt's pass on the empty cache (T5's first step,
        GPT's prefill). ``run`` puts the cache's host side back to empty first, so that the warm-up call and
        the capture see the cache the graph replays on; the caller sets it as the pass leaves it. The
        kernels are the ones the eager pass picks (not fused), so the numbers are eager's."""
        if key not in self.prompts:
            buffers = [torch.zeros_like(v) for v in values]
            # the warm-up's writes to the key mask and counts put back before the capture, which runs none
            graph, out = self._record(lambda: run(*buffers), warm_ups=1, fused=False,
                                      after_warm_up=self._step_state())
            self.prompts[key] = buffers, graph, out
        buffers, graph, out = self.prompts[key]
        for buffer, value in zip(buffers, values):
            buffer.copy_(value)
        graph.replay()
        return out.clone()  # the graph's buffer is overwritten by its next replay
