"""GraphedDecoder's static step (fixed-size caches, attention over a masked bucket, positions as device
tensors) against the models' eager decode: eagerly on the CPU (fp32, relative error < 1e-5), and
replayed from CUDA graphs on a GPU (fp16, greedy tokens equal, logits within fp16 rounding)."""
import pytest
import torch

from bminf.generation import graphs
from bminf.generation.graphs import GraphedDecoder, StaticLayerKV, buckets_for, segments
from bminf.quantization import quantize_
from helpers import recorder, rel_err, tiny_gpt, tiny_t5

TOL = 1e-5


def test_buckets_cover_max_length():
    assert buckets_for(64) == [64]
    assert buckets_for(65) == [64, 65]
    assert buckets_for(1000, smallest=128) == [128, 256, 512, 1000]


def test_static_layer_kv_writes_at_a_device_position():
    k = torch.zeros(1, 2, 8, 3)
    v = torch.zeros(1, 2, 8, 3)
    kv = StaticLayerKV(k, v, torch.tensor([5]), length=6)
    ks, vs = kv.update(torch.ones(1, 2, 1, 3), 2 * torch.ones(1, 2, 1, 3))
    assert ks.shape == (1, 2, 6, 3) and float(k[:, :, 5].min()) == 1 and float(k.sum()) == 6
    assert float(v[:, :, 5].min()) == 2


def greedy_gpt(model, prompt, mask, steps, dec=None):
    """Prefill then greedy steps; returns the list of step logits."""
    cache = dec.new_cache() if dec else model.new_cache(prompt.shape[0], 40)
    call = dec if dec else model
    with torch.no_grad():
        logits = call(prompt, attention_mask=mask, cache=cache)[:, -1]
        out = [logits]
        for _ in range(steps):
            logits = call(logits.argmax(-1)[:, None], cache=cache)[:, -1]
            out.append(logits)
    return out


@pytest.mark.parametrize("quantized", [False, True])
def test_gpt_static_step_equals_eager(quantized):
    model = tiny_gpt()
    if quantized:
        quantize_(model)
    prompt = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(prompt, dtype=torch.bool)
    mask[1, :3] = False  # left padding: row 1's positions start later
    eager = greedy_gpt(model, prompt, mask, 12)
    dec = GraphedDecoder(model, batch_size=2, max_length=40, buckets=[8, 16, 40])
    assert not dec.use_graphs
    static = greedy_gpt(model, prompt, mask, 12, dec)
    for a, b in zip(eager, static):
        assert rel_err(b, a) < TOL
    # the same object serves a second prompt: its cache starts empty again
    again = greedy_gpt(model, prompt, mask, 12, dec)
    assert all(rel_err(b, a) < TOL for a, b in zip(eager, again))


def greedy_t5(model, src, src_mask, start, steps, dec=None):
    with torch.no_grad():
        if dec:
            enc, cache = dec.encode(src, src_mask), dec.new_cache(src_mask)
            step = dec.decode
        else:
            enc, cache = model.encode(src, src_mask), model.new_cache(src_mask, 40)
            step = model.decode
        logits = step(start, enc, cache=cache)[:, -1]
        out = [logits]
        for _ in range(steps):
            logits = step(logits.argmax(-1)[:, None], cache=cache)[:, -1]
            out.append(logits)
    return out


@pytest.mark.parametrize("quantized", [False, True])
def test_t5_static_step_equals_eager(quantized):
    model = tiny_t5()
    if quantized:
        quantize_(model)
    g = torch.Generator().manual_seed(2)
    src = torch.randint(0, model.config.vocab_size, (2, 9), generator=g)
    src_mask = torch.ones_like(src, dtype=torch.bool)
    src_mask[0, 6:] = False
    start = torch.randint(0, model.config.vocab_size, (2, 3), generator=g)  # a multi-token first step
    eager = greedy_t5(model, src, src_mask, start, 14)
    # the cross-attention cache is padded to 16 source positions, self-attention runs in buckets
    dec = GraphedDecoder(model, batch_size=2, max_length=40, max_source_length=16, buckets=[4, 8, 32, 40])
    static = greedy_t5(model, src, src_mask, start, 14, dec)
    for a, b in zip(eager, static):
        assert rel_err(b, a) < TOL


def test_segments_cut_a_step_at_its_streamed_blocks():
    assert segments(3, []) == [(0, 3, False)]
    assert segments(3, [0]) == [(0, 0, False), (0, 1, True), (1, 3, False)]
    assert segments(3, [2, 0]) == [(0, 0, False), (0, 1, True), (1, 2, False), (2, 3, True), (3, 3, False)]
    assert segments(2, [0, 1]) == [(0, 0, False), (0, 1, True), (1, 2, True), (2, 2, False)]
    assert segments(5, [1, 4]) == [(0, 1, False), (1, 2, True), (2, 4, False), (4, 5, True), (5, 5, False)]


def segmented(model, plan, monkeypatch, made, **kwargs):
    """A GraphedDecoder whose steps take the streamed-blocks path for the blocks of ``plan`` (a list,
    changeable), with graphs replayed by ``Replayed`` on the CPU."""
    monkeypatch.setattr(graphs, "_streamed", lambda layers: tuple(plan))
    dec = GraphedDecoder(model, **kwargs)
    dec.segmented, dec._record = True, recorder(made)
    return dec


@pytest.mark.parametrize("plan", [[], [0], [1], [2], [0, 2], [1, 2], [0, 1, 2]])
def test_the_streamed_blocks_path_equals_the_static_step(plan, monkeypatch):
    # cut into graph runs around eager streamed blocks, a step gives the static step's numbers exactly,
    # with every run of resident blocks (and the head, the tail) replayed each step
    model = tiny_gpt()
    prompt = torch.randint(0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(prompt, dtype=torch.bool)
    mask[0, :2] = False
    ref = greedy_gpt(model, prompt, mask, 10, GraphedDecoder(model, batch_size=2, max_length=40, buckets=[8, 40]))
    made = []
    dec = segmented(model, plan, monkeypatch, made, batch_size=2, max_length=40, buckets=[8, 40])
    for _ in range(2):  # the second prompt replays the first one's graphs
        out = greedy_gpt(model, prompt, mask, 10, dec)
        assert all(torch.equal(a, b) for a, b in zip(out, ref))
    graph_runs = sum(not eager for _, _, eager in segments(3, plan))
    assert sorted(dec.segments) == [(2, 8), (2, 40)] and len(made) == 2 * graph_runs
    assert all(g.replays >= 2 for g in made)


def test_the_streamed_blocks_path_of_t5_and_a_re_plan_midway(monkeypatch):
    # T5's state (the pending feed-forward output, the cross-attention bias) through the runs; then a
    # re-plan during a step (a pass over the budget moves blocks): the rest of that step runs eagerly,
    # the graphs are dropped and captured again for the new plan, and the numbers do not change
    model = tiny_t5(n_decoder_layers=4)
    g = torch.Generator().manual_seed(4)
    src = torch.randint(0, model.config.vocab_size, (2, 7), generator=g)
    src_mask = torch.ones_like(src, dtype=torch.bool)
    src_mask[1, 5:] = False
    start = torch.randint(0, model.config.vocab_size, (2, 1), generator=g)
    kwargs = dict(batch_size=2, max_length=40, max_source_length=8, buckets=[16, 40])
    ref = greedy_t5(model, src, src_mask, start, 12, GraphedDecoder(model, **kwargs))
    plan, made = [1], []
    dec = segmented(model, plan, monkeypatch, made, **kwargs)
    block = dec.layers[1]
    calls = {"n": 0}
    forward = block.forward

    def forward_then_re_plan(*args, **kw):
        out = forward(*args, **kw)
        calls["n"] += 1
        if calls["n"] == 6:  # inside the fourth step (capture ran the block once, three steps once each)
            plan[:] = [1, 3]
        return out
    block.forward = forward_then_re_plan
    out = greedy_t5(model, src, src_mask, start, 12, dec)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    assert dec.segments_plan == (1, 3) and list(dec.segments) == [(2, 16)]
    assert len(made) == 2 + 3  # two graph runs for [1], then three for [1, 3]


@pytest.mark.parametrize("kind", ["gpt", "t5"])
def test_steps_run_for_compiling_leave_the_cache_as_it_was(kind):
    # compile_ahead runs every bucket's step once (our kernels only compiling, on a GPU) before the
    # prompt: the steps' writes to the cache's host and device state must be put back
    model = tiny_gpt() if kind == "gpt" else tiny_t5()
    dec = GraphedDecoder(model, batch_size=2, max_length=16, max_source_length=8, buckets=[8, 16])
    cache = dec.new_cache() if kind == "gpt" else dec.new_cache(torch.ones(2, 5, dtype=torch.bool))
    kv = cache if kind == "gpt" else cache.self_kv
    before = kv.key_mask.clone(), kv.n_valid.clone(), kv.length
    filled = None if kind == "gpt" else list(cache.cross.filled)
    with torch.no_grad():
        dec._steps_compiled()
    assert torch.equal(kv.key_mask, before[0]) and torch.equal(kv.n_valid, before[1]) and kv.length == before[2]
    assert kind == "gpt" or cache.cross.filled == filled
    assert not dec.graphs


@pytest.mark.parametrize("kind", ["gpt", "t5"])
def test_the_prompts_captured_pass_starts_from_the_empty_cache_each_call(kind):
    # a prompt graph records _prefill / _first_step after warm-up calls of it (on a GPU): each call must start
    # from the empty cache's host state, whatever the call before left, and give the eager pass's logits
    torch.manual_seed(0)
    model = (tiny_gpt() if kind == "gpt" else tiny_t5()).eval()
    dec = GraphedDecoder(model, batch_size=2, max_length=16, max_source_length=8)
    ids = torch.randint(0, model.config.vocab_size, (2, 3))
    mask = torch.ones(2, 3, dtype=torch.bool)
    with torch.no_grad():
        if kind == "gpt":
            eager = model(ids, attention_mask=mask, cache=model.new_cache(2, 16))
            run = lambda: dec._prefill(model.token_embedding(ids), mask)  # noqa: E731
        else:
            src = torch.randint(0, model.config.vocab_size, (2, 8))
            enc = model.encode(src)
            eager = model.decode(ids, enc, cache=model.new_cache(torch.ones(2, 8, dtype=torch.bool), 16))
            dec.new_cache(torch.ones(2, 8, dtype=torch.bool))
            run = lambda: dec._first_step(model.input_embedding(ids), enc)  # noqa: E731
        put_back = dec._step_state()
        for _ in range(2):  # the second call as a capture after a warm-up: host state left at 3 by the first
            logits = run()
            put_back()
            assert dec._kv().length == 3 and (kind == "gpt" or all(dec.cache.cross.filled))
            assert torch.allclose(logits, eager, rtol=TOL, atol=TOL)


def test_graphed_decoder_rejects_bad_use():
    model = tiny_t5()
    with pytest.raises(ValueError, match="batch_size"):
        GraphedDecoder(model, batch_size=0, max_length=8)
    with pytest.raises(ValueError, match="use_graphs"):
        GraphedDecoder(model, batch_size=1, max_length=8, use_graphs=True)  # a CPU model
    dec = GraphedDecoder(model, batch_size=1, max_length=8, max_source_length=4)
    with pytest.raises(ValueError, match="max_source_length"):
        dec.new_cache(torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="encoder_mask"):
        dec.new_cache(torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="new_cache"):
        dec.decode(torch.tensor([[1]]), torch.zeros(1, 3, 32), cache=model.new_cache(torch.ones(1, 3), 8))
    with pytest.raises(ValueError, match="positions"):
        GraphedDecoder(tiny_gpt(), batch_size=1, max_length=1000)
    gpt_dec = GraphedDecoder(tiny_gpt(), batch_size=1, max_length=3)
    cache = gpt_dec.new_cache()
    gpt_dec(torch.tensor([[1, 2, 3]]), cache=cache)
    with pytest.raises(ValueError, match="max_length"):
        gpt_dec(torch.tensor([[4]]), cache=cache)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["gpt", "t5"])
def test_cuda_graph_steps_match_eager_on_gpu(kind):
    torch.manual_seed(0)
    model = (tiny_gpt() if kind == "gpt" else tiny_t5())
    model = quantize_(model).cuda().half()
    batch, steps = 2, 20
    if kind == "gpt":
        prompt = torch.randint(0, model.config.vocab_size, (batch, 6), device="cuda")
        mask = torch.ones_like(prompt, dtype=torch.bool)
        eager = greedy_gpt(model, prompt, mask, steps)
        dec = GraphedDecoder(model, batch_size=batch, max_length=40, buckets=[8, 16, 40])
        assert dec.use_graphs
        graphed = greedy_gpt(model, prompt, mask, steps, dec)
    else:
        src = torch.randint(0, model.config.vocab_size, (batch, 9), device="cuda")
        src_mask = torch.ones_like(src, dtype=torch.bool)
        start = torch.zeros(batch, 1, dtype=torch.long, device="cuda")
        eager = greedy_t5(model, src, src_mask, start, steps)
        dec = GraphedDecoder(model, batch_size=batch, max_length=40, max_source_length=16, buckets=[8, 16, 40])
        assert dec.warm_up() > 0 and len(dec.graphs) == 3
        graphed = greedy_t5(model, src, src_mask, start, steps, dec)
    assert len(dec.graphs) == 3
    for a, b in zip(eager, graphed):
        assert torch.equal(a.argmax(-1), b.argmax(-1))
        assert rel_err(b.float(), a.float()) < 1e-2


def assert_prompt_exact_steps_close(graphed, eager):
    """Logits of a prompt's pass and the steps after it, from graphs and eagerly: the prompt's (the same
    kernels) bit for bit, the steps' (fused kernels in the graphs) the same tokens, within fp16 rounding."""
    assert torch.equal(graphed[0], eager[0])
    for a, b in zip(graphed[1:], eager[1:]):
        assert torch.equal(a.argmax(-1), b.argmax(-1)) and rel_err(a.float(), b.float()) < 1e-2


@pytest.mark.gpu
def test_t5_first_step_replays_a_graph_per_prefix_length_with_eager_numbers_on_gpu():
    # the first step (cross-attention keys/values of every layer, then the prefix) from a graph, against
    # the same decoder's eager first step (use_graphs=False: the same kernels, unfused) bit for bit
    torch.manual_seed(0)
    model = quantize_(tiny_t5()).cuda().half()
    dec = GraphedDecoder(model, batch_size=2, max_length=16, max_source_length=32, buckets=[16])
    ref = GraphedDecoder(model, batch_size=2, max_length=16, max_source_length=32, use_graphs=False)
    for n, prefix in ((9, 3), (20, 3), (12, 1)):  # the second prompt replays the first one's graph
        src = torch.randint(0, model.config.vocab_size, (2, n), device="cuda")
        mask = torch.ones_like(src, dtype=torch.bool)
        mask[1, n // 2:] = False
        start = torch.randint(0, model.config.vocab_size, (2, prefix), device="cuda")
        enc = dec.encode(src, mask)
        runs = []
        for d in (dec, ref):
            cache = d.new_cache(mask)
            with torch.no_grad():
                logits = [d.decode(start, enc, cache=cache)]
                assert cache.length == prefix and all(cache.cross.filled)
                for _ in range(4):
                    logits.append(d.decode(logits[-1][:, -1].argmax(-1)[:, None], cache=cache))
            runs.append(logits)
        assert_prompt_exact_steps_close(*runs)
    assert sorted(dec.prompts) == [("t5", 1), ("t5", 3)] and not ref.prompts
    with pytest.raises(ValueError, match="decoder_input_ids"):  # checked before any replay
        dec.decode(torch.full((2, 3), model.config.vocab_size, device="cuda"), enc, cache=dec.new_cache(mask))


@pytest.mark.gpu
def test_gpt_prefill_replays_a_graph_per_width_with_eager_numbers_on_gpu():
    torch.manual_seed(0)
    model = quantize_(tiny_gpt()).cuda().half()
    dec = GraphedDecoder(model, batch_size=2, max_length=40, buckets=[16, 40])
    ref = GraphedDecoder(model, batch_size=2, max_length=40, use_graphs=False)
    # prompts are padded to a power of two from 8 when the cache keeps the room asked for, with graphs only
    assert (dec.prompt_width(5, 20), dec.prompt_width(9, 20), dec.prompt_width(9, 30), ref.prompt_width(5, 20)) == \
        (8, 16, 9, 5)
    for n in (6, 8, 6):  # the third prompt replays the first one's graph
        ids = torch.randint(0, model.config.vocab_size, (2, n), device="cuda")
        mask = torch.ones_like(ids, dtype=torch.bool)
        mask[1, :2] = False  # a left-padded row
        runs = []
        for d in (dec, ref):
            cache = d.new_cache()
            with torch.no_grad():
                logits = [d(ids, attention_mask=mask, cache=cache)]
                assert cache.length == n
                for _ in range(4):
                    logits.append(d(logits[-1][:, -1].argmax(-1)[:, None], cache=cache))
            runs.append(logits)
        assert_prompt_exact_steps_close(*runs)
    assert sorted(dec.prompts) == [("gpt", 6), ("gpt", 8)] and not ref.prompts
    with pytest.raises(ValueError, match="input_ids"):  # checked before any replay
        dec(torch.full((2, 3), model.config.vocab_size, device="cuda"), cache=dec.new_cache())


@pytest.mark.gpu
def test_the_prompts_call_compiles_the_kernels_of_every_bucket():
    # each bucket's graph attends with a kernel variant of its own; compiled ahead with the prompt's
    # kernels (compile_ahead), none is left for the captures of the later buckets
    from bminf.kernels import attention_kernels, compile_ahead
    if not compile_ahead.available():
        pytest.skip("this Triton has no AsyncCompileMode")
    torch.manual_seed(0)
    model = quantize_(tiny_gpt(d_model=36, n_heads=2, d_head=18)).cuda().half()  # a head size no other test uses
    compiled = lambda: sum(len(c[0]) for c in attention_kernels.decode_attention.device_caches.values())
    dec = GraphedDecoder(model, batch_size=1, max_length=40, buckets=[8, 16, 40])
    cache = dec.new_cache()
    before = compiled()
    with torch.no_grad():
        logits = dec(torch.randint(0, 97, (1, 3), device="cuda"), attention_mask=None, cache=cache)[:, -1]
        after_prompt = compiled()
        for _ in range(30):  # through all three buckets
            logits = dec(logits.argmax(-1)[:, None], cache=cache)[:, -1]
    assert len(dec.graphs) == 3
    assert after_prompt >= before + 2 and compiled() == after_prompt  # 8 and 16 keys may share one


@pytest.mark.gpu
def test_graphed_encoder_pads_to_a_bucket_and_matches_eager_on_gpu():
    torch.manual_seed(0)
    model = quantize_(tiny_t5()).cuda().half()
    dec = GraphedDecoder(model, batch_size=2, max_length=8, max_source_length=100)
    assert dec.source_buckets == [64, 100]
    for n in (37, 64, 90):  # replayed from the 64 and 100 graphs, padded and masked past n
        ids = torch.randint(0, model.config.vocab_size, (2, n), device="cuda")
        mask = torch.ones_like(ids, dtype=torch.bool)
        mask[1, n // 2:] = False  # a padded row
        with torch.no_grad():
            eager = model.encode(ids, mask)
        graphed = dec.encode(ids, mask)
        assert graphed.shape == eager.shape
        assert rel_err(graphed[0].float(), eager[0].float()) < 1e-2
        assert rel_err(graphed[1, :n // 2].float(), eager[1, :n // 2].float()) < 1e-2
    assert sorted(dec.encoders) == [64, 100]
    with pytest.raises(ValueError, match="input_ids"):
        dec.encode(torch.full((2, 5), model.config.vocab_size, device="cuda"))  # checked before any replay


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["gpt", "t5"])
def test_dependent_launch_changes_no_bit_of_a_graphed_decode(kind, monkeypatch):
    # With PDL each kernel may start before the one ahead of it has finished (kernels.dependent_launch):
    # a kernel that read its input too early would give other numbers than in plain stream order. The
    # model is large enough for the GEMV to run several tiles per program and, with 270 keys, for the
    # attention to split them (the combine kernel)
    from bminf.kernels import dependent_launch
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs compute capability 9.0")
    size = dict(d_model=1024, d_ff=2816, n_heads=16, d_head=64)
    launches = []  # the options each of our kernel launches took
    real_options = dependent_launch.options
    monkeypatch.setattr(dependent_launch, "options", lambda device: launches.append(real_options(device)) or
                        launches[-1])
    runs = []
    for value in ("1", "0"):
        monkeypatch.setenv("BMINF_PDL", value)
        dependent_launch.enabled.cache_clear()
        assert dependent_launch.enabled(torch.device("cuda")) == (value == "1")
        launches.clear()
        torch.manual_seed(0)
        if kind == "gpt":
            model = quantize_(tiny_gpt(max_positions=512, **size)).cuda().half()
            prompt = torch.randint(0, model.config.vocab_size, (1, 270), device="cuda")
            dec = GraphedDecoder(model, batch_size=1, max_length=300, buckets=[300])
            runs.append(greedy_gpt(model, prompt, torch.ones_like(prompt, dtype=torch.bool), 12, dec))
        else:
            model = quantize_(tiny_t5(**size)).cuda().half()
            src = torch.randint(0, model.config.vocab_size, (1, 30), device="cuda")
            dec = GraphedDecoder(model, batch_size=1, max_length=40, max_source_length=32, buckets=[40])
            runs.append(greedy_t5(model, src, torch.ones_like(src, dtype=torch.bool),
                                  torch.zeros(1, 1, dtype=torch.long, device="cuda"), 12, dec))
        assert dec.use_graphs
        # with BMINF_PDL=1 every launch of the decoder's calls and captures took PDL, else none
        assert launches and all(o["PDL"] == (value == "1") for o in launches)
    dependent_launch.enabled.cache_clear()
    for a, b in zip(*runs):
        assert torch.equal(a, b)
