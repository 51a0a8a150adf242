"""The rows a server decodes together, as caches a backbone can step: prefill new rows, let them join,
let finished rows leave. The engine decides which rows; this module only moves their caches.

A batch of rows is a cache plus the logits of each row's next token. New rows are prefilled together
in their own small cache (``prefill``), then ``join`` gathers the running rows and the new ones into
one cache whose write column is shared; padding columns are masked and positions count real tokens,
so each row attends to what it would alone.

>>> state = prefill(backbone, [[5, 6, 7]], prefixes=None)         # doctest: +SKIP  (a GPT backbone)
>>> state = join([(state, [0])], room=16)                          # doctest: +SKIP
>>> logits = step(backbone, state, torch.tensor([8]))               # doctest: +SKIP
"""
from collections import OrderedDict
from typing import List, Optional, Sequence, Tuple

import torch

from ..generation import pad_rows
from ..generation.graphs import PROMPT_GRAPH_WIDTH, GraphedDecoder, power_of_two, prompt_width
from ..generation.loop import home_device, input_embedding
from ..layers import CrossKVCache, KVCache

__all__ = ["home_device", "prefill", "GraphedPrefill", "join", "step", "cache_bytes", "state_bytes", "prefill_bytes"]


def _is_t5(backbone) -> bool:
    return hasattr(backbone, "encode")


def prefill(backbone, sources: Sequence[Sequence[int]], prefixes: Optional[Sequence[Sequence[int]]]):
    """Run the prompts of new rows together; returns ``(cache, logits)``, logits (rows, vocab) of each
    row's first new token.

    GPT: ``sources`` are the prompts, left-padded so each row's last token lands in the last column.
    T5: ``sources`` are encoded (right-padded, masked) and ``prefixes`` (one per row, all the same
    length) start the decoder, as ``T5Runner`` does for one shared prefix.
    """
    device = home_device(backbone)
    if not _is_t5(backbone):
        ids, mask = pad_rows(sources, left=True, device=device)
        cache = backbone.new_cache(len(sources), ids.shape[1])
        return cache, backbone(ids, attention_mask=mask, cache=cache)[:, -1]
    ids, mask = pad_rows(sources, left=False, device=device)
    prefix = torch.as_tensor([list(p) for p in prefixes], dtype=torch.long, device=device)
    cache = backbone.new_cache(mask, max_length=prefix.shape[1])
    encoded = backbone.encode(ids, mask)
    return cache, backbone.decode(prefix, encoded, cache=cache)[:, -1]


class GraphedPrefill:
    """``prefill`` of one new row from CUDA graphs, for a backbone resident on one GPU: a
    ``GraphedDecoder`` per shape (GPT: the prompt width, padded to a power of two from 8; T5: the
    decoder prefix's length and the source, padded to a power of two from 64) replays T5's encoder and
    first decoder step, or GPT's prefill. Eagerly, CPM-2's encoder and first step launched some 2,000
    kernels from the host: most of a request's time to its first token (one client on an H200, run 102:
    16-18 ms against 92, and 342-364 tokens/s against 246 over 64 tokens). Several rows joining at once
    run ``prefill`` eagerly: with a graph per row count, new counts kept coming and each waited for its
    capture (4 clients waited 0.50-0.64 s for their first tokens against 0.17-0.25). So do shapes past
    the widths a prompt graph takes. The returned cache is the decoder's own, valid until the next
    prefill of the same shape (the engine copies it into its slots first). The two most recently used
    decoders are kept, with their caches and graphs.

    >>> prefills = GraphedPrefill(backbone)                          # doctest: +SKIP
    >>> cache, logits = prefills([[5, 6, 7]], prefixes=None)          # doctest: +SKIP
    """

    # T5 sources past this run eagerly: a graph keeps its activations, and the encoder's attention
    # scores grow with the square of the source (64 heads x 512^2 x 2 bytes = 32 MiB a row here)
    MAX_SOURCE = 512

    def __init__(self, backbone, keep: int = 2):
        self.backbone, self.keep = backbone, keep
        self.decoders: "OrderedDict[tuple, GraphedDecoder]" = OrderedDict()

    def _decoder(self, key: tuple, make) -> "GraphedDecoder":
        decoder = self.decoders.pop(key, None)
        if decoder is None:
            while len(self.decoders) >= self.keep:
                self.decoders.popitem(last=False)
            decoder = make()
        self.decoders[key] = decoder
        return decoder

    def __call__(self, sources: Sequence[Sequence[int]], prefixes: Optional[Sequence[Sequence[int]]]):
        rows, longest, b = len(sources), max(len(s) for s in sources), self.backbone
        if rows != 1:
            return prefill(b, sources, prefixes)
        if not _is_t5(b):
            width = prompt_width(longest)
            if width is None or width > b.config.max_positions:
                return prefill(b, sources, prefixes)
            decoder = self._decoder((rows, width), lambda: GraphedDecoder(b, rows, width))
            ids, mask = pad_rows(sources, left=True, device=decoder.device, width=width)
            cache = decoder.new_cache()
            return cache, decoder(ids, attention_mask=mask, cache=cache)[:, -1]
        source, start = power_of_two(max(longest, 64)), len(prefixes[0])
        if source > min(self.MAX_SOURCE, b.config.max_length) or start > PROMPT_GRAPH_WIDTH:
            return prefill(b, sources, prefixes)
        decoder = self._decoder((rows, start, source),
                                lambda: GraphedDecoder(b, rows, start, max_source_length=source))
        ids, mask = pad_rows(sources, left=False, device=decoder.device)
        prefix = torch.as_tensor([list(p) for p in prefixes], dtype=torch.long, device=decoder.device)
        cache = decoder.new_cache(mask)
        return cache, decoder.decode(prefix, decoder.encode(ids, mask), cache=cache)[:, -1]


def cache_bytes(backbone, rows: int, columns: int, source: int = 0) -> int:
    """Bytes of the caches of ``rows`` rows with ``columns`` decoder positions (T5: and ``source``
    encoder positions of cross-attention keys/values)."""
    c = backbone.config
    elem = input_embedding(backbone).weight.element_size()
    layers = c.n_decoder_layers if _is_t5(backbone) else c.n_layers
    return 2 * layers * rows * c.n_heads * c.d_head * elem * (columns + (source if _is_t5(backbone) else 0))


def state_bytes(cache) -> int:
    """Bytes a running batch's caches hold (``None``: no batch)."""
    if cache is None:
        return 0
    parts = (cache.self_kv, cache.cross) if hasattr(cache, "cross") else (cache,)
    return sum(t.numel() * t.element_size() for p in parts for t in (*p.k, *p.v))


def prefill_bytes(backbone, rows: int, source: int, prefix: int = 0) -> int:
    """A generous bound on the activations a prefill of ``rows`` prompts of ``source`` tokens holds at
    once: a few hidden-state-wide tensors and the feed-forward's wide ones per token, the attention
    bias and scores (rows x heads x source^2), and the logits of every position fed to the LM head
    (GPT: the whole prompt; T5: the decoder prefix)."""
    c = backbone.config
    elem = input_embedding(backbone).weight.element_size()
    tokens = rows * source
    hidden = tokens * (3 * c.d_ff + 8 * c.d_model) * elem
    scores = 2 * rows * c.n_heads * source * source * elem
    logits = rows * (max(prefix, 1) if _is_t5(backbone) else source) * c.vocab_size * 4
    return hidden + scores + logits


def join(parts: Sequence[Tuple[object, Sequence[int]]], room: int):
    """One cache holding, in order, the rows ``rows`` of each ``(cache, rows)`` in ``parts`` (GPT's
    ``KVCache`` or T5's ``T5Cache``), with ``room`` free decoder columns."""
    caches = [c for c, _ in parts]
    if isinstance(caches[0], KVCache):
        return KVCache.gather(parts, room)
    from ..models.t5 import T5Cache

    self_kv = KVCache.gather([(c.self_kv, rows) for c, rows in parts], room)
    cross = CrossKVCache.gather([(c.cross, rows) for c, rows in parts])
    source = cross.k[0].shape[2]
    masks: List[torch.Tensor] = []
    for cache, rows in parts:
        m = cache.encoder_mask[list(rows)]
        masks.append(torch.nn.functional.pad(m, (0, source - m.shape[1]), value=False))
    return T5Cache(self_kv, cross, torch.cat(masks))


def step(backbone, cache, tokens: torch.Tensor) -> torch.Tensor:
    """Feed one token per row (rows,); returns the next logits (rows, vocab)."""
    tokens = tokens.to(home_device(backbone))[:, None]
    if _is_t5(backbone):
        return backbone.decode(tokens, cache=cache)[:, -1]
    return backbone(tokens, cache=cache)[:, -1]
