"""The batching engine: one model, one decode loop on one worker thread, requests joining and leaving
the running batch between steps (continuous batching). No HTTP here.

Each request is a ``Job``: its prompt ids, a row (``TextRow`` or ``BlankRow``: its stop rules and
text), its sampling parameters and a ``sink`` that receives what happens to it, from the worker
thread. Every step the engine samples one token for each row with the row's own parameters and
generator, pushes it to the row, drops rows that finished or were cancelled, steps the model once for
the rest, and then prefills the jobs that arrived and joins them to the batch. A row's tokens are
those it gets alone: its cache holds exactly its own keys, positions count its real tokens, and its
generator is seeded from its own seed.

Where the backbone is on one GPU, the running rows live in fixed slots and every step replays a CUDA
graph (``slots.SlotDecoder``), or, with blocks streamed under a memory limit, a graph per run of
resident blocks with the streamed ones run eagerly between them (``GraphedDecoder._segmented``);
elsewhere (the CPU, a model split across GPUs) a new cache is gathered whenever rows join or leave
(``batch.join``) and the steps run eagerly. Both give each row the tokens it gets alone.

>>> engine = Engine(cpm2.backbone, max_batch=16).start()              # doctest: +SKIP
>>> engine.submit(Job(source, prefix, row, params, vocab_size, sink=print))  # doctest: +SKIP
"""
import functools
import logging
import queue
import random
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ..generation import SamplingParams, ban_ids, count_ids
from ..generation.sampling import draw, on_device
from ..generation.graphs import _splits, _streams_or_splits, power_of_two
from ..generation.loop import _Fetch
from ..offload import TransformerBlockList
from . import batch
from .slots import SlotDecoder, _length

__all__ = ["Job", "Engine", "ShuttingDown"]

_log = logging.getLogger("bminf.serving")


class ShuttingDown(RuntimeError):
    """The engine stopped before the job finished."""


class Job:
    """One sequence to generate. ``sink(kind, value)`` is called from the worker thread with
    ``("output", what row.push returned)``, then once ``("done", None)`` or ``("error", exception)``.
    ``cancel()`` (any thread) frees the job's slot at the next step, with no further call to ``sink``.

    ``source``: the prompt (GPT) or encoder input (T5) ids; ``prefix``: the T5 decoder's start ids
    (None for GPT). ``no_penalty`` ids are never counted for the penalties; ``filtered`` ids are never
    sampled -- both as the model's task methods pass them to ``decode``.
    """

    def __init__(self, source: Sequence[int], prefix: Optional[Sequence[int]], row, params: SamplingParams,
                 vocab_size: int, sink: Callable[[str, object], None], no_penalty: Sequence[int] = (),
                 filtered: Sequence[int] = ()):
        self.source, self.prefix, self.row, self.params = list(source), prefix, row, params
        self.vocab_size, self.sink = vocab_size, sink
        self.no_penalty, self.filtered = list(no_penalty), list(filtered)
        self.produced = 0          # tokens sampled for this job
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def remaining(self) -> int:
        return self.params.max_tokens - self.produced


class _Slot:
    """A job's run state in the batch: generator, penalty counts, and the ids it may never take."""

    def __init__(self, job: Job, device: torch.device):
        self.job = job
        params, vocab = job.params, job.vocab_size
        self.generator = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            seed = params.seed if params.seed is not None else random.SystemRandom().randrange(2**63)
            self.generator.manual_seed(seed)
        penalized = params.frequency_penalty != 0 or params.presence_penalty != 0
        self.counts = count_ids([job.source], vocab, job.no_penalty, device) if penalized else None
        self.exempt = set(job.no_penalty)
        # on the device: a step stacks the rows' masks there instead of copying them over each time
        self.ban = torch.zeros(vocab, dtype=torch.bool, device=device)
        self.ban[job.filtered] = True
        p = params
        self.key = (p.temperature, p.top_n, p.top_p, p.frequency_penalty, p.presence_penalty)


def _last_token(job: Job) -> bool:
    """Whether the token sampled now ends ``job`` whatever it is (its count), or it is cancelled."""
    return job.cancelled or job.row.done or job.produced + 1 >= job.params.max_tokens


class Engine:
    """Owns ``backbone`` (a GPT or T5 from a model class) and decodes up to ``max_batch`` jobs at once
    on one worker thread. ``start()`` starts it, ``stop()`` ends it: jobs still waiting or running get
    ``("error", ShuttingDown)``.

    ``slots``: None (default) keeps the running rows in fixed slots stepped from CUDA graphs where the
    backbone is on one GPU (resident, or streaming blocks under a memory limit), else gathers a new
    cache as rows come and go (see the module doc); True takes the fixed slots wherever the decoder is
    on one device (off CUDA their step runs eagerly: the CPU tests), False never. ``fixed_slots`` says
    which the engine took."""

    def __init__(self, backbone: torch.nn.Module, max_batch: int = 16, slots: Optional[bool] = None):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        if slots not in (None, True, False):
            raise TypeError(f"slots must be None, True or False, got {slots!r}")
        self.backbone, self.max_batch = backbone, max_batch
        self.device = batch.home_device(backbone)
        # block lists under a memory limit: their reserve must cover the batch's caches (see _make_room)
        self._budgets = [m for m in backbone.modules() if isinstance(m, TransformerBlockList)]
        layers = backbone.dec_layers if hasattr(backbone, "dec_layers") else backbone.layers
        if slots and _splits(layers):
            raise ValueError("fixed slots need a decoder on one device, not split across GPUs")
        self.fixed_slots = self.device.type == "cuda" and not _splits(layers) if slots is None else slots
        self._fixed: Optional[SlotDecoder] = None  # the fixed slots, made at the first join
        # new rows' prompts from CUDA graphs where the whole step replays one too (see batch.GraphedPrefill);
        # with blocks streaming, prompts run eagerly, as GraphedDecoder's do
        resident = not self._budgets and not _streams_or_splits(layers)
        self._graphed = self.fixed_slots and self.device.type == "cuda" and resident
        self._prefill = batch.GraphedPrefill(backbone) if self._graphed else functools.partial(batch.prefill, backbone)
        self._inbox: "queue.Queue[Optional[Job]]" = queue.Queue()
        self._slots: List[_Slot] = []
        self._cache = None
        self._logits: Optional[torch.Tensor] = None  # (rows, vocab): each row's next-token logits
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bminf-engine", daemon=True)
        self.steps = 0              # decode steps run (for /health and the benchmark)

    # -- any thread -------------------------------------------------------------------------------
    def start(self) -> "Engine":
        self._thread.start()
        return self

    def submit(self, job: Job) -> None:
        """Queue ``job``; it joins the running batch at the next step that has a free slot."""
        if self._stopping.is_set():
            raise ShuttingDown("the server is shutting down")
        self._inbox.put(job)

    def stats(self) -> Dict[str, object]:
        out = {"running": len(self._slots), "waiting": self._inbox.qsize(), "max_batch": self.max_batch,
               "steps": self.steps, "cuda_graphs": self._fixed.graph_count() if self._fixed is not None else 0}
        if self.device.type == "cuda":  # what a memory budget is checked against
            out["gpu_allocated_gib"] = round(torch.cuda.memory_allocated(self.device) / 2**30, 3)
            out["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
        return out

    def warm_up(self) -> float:
        """Before ``start()``: with CUDA graphs, capture the step of every batch size the slots round to
        (1, 2, 4, ... ``max_batch``), which compiles their kernels, so that the first requests do not
        wait for that. Returns the seconds it took (0 without graphs, and with blocks streaming: their
        slots are sized by the first requests, within the budget, and capture then)."""
        if self._thread.is_alive():
            raise RuntimeError("warm_up() runs before start()")
        if not self._graphed:
            return 0.0
        start = time.perf_counter()
        with torch.inference_mode():
            self._fixed = SlotDecoder.sized(self.backbone, self.max_batch, 1, 1)
            self._fixed.warm_up()
        seconds = time.perf_counter() - start
        _log.info("captured the decode step for batches of %s rows in %.1f s",
                  ", ".join(map(str, self._fixed.row_buckets)), seconds)
        return seconds

    def stop(self, timeout: Optional[float] = None) -> None:
        self._stopping.set()
        self._inbox.put(None)  # wakes an idle worker
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the worker thread ------------------------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():
            while not self._stopping.is_set():
                try:
                    self._admit(self._take_new())
                    if self._slots:
                        self._step()
                except Exception as exc:  # noqa: BLE001 -- a failed step fails its jobs, never the server
                    _log.exception("decode step failed; failing the %d running jobs", len(self._slots))
                    self._fail_all(exc)
        self._fail_all(ShuttingDown("the server shut down before this request finished"))
        while True:
            try:
                job = self._inbox.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.sink("error", ShuttingDown("the server shut down before this request started"))

    def _take_new(self) -> List[Job]:
        """Jobs that fit in the free slots; waits (briefly, to notice ``stop``) when nothing runs."""
        new: List[Job] = []
        free = self.max_batch - len(self._slots)
        while len(new) < free:
            try:
                job = self._inbox.get(timeout=0.2) if not self._slots and not new else self._inbox.get_nowait()
            except queue.Empty:
                break
            if job is None:
                break
            if job.cancelled:
                continue
            if job.row.done:  # max_tokens == 0: nothing to generate
                job.sink("done", None)
                continue
            new.append(job)
        return new

    def _admit(self, new: List[Job]) -> None:
        if not new:
            return
        # T5 prefixes of one prefill must have one length (CPM-2's tasks and EVA's each have one)
        groups: Dict[int, List[Job]] = {}
        for job in new:
            groups.setdefault(len(job.prefix or ()), []).append(job)
        self._make_room(new)
        parts, logits, slots = [], [], list(self._slots)
        for jobs in groups.values():
            prefixes = [j.prefix for j in jobs] if jobs[0].prefix is not None else None
            try:
                cache, first = self._prefill([j.source for j in jobs], prefixes)
            except Exception as exc:  # noqa: BLE001 -- these jobs fail; the running batch is untouched
                _log.exception("prefill of %d new jobs failed", len(jobs))
                for job in jobs:
                    job.sink("error", exc)
                continue
            parts.append((cache, range(len(jobs))))
            logits.append(first)
            slots += [_Slot(j, first.device) for j in jobs]
        if not parts:
            return
        try:
            if self.fixed_slots:
                self._join_slots(parts, slots)
            else:
                running = [(self._cache, range(len(self._slots)))] if self._slots else []
                self._cache = batch.join(running + parts, max(s.job.remaining for s in slots))
        except Exception as exc:  # noqa: BLE001 -- e.g. out of memory: the new jobs fail, the batch goes on
            _log.exception("joining %d new jobs to the batch failed", len(slots) - len(self._slots))
            for slot in slots[len(self._slots):]:
                slot.job.sink("error", exc)
            return
        self._logits = torch.cat(([self._logits] if self._slots else []) + logits)
        self._slots = slots

    def _join_slots(self, parts, slots: List[_Slot]) -> None:
        """The prefilled ``parts`` into the slots after the running rows, the slots grown first when
        the rows, a row's length to come, or a source would not fit."""
        t5 = hasattr(parts[0][0], "cross")
        # no local reference to the slots: _resized may free the old ones before making new ones
        lengths = list(self._fixed.lengths) if self._fixed is not None else []
        for cache, rows in parts:
            lengths += [(cache.self_kv if t5 else cache).length] * len(rows)
        columns = max(length + s.job.remaining for length, s in zip(lengths, slots))
        running_sources = self._fixed.sources if self._fixed is not None else []
        source = max([cache.cross.k[0].shape[2] for cache, _ in parts] + running_sources) if t5 else 0
        if self._fixed is None or not self._fixed.fits(len(slots), columns, source):
            self._fixed = self._resized(min(self.max_batch, power_of_two(len(slots))), columns, source)
            _log.info("decode slots: %d rows of %d tokens%s", self._fixed.batch_size, self._fixed.max_length,
                      f", {self._fixed.max_source_length} source tokens" if t5 else "")
        for cache, rows in parts:
            self._fixed.admit(cache, len(rows))

    def _resized(self, rows: int, columns: int, source: int) -> SlotDecoder:
        """Slots that hold ``rows`` rows of ``columns`` columns (T5: ``source`` source positions), the
        running rows copied in. They keep the current slots' rows where memory allows (a shape the
        graphs had), else take ``rows``; without running rows the old buffers go first."""
        old = self._fixed
        choices = [rows] if old is None else list(dict.fromkeys([max(rows, old.batch_size), rows]))
        if old is not None and not old.running:  # nothing to copy: free the old buffers first
            columns, source = max(columns, old.max_length), max(source, old.max_source_length if old.is_t5 else 0)
            self._fixed = old = None

        def make(n: int) -> SlotDecoder:
            if old is None:
                return SlotDecoder.sized(self.backbone, n, columns, source)
            return old.grown(n, columns, source)

        if len(choices) > 1:
            try:
                return make(choices[0])
            except torch.cuda.OutOfMemoryError:
                _log.warning("no memory for %d decode slots of %d tokens; trying %d", choices[0], columns, choices[-1])
        return make(choices[-1])

    def _make_room(self, new: List[Job]) -> None:
        """Before new rows are prefilled and joined: grow the budget's reserve (blocks move to host
        memory) to cover what is alive at once then, the running batch's caches (or slots), the new rows'
        own, the joined ones and the largest prefill's activations, so that a memory limit holds during
        that pass, not only after it (the offload core's check after a pass catches the rest)."""
        if not self._budgets:
            return
        b, t5 = self.backbone, new[0].prefix is not None
        rows = len(self._slots) + len(new)
        longest = max(len(j.source) for j in new)
        first = max(len(j.prefix) for j in new) if t5 else longest  # columns the prefill fills
        if self.fixed_slots:
            lengths = self._fixed.lengths if self._fixed is not None else []
            columns = max([n + s.job.remaining for n, s in zip(lengths, self._slots)] +
                          [first + j.remaining for j in new])
            sources = self._fixed.sources if self._fixed is not None else []
            held = self._slot_bytes(rows, columns, max(sources + [longest]) if t5 else 0)
        else:
            room = max([s.job.remaining for s in self._slots] + [j.params.max_tokens for j in new])
            old = self._cache.self_kv if t5 and self._cache is not None else self._cache
            old_columns = old.max_length if old is not None else 0
            old_source = self._cache.cross.k[0].shape[2] if t5 and self._cache is not None else 0
            held = (batch.state_bytes(self._cache)
                    + batch.cache_bytes(b, rows, max(old_columns, first) + room, max(old_source, longest)))
        need = (held + batch.cache_bytes(b, len(new), first, longest)
                + batch.prefill_bytes(b, len(new), longest, first if t5 else 0))
        for blocks in self._budgets:
            blocks.reserve_at_least(need)

    def _slot_bytes(self, rows: int, columns: int, source: int) -> int:
        """Bytes the fixed slots hold once ``rows`` rows of up to ``columns`` columns (and ``source``
        source positions) join: the current slots, and where they must grow (``_join_slots``) the new
        ones too, both alive while the running rows are copied over. Lengths are rounded up as
        ``SlotDecoder.sized`` rounds them (within the model's limits: at most this)."""
        old = self._fixed
        held = batch.state_bytes(old.cache) if old is not None else 0
        if old is not None and old.fits(rows, columns, source):
            return held
        n = min(self.max_batch, power_of_two(rows))
        if old is not None:
            n, columns = max(n, old.batch_size), max(columns, old.max_length)
            source = max(source, old.max_source_length) if source else 0
        # rounded without the model's cap, which only lowers them
        source = _length(source, None) if source else 0
        return held + batch.cache_bytes(self.backbone, n, _length(columns, None), source)

    def _sample(self) -> torch.Tensor:
        """One token per row, each group of rows with equal parameters sampled together."""
        logits = self._logits
        # what each row bans always, and this step only (fill-blank's other sentinels)
        ban = ban_ids(torch.stack([s.ban for s in self._slots]), [s.job.row.banned() or () for s in self._slots])
        groups: Dict[tuple, List[int]] = {}
        for i, s in enumerate(self._slots):
            groups.setdefault(s.key, []).append(i)
        if len(groups) == 1:  # every row alike (one client, or clients of one setting): no indexing
            return self._sample_rows(self._slots, logits, ban)
        tokens = torch.empty(len(self._slots), dtype=torch.long, device=logits.device)
        for rows in groups.values():
            index = on_device(rows, logits.device)
            tokens[index] = self._sample_rows([self._slots[i] for i in rows], logits[index], ban[index])
        return tokens

    @staticmethod
    def _sample_rows(slots: List[_Slot], logits: torch.Tensor, ban: torch.Tensor) -> torch.Tensor:
        params = slots[0].job.params
        counts = torch.cat([s.counts for s in slots]) if slots[0].counts is not None else None
        gens = None if params.greedy else [s.generator for s in slots]
        return draw(logits, params, counts, ban, gens)  # -1: nothing to sample, checked in _step

    def _step(self) -> None:
        tokens = self._sample()
        fetch = _Fetch(len(tokens), tokens.device)
        tokens = fetch.start(tokens, greedy=all(s.job.params.greedy for s in self._slots))
        # With fixed slots the next step starts before the host reads the tokens (see generation.loop):
        # pushing text to the rows and their clients overlaps it. Finished rows are stepped too and
        # dropped after; not when every row ends with this token by its count, nor past the slots.
        ahead = None
        if self.fixed_slots and self._fixed.can_step() and not all(_last_token(s.job) for s in self._slots):
            ahead = self._fixed.step(tokens)
            self.steps += 1
        keep = []
        # a row with nothing to sample raises in values(): _loop fails the running jobs
        for i, (slot, token) in enumerate(zip(self._slots, fetch.values())):
            job = slot.job
            if job.cancelled:
                continue
            job.produced += 1
            out = job.row.push(token)
            if out:
                job.sink("output", out)
            if slot.counts is not None and token not in slot.exempt:
                slot.counts[0, token] += 1
            if job.row.done or job.produced >= job.params.max_tokens:
                job.sink("done", None)
            elif not job.cancelled:
                keep.append(i)
        if len(keep) < len(self._slots):
            if self.fixed_slots:
                keep = self._fixed.keep(keep)  # the rows kept, in their new order
            self._slots = [self._slots[i] for i in keep]
            if not keep:
                self._cache = self._logits = None
                return
            if not self.fixed_slots:
                self._cache = batch.join([(self._cache, keep)], room=max(s.job.remaining for s in self._slots))
            kept = torch.as_tensor(keep, device=tokens.device)
            if ahead is not None:
                ahead = ahead[kept]
            else:
                tokens = tokens[kept]
        if ahead is not None:
            self._logits = ahead
            return
        if self.fixed_slots:
            self._logits = self._fixed.step(tokens)
        else:
            self._logits = batch.step(self.backbone, self._cache, tokens)
        self.steps += 1

    def _fail_all(self, exc: BaseException) -> None:
        for slot in self._slots:
            if not slot.job.cancelled:
                slot.job.sink("error", exc)
        self._slots, self._cache, self._logits = [], None, None
        if self._fixed is not None:
            self._fixed.clear()
