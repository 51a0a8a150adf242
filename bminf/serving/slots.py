"""A server's running rows in fixed slots, each step replayed from a CUDA graph.

The engine's dynamic batch (``batch.join``) builds a new cache whenever rows join or leave, so its
steps run eagerly: CPM-2 spends ~30 ms of host time a token that way, and one client got 9-30 tokens/s
on an H200 where ``GraphedDecoder`` gives the model classes 470. Here the rows live in preallocated
buffers that graphs replay over (``GraphedDecoder``'s static step, with one position per row):

* slot i holds running row i; its keys fill columns [0, its length) (GPT: a prefill's left padding
  included, masked), and it writes its next key at its own column, advanced inside the step;
* rows join by copying their prefilled keys (T5: and cross-attention keys and encoder mask) into the
  slots after the running ones, and leave by moving the last rows into the holes: the running rows
  are always slots [0, n);
* a step replays the graph of the smallest shape that holds them: rows rounded up to a power of two,
  the longest row to a length bucket (64, 128, ...), T5's widest source to a bucket. Slots past n in
  that shape compute rows nobody reads (their positions are kept inside the buffers);
* when a join needs more rows, columns or source positions, ``grown`` makes larger buffers (powers of
  two) and copies the running rows over; the old graphs go with the old buffers.

Measured on an H200 (benchmark/serve.py, CPM-2, 64 tokens a request; h200_run38.log): one streaming
client got 268 tokens/s against 26.4 from the gathered batch in the same run, 16 clients 1822 in
all against 399.

With blocks streamed under a memory limit, a step replays a graph per run of resident blocks and runs
the streamed ones between them (``GraphedDecoder._segmented``): one client under 6 GiB got 35.5-35.7
tokens/s against 20.0-26.1 eagerly (h200_run125_serve_slots_ab.log). Off CUDA (or with
``use_graphs=False``) the same static step runs eagerly: that is what the CPU tests compare with the
model classes.

>>> slots = SlotDecoder(model, rows=4, max_length=256)          # doctest: +SKIP
>>> slots.admit(prefill_cache, 2)                                 # doctest: +SKIP
>>> logits = slots.step(tokens)                                   # doctest: +SKIP  (running rows, vocab)
>>> order = slots.keep([1])                                       # doctest: +SKIP
"""
import logging
import time
from typing import List, Sequence, Tuple

import torch

from ..generation.graphs import GraphedDecoder, buckets_for, power_of_two

__all__ = ["SlotDecoder"]

_log = logging.getLogger("bminf.serving")


class SlotDecoder(GraphedDecoder):
    """Up to ``rows`` running rows of up to ``max_length`` tokens (T5: ``max_source_length`` encoder
    positions), stepped together (see the module doc). ``lengths`` (and T5's ``sources``) say, per
    running row, how many columns (source positions) it fills."""

    def __init__(self, model: torch.nn.Module, rows: int, max_length: int, max_source_length: int = 64,
                 use_graphs=None):
        super().__init__(model, rows, max_length, max_source_length, use_graphs=use_graphs)
        self.pos = torch.zeros(rows, dtype=torch.long, device=self.device)  # each row's next column
        self.row_buckets = buckets_for(rows, smallest=1)
        self.lengths: List[int] = []
        self.sources: List[int] = []
        if self.is_t5:
            self.cache.cross.filled = [True] * len(self.cache.cross.filled)  # the steps read the buffers

    @property
    def running(self) -> int:
        return len(self.lengths)

    def fits(self, rows: int, columns: int, source: int = 0) -> bool:
        return rows <= self.batch_size and columns <= self.max_length and source <= self.max_source_length

    # -- rows joining and leaving -----------------------------------------------------------------
    def admit(self, cache, rows: int) -> None:
        """Put the ``rows`` rows of a prefill's ``cache`` (``batch.prefill``) after the running rows:
        GPT, a ``KVCache`` whose rows end at its length; T5, a ``T5Cache`` after its first decoder step."""
        length = (cache.self_kv if self.is_t5 else cache).length
        source = cache.cross.k[0].shape[2] if self.is_t5 else 0
        pos = torch.full((rows,), length, dtype=torch.long, device=self.device)
        self._copy_in(cache, torch.arange(rows, device=self.device), length, source, pos)
        self.lengths += [length] * rows
        self.sources += [source] * rows if self.is_t5 else []

    @classmethod
    def sized(cls, model: torch.nn.Module, rows: int, columns: int, source: int = 0,
              use_graphs=None) -> "SlotDecoder":
        """Empty slots for ``rows`` rows of ``columns`` columns (T5: and ``source`` source positions), the
        lengths rounded up to a power of two from 64 within the model's limits (ValueError past them)."""
        config = model.config
        columns = _length(columns, getattr(config, "max_positions", None) or getattr(config, "max_length", None))
        extra = dict(max_source_length=_length(source, config.max_length)) if hasattr(model, "dec_layers") else {}
        return cls(model, rows, columns, use_graphs=use_graphs, **extra)

    def grown(self, rows: int, columns: int, source: int = 0) -> "SlotDecoder":
        """Slots of ``rows`` rows (at least the running ones) and at least this one's lengths that hold
        ``columns`` columns (and ``source`` source positions; see ``sized``), with the running rows
        copied to the same slots."""
        if rows < self.running:
            raise ValueError(f"{rows} slots cannot hold the {self.running} running rows")
        t5 = self.is_t5
        big = self.sized(self.model, rows, max(columns, self.max_length),
                         max(source, self.max_source_length) if t5 else 0, self.use_graphs)
        n = self.running
        if n:
            big._copy_in(self.cache, torch.arange(n, device=self.device), max(self.lengths),
                         max(self.sources) if t5 else 0, self.pos[:n])
        big.lengths, big.sources = list(self.lengths), list(self.sources)
        return big

    def _copy_in(self, cache, index: torch.Tensor, columns: int, source: int, pos: torch.Tensor) -> None:
        # rows `index` of another cache (GPT: a KVCache, T5: a T5Cache) into the slots after the running
        # ones, their first `columns` columns (and `source` cross-attention positions): one copy per
        # buffer, not one per row
        kv = cache.self_kv if self.is_t5 else cache
        n, k = self.running, len(index)
        if not self.fits(n + k, columns, source):
            raise ValueError(f"{n + k} rows of {columns} columns and {source} source positions do not fit slots "
                             f"of {self.batch_size} x {self.max_length} x {self.max_source_length}")
        put, mine = slice(n, n + k), self._kv()
        for layer in range(len(mine.k)):
            mine.k[layer][put, :, :columns] = kv.k[layer][index, :, :columns]
            mine.v[layer][put, :, :columns] = kv.v[layer][index, :, :columns]
        mine.key_mask[put] = False
        mine.key_mask[put, :columns] = kv.key_mask[index, :columns]
        mine.n_valid[put] = kv.n_valid[index]
        self.pos[put] = pos
        if self.is_t5:
            for layer in range(len(mine.k)):
                self.cache.cross.k[layer][put, :, :source] = cache.cross.k[layer][index, :, :source]
                self.cache.cross.v[layer][put, :, :source] = cache.cross.v[layer][index, :, :source]
            self.cache.encoder_mask[put] = False
            self.cache.encoder_mask[put, :source] = cache.encoder_mask[index, :source]

    def keep(self, rows: Sequence[int]) -> List[int]:
        """Keep the running rows ``rows`` (ascending) and drop the others. The last kept rows move into
        the holes, so the kept ones are slots [0, len(rows)) after; returns, for each such slot, the
        row it held before."""
        rows = list(rows)
        if rows != sorted(set(rows)) or (rows and not 0 <= rows[0] <= rows[-1] < self.running):
            raise ValueError(f"keep takes ascending running rows (0 to {self.running - 1}), got {rows}")
        kept, m = set(rows), len(rows)
        holes = [i for i in range(m) if i not in kept]
        movers = [i for i in range(m, self.running) if i in kept]
        order = list(range(m))
        for hole, row in zip(holes, movers):
            self._move(row, hole)
            order[hole] = row
        self.lengths = [self.lengths[i] for i in order]
        self.sources = [self.sources[i] for i in order] if self.is_t5 else []
        return order

    def _move(self, row: int, slot: int) -> None:
        kv, used = self._kv(), self.lengths[row]
        for layer in range(len(kv.k)):
            kv.k[layer][slot, :, :used] = kv.k[layer][row, :, :used]
            kv.v[layer][slot, :, :used] = kv.v[layer][row, :, :used]
        for t in (kv.key_mask, kv.n_valid, self.pos):
            t[slot] = t[row]
        if self.is_t5:
            source, cross = self.sources[row], self.cache.cross
            for layer in range(len(cross.k)):
                cross.k[layer][slot, :, :source] = cross.k[layer][row, :, :source]
                cross.v[layer][slot, :, :source] = cross.v[layer][row, :, :source]
            self.cache.encoder_mask[slot] = self.cache.encoder_mask[row]

    def warm_up(self) -> float:
        """Capture the step of every row bucket at the shortest length (and source) now; returns seconds."""
        if not self.use_graphs:
            return 0.0
        start = time.perf_counter()
        for rows in self.row_buckets:
            key = (rows, self.buckets[0], self.source_buckets[0] if self.is_t5 else 0)
            if key not in self.graphs:
                self.graphs[key] = self._capture_slots(key)
        torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def _capture_slots(self, key: Tuple[int, int, int]):
        start = time.perf_counter()
        graph = self._record(lambda: self._keyed_step(key), warm_ups=2, fused=True, after_warm_up=self._step_state())
        self._captured(key, start)
        return graph

    def _capture_segments(self, key: Tuple[int, int, int], plan: Tuple[int, ...]):
        start = time.perf_counter()
        pieces = super()._capture_segments(key, plan)
        if pieces is not None:
            graphs = sum(p[0] is not None for p in pieces)
            self._captured(key, start, f" ({graphs} graphs around {len(plan)} streamed blocks)")
        return pieces

    def _captured(self, key: Tuple[int, int, int], start: float, detail: str = "") -> None:
        # benchmark/serve.py counts these lines (the captures during a timed wave)
        _log.info("captured the decode step of %d rows, %d tokens%s in %.2f s%s", key[0], key[1],
                  f", {key[2]} source tokens" if self.is_t5 else "", time.perf_counter() - start, detail)

    def clear(self) -> None:
        """No running rows (the buffers and graphs stay for the next ones)."""
        self.lengths, self.sources = [], []

    # -- the step ---------------------------------------------------------------------------------
    def can_step(self) -> bool:
        """Whether every running row has a column left for one more token."""
        return bool(self.lengths) and max(self.lengths) < self.max_length

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per running row (rows,); returns their next logits (rows, vocab)."""
        n = self.running
        if n == 0 or tokens.shape != (n,):
            raise ValueError(f"a step takes one token per running row ({n}), got shape {tuple(tokens.shape)}")
        if max(self.lengths) >= self.max_length:
            raise ValueError(f"a row of {max(self.lengths) + 1} tokens exceeds the slots' {self.max_length}")
        key = self._shape()
        self.ids[:n, 0].copy_(tokens)
        out = self._run(key, lambda: self._capture_slots(key), lambda: self._keyed_step(key))
        self.lengths = [length + 1 for length in self.lengths]
        return out[:n, -1].clone()  # the graph's output buffer is overwritten by the next replay

    def _shape(self) -> Tuple[int, int, int]:
        """(rows, length, source) of the graph that holds the running rows."""
        rows = next(b for b in self.row_buckets if b >= self.running)
        length = next(b for b in self.buckets if b > max(self.lengths))
        source = next(b for b in self.source_buckets if b >= max(self.sources)) if self.is_t5 else 0
        return rows, length, source

    def _parts(self, key: Tuple[int, int, int]) -> tuple:
        # the first `rows` slots (T5: and `source` positions of cross-attention) as a cache of their own
        rows, length, source = key
        kv = self._kv().rows(rows)
        view = kv
        if self.is_t5:
            c = self.cache
            view = type(c)(kv, c.cross.rows(rows, source), c.encoder_mask[:rows, :source])
        return view, self.ids[:rows], self.pos[:rows], length

    def _finish(self, parts: tuple) -> None:
        # the next column; slots past the running rows (computed, never read) stay inside the buffers
        kv = parts[0].self_kv if self.is_t5 else parts[0]
        parts[2].add_(1).clamp_(max=self.max_length - 1)
        kv.n_valid.clamp_(max=self.max_length - 1)

    def _step_state(self):
        put_back, saved = super()._step_state(), self.pos.clone()

        def with_positions():
            put_back()
            self.pos.copy_(saved)
        return with_positions


def _length(n: int, cap) -> int:
    """The next power of two from 64, at most ``cap`` (the model's limit), at least ``n``."""
    size = max(64, power_of_two(n))
    size = min(size, cap) if cap else size
    if size < n:
        raise ValueError(f"{n} positions exceed the model's limit of {cap}")
    return size


