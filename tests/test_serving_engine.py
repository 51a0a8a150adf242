"""The batching engine without HTTP: rows that join a running batch, leave it or are cancelled get
exactly the tokens they get alone from the model classes, with the running rows in fixed slots (the
step CUDA graphs replay; eager here) and with a cache gathered as rows come and go."""
import queue
import threading

import pytest
import torch

import bminf

pytest.importorskip("pydantic")  # bminf.serving.protocol's schemas (the `server` and `test` extras)
from bminf.generation import SamplingParams
from bminf.layers import CrossKVCache, KVCache
from bminf.serving import batch
from bminf.serving.engine import Engine, Job
from bminf.serving.protocol import ChatRequest, CompletionRequest
from bminf.serving.tasks import FilledText, chat_tasks, completion_tasks


@pytest.fixture(scope="module")
def cpm1():
    return bminf.models.CPM1(version="cpm1-demo", device="cpu")


@pytest.fixture(scope="module")
def cpm2():
    return bminf.models.CPM2(version="cpm2-demo", device="cpu")


@pytest.fixture(scope="module")
def eva():
    return bminf.models.EVA(version="eva-demo", device="cpu")


@pytest.fixture(params=[True, False], ids=["slots", "gathered"])
def slots(request):
    return request.param


class Collector:
    """A job's sink: text pieces and the end, delivered from the engine thread."""

    def __init__(self, task):
        self.task, self.text, self.done, self.error = task, "", threading.Event(), None
        task.job.sink = self

    def __call__(self, kind, value):
        if kind == "output":
            self.text += self.task.render(value)
        elif kind == "done":
            self.text += self.task.tail()
            self.done.set()
        else:
            self.error = value
            self.done.set()

    def result(self) -> str:
        assert self.done.wait(60), "the engine never finished this job"
        assert self.error is None, self.error
        return self.text


def run_all(model, requests, max_batch=16, make=completion_tasks, before_start=True, slots=False,
            graphed_prefill=False):
    engine = Engine(model.backbone, max_batch=max_batch, slots=slots)
    if graphed_prefill:  # what a resident GPU engine prefills with; its decoders run eagerly on the CPU
        engine._prefill = batch.GraphedPrefill(model.backbone)
    collectors = [Collector(t) for req in requests for t in make(model, req)]
    if not before_start:
        engine.start()
    for c in collectors:
        engine.submit(c.task.job)
    if before_start:
        engine.start()
    try:
        return [c.result() for c in collectors], engine
    finally:
        engine.stop()


def filled(prompt, blanks):
    f = FilledText(prompt, [b["position"] for b in blanks])
    return "".join(f.piece((k, b["text"])) for k, b in enumerate(blanks)) + f.tail(len(blanks))


CPM2_CASES = [
    dict(prompt="天空是蔚蓝色，窗外有", max_tokens=7, temperature=0),
    dict(prompt="今天天气<span>，我们去<span>吧", max_tokens=9, temperature=0),
    dict(prompt="北京环球影城", max_tokens=5, temperature=0.9, seed=3, top_p=0.9),
    dict(prompt="我们去<span>", max_tokens=6, temperature=1.2, seed=5, top_k=20, frequency_penalty=0.5),
    dict(prompt="门票", max_tokens=3, temperature=0.7, seed=1, presence_penalty=1.0, stop=["的"]),
]


def alone_cpm2(model, case):
    kw = dict(max_tokens=case["max_tokens"], temperature=case["temperature"], seed=case.get("seed"),
              top_p=case.get("top_p"), top_n=case.get("top_k"),
              frequency_penalty=case.get("frequency_penalty", 0), presence_penalty=case.get("presence_penalty", 0))
    if "<span>" in case["prompt"]:
        return filled(case["prompt"], model.fill_blank(case["prompt"], **kw))
    return model.generate(case["prompt"], stop_tokens=case.get("stop"), **kw)[0]


def test_batched_rows_equal_rows_alone(cpm2, slots):
    requests = [CompletionRequest(model="cpm2", **case) for case in CPM2_CASES]
    got, engine = run_all(cpm2, requests, slots=slots)
    assert got == [alone_cpm2(cpm2, case) for case in CPM2_CASES]
    # they ran as one batch: fewer steps than one after another
    assert engine.steps < sum(c["max_tokens"] for c in CPM2_CASES) - len(CPM2_CASES)


def test_graphed_prefill_rows_equal_rows_alone(cpm1, cpm2, eva):
    # prompts padded to the graphs' widths (GPT on the left, T5's sources to 64), in decoders kept per shape:
    # the first logits as the eager prefill's (fp32 on the CPU), and every row's text as alone
    for model, prefixes in ((cpm1, None), (cpm2, [[cpm2.tokenizer.token_to_id("<s_0>")]])):
        prefills = batch.GraphedPrefill(model.backbone)
        for prompt in ("北京", "今天天气很好，我们去公园吧"):
            sources = [model.tokenizer.encode(prompt)]
            _, eager = batch.prefill(model.backbone, sources, prefixes)
            _, graphed = prefills(sources, prefixes)
            assert torch.allclose(graphed, eager, rtol=1e-4, atol=1e-4), (graphed - eager).abs().max()
        assert len(prefills.decoders) == (2 if model is cpm1 else 1)  # CPM-1: widths 8 and 16; CPM-2: source 64
    requests = [CompletionRequest(model="cpm2", **case) for case in CPM2_CASES]
    got, engine = run_all(cpm2, requests, max_batch=2, slots=True, graphed_prefill=True)
    assert got == [alone_cpm2(cpm2, case) for case in CPM2_CASES]
    assert engine._prefill.decoders and all(key[2] == 64 for key in engine._prefill.decoders)
    prompts = ["天空是蔚蓝色，窗外有", "北京", "今天天气很好，我们去公园吧，推荐一本书"]
    requests = [CompletionRequest(model="cpm1", prompt=p, max_tokens=6, temperature=0) for p in prompts]
    got, engine = run_all(cpm1, requests, max_batch=2, slots=True, graphed_prefill=True)
    assert got == [cpm1.generate(p, max_tokens=6, temperature=0)[0] for p in prompts]
    assert all(width in (8, 16, 32) for _, width in engine._prefill.decoders)
    contexts = [["你好"], ["推荐一本书"], ["你好", "今天天气很好"]]
    requests = [ChatRequest(model="eva", messages=[{"role": "user", "content": c} for c in ctx], max_tokens=5,
                            seed=i) for i, ctx in enumerate(contexts)]
    got, _ = run_all(eva, requests, max_batch=2, make=chat_tasks, slots=True, graphed_prefill=True)
    assert got == [eva.dialogue(ctx, max_tokens=5, seed=i)[0] for i, ctx in enumerate(contexts)]


@pytest.mark.parametrize("kind", ["cpm1", "cpm2"])
def test_rows_join_a_running_batch_mid_generation(request, kind, slots):
    """Jobs submitted from inside another's sink (on the engine thread) join at the next step: GPT rows
    with shorter and longer prompts than the running one, T5 rows with shorter and longer sources."""
    model = request.getfixturevalue(kind)
    long_prompt = "今天天气很好，我们去公园吧，推荐一本书"
    engine = Engine(model.backbone, max_batch=4, slots=slots).start()
    try:
        first, = completion_tasks(model, CompletionRequest(model=kind, prompt="天空是蔚蓝色，窗外有", max_tokens=12,
                                                           temperature=0))
        later = [completion_tasks(model, CompletionRequest(model=kind, prompt=p, max_tokens=8, temperature=0.8,
                                                           seed=s))[0]
                 for p, s in (("北京", 0), (long_prompt, 1))]
        late = [Collector(t) for t in later]
        head = Collector(first)
        pieces = []

        def sink(kind, value):
            head(kind, value)
            pieces.append(kind)
            # the third piece of the first job: the others arrive mid-run (at its end, should it end sooner)
            if len(pieces) == 3 or (kind == "done" and len(pieces) < 3):
                for c in late:
                    engine.submit(c.task.job)
        first.job.sink = sink
        engine.submit(first.job)
        results = [head.result()] + [c.result() for c in late]
    finally:
        engine.stop()
    assert results[0] == model.generate("天空是蔚蓝色，窗外有", max_tokens=12, temperature=0)[0]
    assert results[1] == model.generate("北京", max_tokens=8, temperature=0.8, seed=0)[0]
    assert results[2] == model.generate(long_prompt, max_tokens=8, temperature=0.8, seed=1)[0]
    assert pieces[:3] == ["output"] * 3, "the first job must have produced text for the others to join mid-run"


def test_max_batch_bounds_the_batch_and_queued_jobs_still_run(eva, slots):
    contexts = [["你好"], ["推荐一本书"], ["你好", "今天天气很好"], ["我们去公园吧"], ["什么"]]
    requests = [ChatRequest(model="eva", messages=[{"role": "user", "content": c} for c in ctx], max_tokens=5,
                            seed=i) for i, ctx in enumerate(contexts)]
    got, _ = run_all(eva, requests, max_batch=2, make=chat_tasks, slots=slots)
    assert got == [eva.dialogue(ctx, max_tokens=5, seed=i)[0] for i, ctx in enumerate(contexts)]


class CountedRow:
    """A row that ends itself after ``last`` tokens, whatever the weights say (as a stop id would)."""
    stopped = False

    def __init__(self, last: int):
        self.n, self.last, self.done = 0, last, False

    def banned(self):
        return None

    def push(self, token):
        self.n += 1
        self.done = self.n >= self.last
        return str(token)


def test_cancelled_job_leaves_at_once_and_others_continue(cpm1, slots):
    engine = Engine(cpm1.backbone, max_batch=4, slots=slots)

    outputs = queue.Queue()
    job = Job(cpm1.tokenizer.encode("北京"), None, CountedRow(200), SamplingParams(max_tokens=200, temperature=0),
              cpm1.tokenizer.vocab_size, sink=lambda kind, value: (outputs.put(kind), kind == "output" and
                                                                   outputs.qsize() == 3 and job.cancel()))
    other, = completion_tasks(cpm1, CompletionRequest(model="cpm1", prompt="今天", max_tokens=6, temperature=0))
    collector = Collector(other)
    engine.submit(job)
    engine.submit(other.job)
    engine.start()
    try:
        assert collector.result() == cpm1.generate("今天", max_tokens=6, temperature=0)[0]
        assert job.produced == 3  # cancelled in its third sink call: no fourth token
        assert engine.stats()["running"] == 0
    finally:
        engine.stop()
    assert list(outputs.queue) == ["output"] * 3  # no "done" for a cancelled job


def test_fixed_slots_launch_each_step_before_the_tokens_reach_the_host(cpm1, slots):
    # a row that ends itself (as a stop id would) after three tokens: the slots launched the step after
    # its third token before the host saw it (its logits unused), the gathered batch did not
    engine = Engine(cpm1.backbone, max_batch=4, slots=slots)
    finished = threading.Event()
    job = Job(cpm1.tokenizer.encode("北京"), None, CountedRow(3), SamplingParams(max_tokens=200, temperature=0),
              cpm1.tokenizer.vocab_size, sink=lambda kind, value: kind == "done" and finished.set())
    engine.submit(job)
    engine.start()
    try:
        assert finished.wait(60)
        assert job.produced == 3 and engine.steps == (3 if slots else 2)
    finally:
        engine.stop()


def test_failed_prefill_fails_only_its_jobs(cpm1, slots):
    engine = Engine(cpm1.backbone, slots=slots).start()
    try:
        bad = Collector(completion_tasks(cpm1, CompletionRequest(model="cpm1", prompt="北京", max_tokens=3))[0])
        bad.task.job.source = [10**6]  # an id outside the vocabulary: the backbone refuses it
        engine.submit(bad.task.job)
        assert bad.done.wait(30) and isinstance(bad.error, ValueError)
        good = Collector(completion_tasks(cpm1, CompletionRequest(model="cpm1", prompt="北京", max_tokens=3,
                                                                  temperature=0))[0])
        engine.submit(good.task.job)
        assert good.result() == cpm1.generate("北京", max_tokens=3, temperature=0)[0]
    finally:
        engine.stop()


def test_stop_fails_waiting_jobs_with_shutting_down(cpm1):
    engine = Engine(cpm1.backbone)
    c = Collector(completion_tasks(cpm1, CompletionRequest(model="cpm1", prompt="北京", max_tokens=3))[0])
    engine.submit(c.task.job)
    engine.stop()  # never started: the job is still queued
    engine._loop()  # the worker's exit path, run here: it fails what is left
    assert c.done.is_set() and "shut down" in str(c.error)


def test_kv_gather_keeps_each_rows_keys_right_aligned():
    a = KVCache(n_layers=1, batch_size=2, n_heads=1, max_length=6, d_head=2)
    b = KVCache(n_layers=1, batch_size=1, n_heads=1, max_length=3, d_head=2)
    a.k[0][:, :, :4] = torch.arange(1, 9, dtype=torch.float32).view(2, 1, 4, 1)
    a.key_mask[0, 2:4] = True      # row 0: two real tokens (left padding)
    a.key_mask[1, :4] = True       # row 1: four
    a.length, a.n_valid = 4, torch.tensor([2, 4])
    b.k[0][:, :, :2] = 9.0
    b.key_mask[0, :2] = True
    b.length, b.n_valid = 2, torch.tensor([2])
    out = KVCache.gather([(a, [0]), (b, [0])], room=3)
    assert (out.length, out.max_length, out.n_valid.tolist()) == (2, 5, [2, 2])  # row 1's columns dropped
    assert out.k[0][:, 0, :2, 0].tolist() == [[3.0, 4.0], [9.0, 9.0]]
    assert out.key_mask[:, :2].all() and not out.key_mask[:, 2:].any()
    cross = CrossKVCache(n_layers=1, batch_size=1, n_heads=1, source_length=2, d_head=2)
    with pytest.raises(ValueError, match="filled"):
        CrossKVCache.gather([(cross, [0])])


@pytest.mark.parametrize("slots", [False, True])
@pytest.mark.parametrize("kind", ["cpm1", "cpm2"])
def test_the_budget_reserve_grows_before_rows_are_admitted(request, monkeypatch, kind, slots):
    """Under a memory limit the engine makes the offload core keep room for the batch's caches (or its
    fixed slots) and the prefill before running them (blocks move to host memory first), and the text
    is unchanged."""
    from bminf.offload import TransformerBlockList
    from bminf.offload.stream import BlockWeights
    from bminf.serving import batch

    cls = {"cpm1": bminf.models.CPM1, "cpm2": bminf.models.CPM2}[kind]
    model = cls(version=f"{kind}-demo", device="cpu")
    stacks = ["layers"] if kind == "cpm1" else ["enc_layers", "dec_layers"]
    for name in stacks:  # all resident, with no room to spare
        blocks = list(getattr(model.backbone, name))
        size = sum(BlockWeights(b).nbytes for b in blocks)
        setattr(model.backbone, name, TransformerBlockList(blocks, "cpu", memory_limit=size, reserve=0))
    events = []
    reserve, prefill = TransformerBlockList.reserve_at_least, batch.prefill
    monkeypatch.setattr(TransformerBlockList, "reserve_at_least",
                        lambda self, n: (events.append(("reserve", n)), reserve(self, n))[1])
    monkeypatch.setattr(batch, "prefill", lambda *a: (events.append(("prefill", None)), prefill(*a))[1])
    cases = [c for c in CPM2_CASES if "<span>" not in c["prompt"]]
    got, engine = run_all(model, [CompletionRequest(model=kind, **case) for case in cases], slots=slots)
    assert engine.fixed_slots == slots
    reference = request.getfixturevalue(kind)
    assert got == run_all(reference, [CompletionRequest(model=kind, **case) for case in cases])[0]
    assert events[0][0] == "reserve" and ("prefill", None) in events
    assert events.index(("prefill", None)) > max(i for i, e in enumerate(events) if e[0] == "reserve"
                                                 and i < events.index(("prefill", None)))
    longest = max(len(model.tokenizer.encode(c["prompt"])) for c in cases)
    joined = batch.cache_bytes(model.backbone, len(cases), max(c["max_tokens"] for c in cases), longest)
    assert events[0][1] > joined  # at least the joined batch's caches
    for name in stacks:
        assert getattr(model.backbone, name).streamed_blocks, f"{name}: no block left the device"


def test_the_slots_bytes_count_the_slots_held_and_those_a_join_grows(cpm1, cpm2):
    """What ``_make_room`` reserves for fixed slots: the slots held, and where a join outgrows them the
    grown ones too (rows to a power of two within max_batch, lengths to one from 64), both alive while
    the running rows are copied over."""
    from bminf.serving.slots import SlotDecoder

    gpt, t5 = cpm1.backbone, cpm2.backbone
    engine = Engine(gpt, max_batch=8, slots=True)
    assert engine._slot_bytes(3, 70, 0) == batch.cache_bytes(gpt, 4, 128)
    assert engine._slot_bytes(20, 10, 0) == batch.cache_bytes(gpt, 8, 64)
    engine._fixed = SlotDecoder.sized(gpt, 4, 64)
    held = batch.state_bytes(engine._fixed.cache)
    assert held == batch.cache_bytes(gpt, 4, 64)
    assert engine._slot_bytes(4, 64, 0) == held  # they fit: nothing new
    assert engine._slot_bytes(5, 10, 0) == held + batch.cache_bytes(gpt, 8, 64)
    assert engine._slot_bytes(2, 65, 0) == held + batch.cache_bytes(gpt, 4, 128)
    engine = Engine(t5, max_batch=8, slots=True)
    engine._fixed = SlotDecoder.sized(t5, 4, 64, 64)
    held = batch.state_bytes(engine._fixed.cache)
    assert held == batch.cache_bytes(t5, 4, 64, 64) and engine._slot_bytes(3, 64, 64) == held
    assert engine._slot_bytes(3, 10, 70) == held + batch.cache_bytes(t5, 4, 64, 128)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["cpm1", "cpm2", "eva"])
def test_on_a_gpu_the_engine_warms_up_and_replays_cuda_graphs(kind):
    """A resident model on a GPU: the engine takes the fixed slots, ``warm_up`` captures a graph for each
    batch size the slots round to, and requests then decode from graphs (the CPU tests above check the
    same step's tokens eagerly; tests/test_serving_slots.py its logits against the gathered batch)."""
    cls = {"cpm1": bminf.models.CPM1, "cpm2": bminf.models.CPM2, "eva": bminf.models.EVA}[kind]
    model = cls(version=f"{kind}-demo", device="cuda")
    engine = Engine(model.backbone, max_batch=4)
    assert engine.fixed_slots
    assert engine.warm_up() > 0 and engine.stats()["cuda_graphs"] == 3  # batches of 1, 2 and 4 rows
    make = chat_tasks if kind == "eva" else completion_tasks
    requests = ([ChatRequest(model=kind, messages=[{"role": "user", "content": "推荐一本书"}], max_tokens=12, seed=i)
                 for i in range(3)] if kind == "eva" else
                [CompletionRequest(model=kind, prompt="天空是蔚蓝色，窗外有", max_tokens=12, seed=i) for i in range(3)])
    collectors = [Collector(t) for req in requests for t in make(model, req)]
    engine.start()
    try:
        for c in collectors:
            engine.submit(c.task.job)
        texts = [c.result() for c in collectors]
    finally:
        engine.stop()
    assert all(texts) and engine.steps > 0
    assert engine.stats()["cuda_graphs"] >= 3


@pytest.mark.gpu
def test_on_a_gpu_under_a_memory_limit_the_slots_replay_graphs_around_the_streamed_blocks(tmp_path):
    """Blocks streamed under a memory limit: the engine still takes the fixed slots, whose steps replay a
    graph per run of resident blocks with the streamed blocks run between (the same kernels as the
    resident engine's whole-step graphs, so greedy text is the same), and the peak stays under the limit."""
    import gc

    from model_fixtures import make_model_dir

    directory = make_model_dir(str(tmp_path), "cpm2", n_encoder_layers=6, n_decoder_layers=6)
    cases = [dict(prompt=p, max_tokens=12, temperature=0) for p in ("天空是蔚蓝色，窗外有", "北京环球影城", "门票")]
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    resident = bminf.models.CPM2(version=directory, device="cuda")
    model_bytes = torch.cuda.memory_allocated() - before
    blocks = sum(p.numel() * p.element_size() for lst in (resident.backbone.enc_layers, resident.backbone.dec_layers)
                 for p in lst.parameters())
    want, engine = run_all(resident, [CompletionRequest(model="cpm2", **c) for c in cases], slots=None)
    assert engine.fixed_slots and engine._graphed
    del resident, engine
    gc.collect()
    torch.cuda.empty_cache()
    limit = torch.cuda.memory_allocated() + model_bytes + (16 << 20) - blocks // 2  # about half the blocks stream
    torch.cuda.reset_peak_memory_stats()
    model = bminf.models.CPM2(version=directory, device="cuda", memory_limit=limit, dynamic_memory=16 << 20)
    got, engine = run_all(model, [CompletionRequest(model="cpm2", **c) for c in cases], slots=None)
    assert model.backbone.dec_layers.streamed_blocks and engine.fixed_slots and not engine._graphed
    assert got == want
    assert engine._fixed.segments and engine.stats()["cuda_graphs"] >= 2
    assert torch.cuda.max_memory_allocated() <= limit


def test_slots_that_outgrow_the_memory_keep_only_the_rows_they_need(cpm1, monkeypatch):
    """The slots keep their rows when they grow longer, unless the memory runs out: then they take the
    rows the batch needs (out of memory is simulated for more than 2 rows of over 64 tokens)."""
    from bminf.serving.slots import SlotDecoder

    real = SlotDecoder.sized.__func__

    def sized(cls, model, rows, columns, source=0, use_graphs=None):
        if rows > 2 and columns > 64:
            raise torch.cuda.OutOfMemoryError("simulated")
        return real(cls, model, rows, columns, source, use_graphs)
    monkeypatch.setattr(SlotDecoder, "sized", classmethod(sized))
    short = [CompletionRequest(model="cpm1", prompt=p, max_tokens=4, temperature=0) for p in ("北京", "今天", "天空")]
    got, engine = run_all(cpm1, short, max_batch=4, slots=True)
    assert got == [cpm1.generate(p, max_tokens=4, temperature=0)[0] for p in ("北京", "今天", "天空")]
    assert engine._fixed.batch_size == 4 and engine._fixed.max_length == 64
    long = CompletionRequest(model="cpm1", prompt="天空是蔚蓝色，窗外有", max_tokens=70, temperature=0)
    engine = Engine(cpm1.backbone, max_batch=4, slots=True)
    engine._fixed = SlotDecoder.sized(cpm1.backbone, 4, 10)  # as after a warm-up: 4 rows, none running
    c = Collector(completion_tasks(cpm1, long)[0])
    engine.submit(c.task.job)
    engine.start()
    try:
        assert c.result() == cpm1.generate("天空是蔚蓝色，窗外有", max_tokens=70, temperature=0)[0]
    finally:
        engine.stop()
    assert (engine._fixed.batch_size, engine._fixed.max_length) == (1, 128)
