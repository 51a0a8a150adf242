"""CPM1, CPM2 and EVA on tiny checkpoints: every execution path gives the tokens of an independent
greedy reference (full recompute with the backbone, no cache), and bad input gets a clear error."""
import gc
import warnings

import pytest
import torch

import bminf
from model_fixtures import make_model_dir

PROMPTS = ["天空是蔚蓝色，窗外有", "北京环球影城", "今天天气很好"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("models"))
    return {kind: make_model_dir(root, kind) for kind in ("cpm1", "cpm2", "eva")}


@pytest.fixture(scope="module")
def cpm1(dirs):
    return bminf.models.CPM1(version=dirs["cpm1"])


@pytest.fixture(scope="module")
def cpm2(dirs):
    return bminf.models.CPM2(version="file://" + dirs["cpm2"])


@pytest.fixture(scope="module")
def eva(dirs):
    return bminf.models.EVA(version=dirs["eva"])


def _masked_argmax(logits, banned):
    logits = logits.clone()
    logits[list(banned)] = float("-inf")
    return int(logits.argmax())


@torch.no_grad()
def reference_gpt(model, text, max_tokens, ids=None):
    """Greedy CPM-1 by full recompute: no cache, no batching, no streaming."""
    tok, net = model.tokenizer, model.backbone
    ids, out = ids or tok.encode(text), []
    banned = model._control_ids()
    for _ in range(max_tokens):
        t = _masked_argmax(net(torch.tensor([ids + out]))[0, -1], banned)
        if t == tok.eod_id:
            return tok.decode(out), True
        out.append(t)
    return tok.decode(out), False


@torch.no_grad()
def reference_t5(model, source, prefix, max_tokens, banned, stop=None, next_banned=None):
    """Greedy decoding by recomputing the whole decoder every step; ``next_banned(out)`` adds bans."""
    net, out = model.backbone, []
    for _ in range(max_tokens):
        logits = net(torch.tensor([source]), decoder_input_ids=torch.tensor([prefix + out]))[0, -1]
        t = _masked_argmax(logits, set(banned) | set(next_banned(out) if next_banned else ()))
        out.append(t)
        if stop and stop(out):
            break
    return out


def test_forward_is_the_backbone(cpm1, cpm2):
    ids = torch.tensor([[12, 13, 14]])
    assert torch.equal(cpm1(ids), cpm1.backbone(ids))
    assert cpm1(ids).shape == (1, 3, cpm1.tokenizer.vocab_size)
    dec = torch.tensor([[1, 20]])
    assert torch.equal(cpm2(ids, decoder_input_ids=dec), cpm2.backbone(ids, decoder_input_ids=dec))
    assert isinstance(cpm1, torch.nn.Module)


@pytest.mark.parametrize("text", PROMPTS)
def test_cpm1_greedy_equals_full_recompute(cpm1, text):
    assert cpm1.generate(text, max_tokens=12, temperature=0) == reference_gpt(cpm1, text, 12)


def test_cpm1_batch_stream_and_single_agree(cpm1):
    single = [cpm1.generate(t, max_tokens=10, temperature=0) for t in PROMPTS]
    assert cpm1.generate(PROMPTS, max_tokens=10, temperature=0) == single
    for text, (expected, _) in zip(PROMPTS, single):
        assert "".join(cpm1.generate(text, max_tokens=10, temperature=0, stream=True)) == expected
    # sampling: each row of a batch gets what it gets alone with the same seed
    sampled = [cpm1.generate(t, max_tokens=10, seed=7, top_p=0.9) for t in PROMPTS]
    assert cpm1.generate(PROMPTS, max_tokens=10, seed=7, top_p=0.9) == sampled
    pieces = list(cpm1.generate(PROMPTS, max_tokens=10, seed=7, top_p=0.9, stream=True))
    for i, (text, _) in enumerate(sampled):
        assert "".join(p for j, p in pieces if j == i) == text


def test_seeds(cpm1):
    a = cpm1.generate(PROMPTS[0], max_tokens=16, temperature=1.5, seed=1)
    assert cpm1.generate(PROMPTS[0], max_tokens=16, temperature=1.5, seed=1) == a
    others = {cpm1.generate(PROMPTS[0], max_tokens=16, temperature=1.5, seed=s)[0] for s in (2, 3, 4)}
    assert others - {a[0]}, "different seeds all gave the same text"
    assert cpm1.generate(PROMPTS[0], max_tokens=12, top_n=1, seed=5) == cpm1.generate(PROMPTS[0], max_tokens=12,
                                                                                         temperature=0)


def test_stop_strings_end_the_text_before_them(cpm1):
    full, _ = cpm1.generate(PROMPTS[0], max_tokens=12, temperature=0)
    stop = full[4:6]
    cut = full[:full.index(stop)]
    assert cpm1.generate(PROMPTS[0], max_tokens=12, temperature=0, stop_tokens=[stop]) == (cut, True)
    assert "".join(cpm1.generate(PROMPTS[0], max_tokens=12, temperature=0, stop_tokens=[stop], stream=True)) == cut


def test_max_tokens_zero_and_truncated_prompt(cpm1):
    assert cpm1.generate(PROMPTS[0], max_tokens=0) == ("", False)
    long_text = "天空是蔚蓝色" * 20  # far more than the tiny model's 48 positions
    with pytest.warns(UserWarning, match="cut from the left"):
        result = cpm1.generate(long_text, max_tokens=8, temperature=0)
    assert result == reference_gpt(cpm1, None, 8, ids=cpm1.tokenizer.encode(long_text)[-40:])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cpm1.generate(long_text[:20], max_tokens=8, temperature=0)


def _fill_reference(cpm2, text):
    tok = cpm2.tokenizer
    parts = text.split("<span>")
    source = []
    for k, part in enumerate(parts):
        source += tok.encode(part) + ([tok.get_span(k)] if k < len(parts) - 1 else [])
    n, sentinels = len(parts) - 1, tok.sentinel_ids
    banned = cpm2._control_ids()

    def closes(out):
        return sum(t in sentinels for t in out)

    out = reference_t5(cpm2, source, [tok.sod_id, sentinels[0]], 20, banned,
                       stop=lambda out: closes(out) == n,
                       next_banned=lambda out: [s for s in sentinels if s != sentinels[closes(out) + 1]])
    blanks, current = [], []
    for t in out:
        if t in sentinels:
            blanks.append(tok.decode(current))
            current = []
        else:
            current.append(t)
    if len(blanks) < n:
        blanks.append(tok.decode(current))
    positions = [i for i in range(len(text)) if text.startswith("<span>", i)]
    return [{"position": p, "text": b} for p, b in zip(positions, blanks)]


FILL = ["北京环球影城指定单日门票将采用<span>制度", "今天<span>很好，我们去<span>吧"]


@pytest.mark.parametrize("text", FILL)
def test_fill_blank_greedy_equals_full_recompute(cpm2, text):
    assert cpm2.fill_blank(text, max_tokens=20, temperature=0) == _fill_reference(cpm2, text)


def test_fill_blank_batch_and_stream(cpm2):
    single = [cpm2.fill_blank(t, max_tokens=20, seed=3) for t in FILL]
    assert cpm2.fill_blank(FILL, max_tokens=20, seed=3) == single
    for text, blanks in zip(FILL, single):
        joined = {}
        for piece in cpm2.fill_blank(text, max_tokens=20, seed=3, stream=True):
            joined[piece["position"]] = joined.get(piece["position"], "") + piece["text"]
        assert joined == {b["position"]: b["text"] for b in blanks if b["text"]}
    explicit = cpm2.fill_blank(FILL[1], spans_position=[2, 14], max_tokens=20, temperature=0)
    assert explicit == cpm2.fill_blank(FILL[1], max_tokens=20, temperature=0)
    assert cpm2.fill_blank(FILL[0], max_tokens=0) == []


def test_cpm2_generate_greedy_equals_full_recompute(cpm2):
    tok = cpm2.tokenizer
    span = tok.get_span(189)
    stops = set(tok.sentinel_ids) | {tok.eod_id}
    out = reference_t5(cpm2, tok.encode(PROMPTS[0]) + [span], [tok.sod_id, span], 12, cpm2._control_ids(),
                       stop=lambda out: out[-1] in stops)
    stopped = out[-1] in stops
    expected = (tok.decode(out[:-1] if stopped else out), stopped)
    assert cpm2.generate(PROMPTS[0], max_tokens=12, temperature=0) == expected
    assert cpm2.generate(PROMPTS, max_tokens=12, temperature=0)[0] == expected


CONTEXT = ["你好", "你好，有什么可以帮你？", "推荐一本书"]


def test_eva_greedy_equals_full_recompute_and_batches(eva):
    tok = eva.tokenizer
    source = []
    for u in CONTEXT:
        source += tok.encode(u) + [tok.sep_id]
    source.append(tok.get_span(0))
    stops = {tok.sep_id, tok.eod_id}
    out = reference_t5(eva, source, [tok.get_span(0)], 10, eva._control_ids(keep=["<sep>"]) + tok.sentinel_ids,
                       stop=lambda out: out[-1] in stops)
    stopped = out[-1] in stops
    expected = (tok.decode(out[:-1] if stopped else out), stopped)
    assert eva.dialogue(CONTEXT, max_tokens=10, temperature=0) == expected
    assert eva.dialogue([CONTEXT, ["你好"]], max_tokens=10, temperature=0)[0] == expected
    sampled = eva.dialogue(CONTEXT, max_tokens=10, seed=11)
    assert "".join(eva.dialogue(CONTEXT, max_tokens=10, seed=11, stream=True)) == sampled[0]


def test_eva_truncates_whole_utterances_first(eva):
    tok = eva.tokenizer
    turns = [tok.encode(u) + [tok.sep_id] for u in CONTEXT]
    limit = len(turns[1]) + len(turns[2]) + 1
    assert eva._context_ids(CONTEXT, "context", limit) == turns[1] + turns[2] + [tok.get_span(0)]
    assert eva._context_ids(CONTEXT, "context", 3) == turns[2][-2:] + [tok.get_span(0)]


@pytest.mark.parametrize("call, error, match", [
    (lambda m: m.generate(""), ValueError, "input_sentence is empty"),
    (lambda m: m.generate(None), TypeError, "input_sentence must be a str"),
    (lambda m: m.generate(b"abc"), TypeError, "input_sentence must be a str"),
    (lambda m: m.generate([]), ValueError, "empty list"),
    (lambda m: m.generate(["ok", 3]), TypeError, r"input_sentence\[1\]"),
    (lambda m: m.generate("好", max_tokens=-1), ValueError, "max_tokens"),
    (lambda m: m.generate("好", max_tokens=48), ValueError, "max_tokens must be below"),
    (lambda m: m.generate("好", temperature=-1), ValueError, "temperature"),
    (lambda m: m.generate("好", top_p=0), ValueError, r"top_p must be a number in \(0, 1\]"),
    (lambda m: m.generate("好", top_p=1.5), ValueError, "top_p"),
    (lambda m: m.generate("好", top_n=0), ValueError, "top_n"),
    (lambda m: m.generate("好", top_n=10**6), ValueError, "top_n"),
    (lambda m: m.generate("好", stop_tokens=[""]), ValueError, "stop_tokens"),
    (lambda m: m.generate("好", stop_tokens=5), TypeError, "stop_tokens"),
    (lambda m: m.generate("好", stream="yes"), TypeError, "stream"),
])
def test_cpm1_bad_input(cpm1, call, error, match):
    with pytest.raises(error, match=match):
        call(cpm1)
    assert cpm1.generate("天空", max_tokens=3, temperature=0) == reference_gpt(cpm1, "天空", 3)  # still usable


@pytest.mark.parametrize("call, error, match", [
    (lambda m: m.fill_blank("没有空"), ValueError, "no <span>"),
    (lambda m: m.fill_blank("<span>" * 17), ValueError, "at most 16"),
    (lambda m: m.fill_blank("今天<span很好"), ValueError, "malformed span marker"),
    (lambda m: m.fill_blank("今天< span >很好"), ValueError, "malformed span marker"),
    (lambda m: m.fill_blank("今天</span>很好<span>"), ValueError, "malformed span marker"),
    (lambda m: m.fill_blank("今天<span>很好", spans_position=[1]), ValueError, "no <span>"),
    (lambda m: m.fill_blank("<span>a<span>", spans_position=[7, 0]), ValueError, "ascending"),
    (lambda m: m.fill_blank("<span>", spans_position="0"), TypeError, "spans_position"),
    (lambda m: m.fill_blank(["<span>"], spans_position=[0]), ValueError, "spans_position"),
    (lambda m: m.fill_blank(""), ValueError, "empty"),
    (lambda m: m.fill_blank("<span>", max_tokens=10**6), ValueError, "max_tokens"),
    (lambda m: m.fill_blank("天" * 2000 + "<span>"), ValueError, "at most 1024"),
    (lambda m: m.generate("好", top_p=2), ValueError, "top_p"),
])
def test_cpm2_bad_input(cpm2, call, error, match):
    with pytest.raises(error, match=match):
        call(cpm2)
    assert cpm2.fill_blank(FILL[0], max_tokens=20, temperature=0) == _fill_reference(cpm2, FILL[0])


@pytest.mark.parametrize("call, error, match", [
    (lambda m: m.dialogue([]), ValueError, "empty"),
    (lambda m: m.dialogue("你好"), TypeError, "list of utterances"),
    (lambda m: m.dialogue(["你好", ""]), ValueError, r"context\[1\] is empty"),
    (lambda m: m.dialogue(["你好", 3]), TypeError, r"context\[1\]"),
    (lambda m: m.dialogue([["你好"], "x"]), TypeError, r"context\[1\] must be a list"),
    (lambda m: m.dialogue(["你好"], truncation_length=1), ValueError, "truncation_length"),
    (lambda m: m.dialogue(["你好"], top_n=0), ValueError, "top_n"),
])
def test_eva_bad_input(eva, call, error, match):
    with pytest.raises(error, match=match):
        call(eva)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(version="cpm2.1-new"), ValueError, "belongs to another model"),
    (dict(version="nonsense"), ValueError, "is not one this model runs"),
    (dict(version="file:///no/such/dir"), FileNotFoundError, "not a directory"),
    (dict(version=3), TypeError, "version"),
    (dict(version="cpm1-demo", memory_limit="6GiB", device="cpu"), ValueError, "memory_limit caps GPU memory"),
    (dict(version="cpm1-demo", memory_limit="lots"), ValueError, "memory_limit='lots'"),
    (dict(version="cpm1-demo", dtype="int9"), ValueError, "dtype"),
    (dict(version="cpm1-demo", device="tpu:0"), ValueError, "device"),
    (dict(version="cpm1-demo", quantization="yes"), TypeError, "quantization"),
])
def test_constructor_bad_input(kwargs, error, match):
    if kwargs.get("device") is None and torch.cuda.is_available():
        kwargs["device"] = "cpu"
    with pytest.raises(error, match=match):
        bminf.models.CPM1(**kwargs)


def test_constructor_refuses_another_architecture(dirs):
    with pytest.raises(ValueError, match="holds a t5 model"):
        bminf.models.CPM1(version=dirs["cpm2"])


def test_float_weights_give_the_same_greedy_text(dirs, cpm2):
    dequantized = bminf.models.CPM2(version=dirs["cpm2"], quantization=False)
    assert dequantized.fill_blank(FILL[1], max_tokens=20, temperature=0) == \
        cpm2.fill_blank(FILL[1], max_tokens=20, temperature=0)


@pytest.mark.gpu
def test_gpu_resident_and_offloaded_agree(tmp_path):
    """Streamed blocks compute with the same weights: the eager paths agree bit for bit, and so do the
    CUDA-graph decode (resident) and the streamed decoder's steps (graphs around the streamed blocks)."""
    directory = make_model_dir(str(tmp_path), "cpm2", n_encoder_layers=6, n_decoder_layers=6)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    resident = bminf.models.CPM2(version=directory, device="cuda", cuda_graphs=False)
    model_bytes = torch.cuda.memory_allocated() - before
    blocks = sum(p.numel() * p.element_size() for lst in (resident.backbone.enc_layers, resident.backbone.dec_layers)
                 for p in lst.parameters())
    expected = {}
    for graphs in (False, True):
        resident.cuda_graphs = graphs
        expected[graphs] = [resident.fill_blank(text, max_tokens=20, temperature=0) for text in FILL]
    del resident  # the budget counts everything allocated on the device
    gc.collect()  # the kept graph decoders and their memory pools go with it
    torch.cuda.empty_cache()
    # room for half the blocks' bytes: about half of them must stream
    limit = torch.cuda.memory_allocated() + model_bytes + (16 << 20) - blocks // 2
    for graphs in (False, True):
        torch.cuda.reset_peak_memory_stats()
        offloaded = bminf.models.CPM2(version=directory, device="cuda", memory_limit=limit,
                                      dynamic_memory=16 << 20, cuda_graphs=graphs)
        assert offloaded.backbone.enc_layers.streamed_blocks or offloaded.backbone.dec_layers.streamed_blocks
        assert [offloaded.fill_blank(text, max_tokens=20, temperature=0) for text in FILL] == expected[graphs]
        assert torch.cuda.max_memory_allocated() <= limit
        # with graphs, the steps replayed a graph per run of resident blocks around the streamed ones
        assert any(d.segments for d in offloaded._graphed.values()) == (graphs and bool(
            offloaded.backbone.dec_layers.streamed_blocks))
        del offloaded
        torch.cuda.empty_cache()


def test_static_decode_step_gives_the_same_text(cpm1, cpm2, eva, monkeypatch):
    """The CUDA-graph decoder's static step (run eagerly here, on the CPU) through the model classes."""
    from bminf.generation.graphs import GraphedDecoder

    calls = [
        (cpm1, lambda m: m.generate(PROMPTS, max_tokens=10, temperature=0)),
        (cpm1, lambda m: m.generate(PROMPTS[0], max_tokens=10, seed=2)),
        (cpm2, lambda m: m.fill_blank(FILL, max_tokens=20, temperature=0)),
        (cpm2, lambda m: m.generate(PROMPTS[1], max_tokens=10, temperature=0)),
        (eva, lambda m: eva.dialogue([CONTEXT, ["你好"]], max_tokens=10, temperature=0)),
    ]
    for model, call in calls:
        expected = call(model)
        made = []

        def static(batch_size, length, source_length=0, model=model):
            limit = getattr(model.backbone.config, "max_positions", 4096)
            extra = dict(max_source_length=64) if source_length else {}
            made.append(GraphedDecoder(model.backbone, batch_size, min(64, limit), use_graphs=False, **extra))
            return made[-1]

        monkeypatch.setattr(model, "graphed", static)
        assert call(model) == expected
        assert made and made[-1]._kv().length > 1  # the static step really ran
        monkeypatch.undo()
    assert cpm1.graphed(1, 10) is None  # on a CPU the model classes decode eagerly


@pytest.mark.gpu
def test_gpu_cuda_graphs_give_the_eager_text(dirs):
    for cls, call in [(bminf.models.CPM1, lambda m: m.generate(PROMPTS, max_tokens=12, temperature=0)),
                      (bminf.models.CPM2, lambda m: m.fill_blank(FILL, max_tokens=20, temperature=0)),
                      (bminf.models.EVA, lambda m: m.dialogue(CONTEXT, max_tokens=12, temperature=0))]:
        kind = cls.model_key
        graphed = cls(version=dirs[kind], device="cuda")
        eager = cls(version=dirs[kind], device="cuda", cuda_graphs=False)
        assert graphed.graphed(1, 8) is not None and eager.graphed(1, 8) is None
        assert call(graphed) == call(eager)
        assert call(graphed) == call(graphed)  # replaying the kept decoder again


def test_one_renderer_of_a_filled_text():
    from bminf.models.cpm2 import fill_in
    from bminf.serving.tasks import FilledText
    text = "北京<span>的<span>。<span>"
    blanks = [{"position": 2, "text": "天安门"}, {"position": 9, "text": "广场"}, {"position": 16, "text": "！"}]
    assert fill_in(text, blanks) == "北京天安门的广场。！"
    assert fill_in(text, blanks[:1], mark=lambda t: f"[{t}]") == "北京[天安门]的[____]。[____]"
    streamed = FilledText(text, [b["position"] for b in blanks])  # the server's pieces join to the same text
    assert "".join(streamed.piece((i, b["text"])) for i, b in enumerate(blanks)) + streamed.tail(3) == \
        fill_in(text, blanks)
