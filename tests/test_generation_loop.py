"""The shared decode loop: running one step ahead (the CUDA default) takes the same tokens as waiting
for each token on the host, launches a step before the host reads the token it takes, and never steps
past the cache or after a token that must end every row."""
import pytest
import torch

from bminf.generation import GPTRunner, SamplingParams, T5Runner, TextRow, decode

from helpers import tiny_gpt, tiny_t5

VOCAB = 16


class ScriptedRunner:
    """Logits that make step k's greedy token ``script[k]``; records the order of steps and pushes."""

    def __init__(self, script, capacity, log):
        self.script, self.capacity, self.log = script, capacity, log
        self.steps = 0

    def _logits(self):
        logits = torch.zeros(1, VOCAB)
        logits[0, self.script[self.steps]] = 1.0
        return logits

    def start(self):
        return self._logits()

    def can_step(self):
        return self.steps + 1 < self.capacity

    def step(self, tokens):
        assert self.can_step(), "stepped past the cache"
        assert int(tokens.min()) >= 0, "a step was given an id of -1"
        self.log.append(("step", int(tokens[0])))
        self.steps += 1
        return self._logits()


class LoggedRow(TextRow):
    def __init__(self, log, **kwargs):
        super().__init__(decode=lambda ids: "".join(chr(65 + i) for i in ids), **kwargs)
        self.log = log

    def push(self, token):
        self.log.append(("push", token))
        return super().push(token)


def _run(script, run_ahead, max_tokens, capacity=64, stop_ids=(0,)):
    log = []
    row = LoggedRow(log, stop_ids=stop_ids, max_tokens=max_tokens)
    runner = ScriptedRunner(script, capacity, log)
    texts = [e for events in decode(runner, [row], SamplingParams(temperature=0), [[1]], VOCAB, run_ahead=run_ahead)
             for e in events]
    return texts, row.text, log


@pytest.mark.parametrize("max_tokens", [1, 2, 5, 8])
def test_running_ahead_takes_the_same_tokens_and_launches_each_step_before_the_host_reads_its_token(max_tokens):
    script = [3, 4, 5, 6, 7, 8, 9, 10, 11, 12]  # no stop id: max_tokens ends the row
    waited = _run(script, False, max_tokens)
    ahead = _run(script, True, max_tokens)
    assert ahead[:2] == waited[:2]
    assert waited[1] == "".join(chr(65 + t) for t in script[:max_tokens])
    steps = [entry for entry in ahead[2] if entry[0] == "step"]
    assert len(steps) == max_tokens - 1  # no step after the token that ends the row by max_tokens
    for k, (_, token) in enumerate(steps):  # step k (taking token k) comes before token k's push
        assert ahead[2].index(("step", token)) < ahead[2].index(("push", token)), ahead[2]
    # waiting: every push comes before the step that takes its token
    assert all(waited[2][i][0] == "push" for i in range(0, len(waited[2]), 2))


def test_a_stop_id_costs_one_step_ahead_and_the_cache_bounds_it():
    script = [3, 4, 0, 6, 7]  # the third token is the stop id
    waited = _run(script, False, max_tokens=10)
    ahead = _run(script, True, max_tokens=10)
    assert ahead[1] == waited[1] == "DE"
    assert sum(e[0] == "step" for e in waited[2]) == 2
    assert sum(e[0] == "step" for e in ahead[2]) == 3  # the step after the stop id, its logits unused
    # a cache of three positions (the prompt's and two tokens): the step ahead of the third token is skipped
    bounded = _run(script, True, max_tokens=10, capacity=3)
    assert bounded[1] == "DE" and sum(e[0] == "step" for e in bounded[2]) == 2


def _tokens(runner_of, run_ahead, params):
    rows = [TextRow(decode=lambda ids: ",".join(map(str, ids)) + ",", stop_ids=(), max_tokens=n) for n in (6, 4)]
    runner = runner_of(max(row.max_tokens for row in rows))
    for _ in decode(runner, rows, params, [[5, 6, 7], [8, 9]], VOCAB_MODEL, run_ahead=run_ahead):
        pass
    return [row.text for row in rows], runner


VOCAB_MODEL = 48


@pytest.mark.parametrize("arch", ["gpt", "t5"])
@pytest.mark.parametrize("params", [SamplingParams(temperature=0, frequency_penalty=0.5),
                                    SamplingParams(temperature=1.0, top_p=0.9, seed=3)], ids=["greedy", "sampled"])
def test_the_runners_take_the_same_tokens_ahead_and_stay_inside_their_cache(arch, params):
    torch.manual_seed(0)
    if arch == "gpt":
        model = tiny_gpt(1, vocab_size=VOCAB_MODEL, max_positions=32).eval()
        runner_of = lambda n: GPTRunner(model, [[5, 6, 7], [8, 9]], n)  # noqa: E731
    else:
        model = tiny_t5(1, vocab_size=VOCAB_MODEL).eval()
        runner_of = lambda n: T5Runner(model, [[5, 6, 7], [8, 9]], [1], n)  # noqa: E731
    waited, waiting_runner = _tokens(runner_of, False, params)
    ahead, runner = _tokens(runner_of, True, params)
    assert ahead == waited
    assert [len(t.split(",")) - 1 for t in ahead] == [6, 4]
    # max_tokens ended the last row: no step ahead after its last token (the cache holds one more)
    length = lambda r: (r.cache.self_kv if arch == "t5" else r.cache).length  # noqa: E731
    assert length(runner) == length(waiting_runner) and runner.can_step()


@pytest.mark.parametrize("run_ahead", [False, True])
def test_a_row_with_nothing_to_sample_raises_once_its_token_reaches_the_host(run_ahead):
    class NaNRunner(ScriptedRunner):
        def _logits(self):
            logits = super()._logits()
            if self.steps == 1:
                logits[0] = float("nan")
            return logits

    log = []
    row = LoggedRow(log, stop_ids=(), max_tokens=5)
    runner = NaNRunner([3, 4, 5, 6, 7], 64, log)
    with pytest.raises(RuntimeError, match="no token can be sampled"):
        for _ in decode(runner, [row], SamplingParams(temperature=1.0, seed=0), [[1]], VOCAB, run_ahead=run_ahead):
            pass
    assert len(row.text) == 1  # the first token; the second was never pushed
