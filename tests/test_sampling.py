"""The sampling functions alone, against distributions computed by hand (reference §2 semantics)."""
import math

import pytest
import torch

from bminf.generation import SamplingParams, count_ids, distribution, keep_top_n, keep_top_p, penalize, sample, scores
from bminf.generation.rows import BlankRow, TextRow
from bminf.generation.text import TextStream
from bminf.kernels import triton_sampling


def softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def test_temperature_scales_logits_before_softmax():
    logits = torch.tensor([[1.0, 2.0, 4.0]])
    probs = distribution(scores(logits, SamplingParams(temperature=2.0)), SamplingParams(temperature=2.0))
    assert probs[0].tolist() == pytest.approx(softmax([0.5, 1.0, 2.0]), abs=1e-6)


def test_penalties_count_prompt_and_output_except_exempt_ids():
    counts = count_ids([[2, 2, 3, 0]], 5, exempt=[0])
    assert counts.tolist() == [[0, 0, 2, 1, 0]]
    z = penalize(torch.zeros(1, 5), counts, frequency_penalty=0.5, presence_penalty=1.0)
    assert z.tolist() == [[0.0, 0.0, -2.0, -1.5, 0.0]]
    # BMInf's order: temperature first, then the penalties
    params = SamplingParams(temperature=0.5, frequency_penalty=0.5, presence_penalty=1.0)
    z = scores(torch.ones(1, 5), params, counts)
    assert z.tolist() == [[2.0, 2.0, 0.0, 0.5, 2.0]]


def test_filtered_ids_get_no_probability():
    params = SamplingParams(temperature=1.0)
    filtered = torch.tensor([True, False, False])
    probs = distribution(scores(torch.tensor([[5.0, 1.0, 1.0]]), params, filtered=filtered), params)
    assert probs[0].tolist() == pytest.approx([0.0, 0.5, 0.5])
    assert set(sample(torch.tensor([[5.0, 1.0, 1.0]] * 50), params, filtered=filtered).tolist()) <= {1, 2}


def test_top_n_keeps_the_n_largest():
    assert keep_top_n(torch.tensor([[0.1, 0.4, 0.3, 0.2]]), 2).tolist() == [[False, True, True, False]]
    params = SamplingParams(temperature=1.0, top_n=2)
    probs = distribution(torch.log(torch.tensor([[0.1, 0.4, 0.3, 0.2]])), params)
    assert probs[0].tolist() == pytest.approx([0.0, 4 / 7, 3 / 7, 0.0], abs=1e-6)


@pytest.mark.parametrize("top_p, kept", [
    (0.5, [True, True, False, False]),    # 0.5 does not exceed 0.5: the next token crosses and is kept
    (0.49, [True, False, False, False]),  # 0.5 already exceeds 0.49
    (0.75, [True, True, True, False]),    # 0.75 reached exactly: one more is kept (strictly exceeds rule)
    (0.8, [True, True, True, False]),
    (1.0, [True, True, True, True]),
])
def test_top_p_boundary_rule(top_p, kept):
    probs = torch.tensor([[0.5, 0.25, 0.125, 0.125]])  # binary fractions: cumulative sums are exact
    assert keep_top_p(probs, top_p).tolist() == [kept]
    # the order of the vocabulary does not matter
    perm = torch.tensor([2, 0, 3, 1])
    assert keep_top_p(probs[:, perm], top_p)[0].tolist() == [kept[i] for i in perm.tolist()]


def test_top_n_then_top_p_renormalized():
    params = SamplingParams(temperature=1.0, top_n=3, top_p=0.6)
    probs = distribution(torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]])), params)
    # top-3 renormalized: 4/9, 3/9, 2/9; mass before each: 0, 4/9, 7/9 -> keep the first two
    assert probs[0].tolist() == pytest.approx([4 / 7, 3 / 7, 0.0, 0.0], abs=1e-6)


def test_greedy_is_argmax_after_penalties_and_top_n_1_agrees():
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(0))
    greedy = sample(logits, SamplingParams(temperature=0))
    assert greedy.tolist() == logits.argmax(-1).tolist()
    gens = [torch.Generator().manual_seed(i) for i in range(8)]
    assert sample(logits, SamplingParams(temperature=0.7, top_n=1), generators=gens).tolist() == greedy.tolist()
    counts = torch.zeros(8, 50, dtype=torch.int32)
    counts[:, greedy[0]] = 3
    penalized = sample(logits, SamplingParams(temperature=0, frequency_penalty=100.0), counts)
    assert (penalized != greedy[0]).all()


def test_sampling_matches_the_distribution():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]])).repeat(4000, 1)
    gens = [torch.Generator().manual_seed(i) for i in range(4000)]
    freq = torch.bincount(sample(logits, SamplingParams(temperature=1.0), generators=gens), minlength=3) / 4000
    assert freq.tolist() == pytest.approx([0.6, 0.3, 0.1], abs=0.03)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_draw_is_what_torch_multinomial_draws_with_the_same_generator(device):
    logits, params = torch.randn(6, 500, device=device) * 3, SamplingParams(temperature=0.8, top_p=0.9)
    ours = sample(logits, params, generators=[torch.Generator(device).manual_seed(s) for s in range(6)])
    probs = distribution(scores(logits, params), params)
    theirs = [int(torch.multinomial(probs[i], 1, generator=torch.Generator(device).manual_seed(i))) for i in range(6)]
    assert ours.tolist() == theirs


@pytest.mark.parametrize("top_n", [None, 10])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_the_sampling_kernel_draws_what_torch_multinomial_draws(device, top_n):
    # on CUDA draw() runs triton_sampling's kernel for these settings; on the CPU, the torch ops
    logits = torch.randn(6, 3000, device=device) * 3
    params = SamplingParams(temperature=0.8, top_n=top_n, frequency_penalty=0.4)
    counts = torch.randint(0, 3, (6, 3000), dtype=torch.int32, device=device)
    assert triton_sampling.handles(logits, top_n, None) == (device == "cuda")
    ours = sample(logits, params, counts, generators=[torch.Generator(device).manual_seed(s) for s in range(6)])
    probs = distribution(scores(logits, params, counts), params)
    theirs = [int(torch.multinomial(probs[i], 1, generator=torch.Generator(device).manual_seed(i))) for i in range(6)]
    assert ours.tolist() == theirs
    greedy = SamplingParams(temperature=0, frequency_penalty=0.5)  # exact products: fused or not, the same scores
    assert torch.equal(sample(logits, greedy, counts), scores(logits, greedy, counts).argmax(-1))


def test_the_sampling_kernel_leaves_top_p_and_a_large_top_n_to_the_torch_ops():
    logits = torch.zeros(2, 1000)
    assert not triton_sampling.handles(logits, None, None)  # not on CUDA
    if torch.cuda.is_available():
        logits = logits.cuda()
        assert triton_sampling.handles(logits, 64, 1.0) and triton_sampling.handles(logits, 1000, None)
        assert not triton_sampling.handles(logits, None, 0.9) and not triton_sampling.handles(logits, 65, None)


def test_nothing_left_to_sample_is_an_error_not_a_token():
    with pytest.raises(RuntimeError, match="no token can be sampled"):
        sample(torch.zeros(2, 5), SamplingParams(temperature=1.0), filtered=torch.ones(5, dtype=torch.bool))


def test_per_row_generators_make_rows_independent():
    logits = torch.zeros(3, 1000)
    a = sample(logits, SamplingParams(temperature=1.0), generators=[torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    b = sample(logits[1:2], SamplingParams(temperature=1.0), generators=[torch.Generator().manual_seed(2)])
    assert a[1] == b[0]


@pytest.mark.parametrize("field, value, error", [
    ("max_tokens", -1, ValueError), ("max_tokens", 1.5, TypeError), ("temperature", -0.1, ValueError),
    ("temperature", float("nan"), ValueError), ("top_n", 0, ValueError), ("top_n", 101, ValueError),
    ("top_p", 0.0, ValueError), ("top_p", 1.01, ValueError), ("top_p", "0.5", TypeError),
    ("frequency_penalty", float("inf"), ValueError), ("seed", -1, ValueError), ("seed", True, TypeError),
])
def test_bad_parameters_name_the_field_and_range(field, value, error):
    with pytest.raises(error, match=field):
        SamplingParams(**{field: value}).check(vocab_size=100)


def test_text_stream_stop_string_across_tokens_and_hold_back():
    s = TextStream(["END"])
    shown = [s.push("ab"), s.push("cE"), s.push("N")]
    assert shown == ["ab", "c", ""]  # "E", then "EN" might start END: held back
    assert s.push("x") == "ENx" and not s.stopped
    assert s.push("yEND zz") == "y" and s.stopped and s.text == "abcENxy"
    assert s.push("more") == "" and s.flush() == ""


def test_text_stream_earliest_of_several_stop_strings():
    s = TextStream(["。", "？"])
    assert s.push("好吗？是的。") == "好吗" and s.text == "好吗"


def test_text_row_limits_and_stop_ids():
    row = TextRow(lambda ids: "".join(chr(0x4e00 + i) for i in ids), stop_ids={0}, max_tokens=3)
    assert [row.push(t) for t in (1, 2, 3)] == ["丁", "丂", "七"]
    assert row.done and not row.stopped and row.text == "丁丂七"
    assert TextRow(str, {0}, max_tokens=0).done


def test_blank_row_sentinels_open_and_close_blanks():
    sentinels = [100, 101, 102, 103]
    row = BlankRow(lambda ids: "".join(map(str, ids)), sentinels, n_blanks=2, max_tokens=10)
    assert row.banned() == [100, 102, 103]  # only <s_1> may close blank 0
    assert row.push(7) == (0, "7") and row.push(101) is None
    assert row.banned() == [100, 101, 103] and row.push(8) == (1, "8")
    assert row.push(102) is None and row.done and row.stopped and row.texts == ["7", "8"]
    short = BlankRow(lambda ids: "".join(map(str, ids)), sentinels, n_blanks=2, max_tokens=2)
    short.push(5), short.push(6)
    assert short.done and not short.stopped and short.texts == ["56"]
    with pytest.raises(ValueError, match="sentinels"):
        BlankRow(str, sentinels, n_blanks=4, max_tokens=10)
