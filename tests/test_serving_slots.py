"""The server's fixed slots (``serving.slots.SlotDecoder``) against its gathered batch (``serving.batch``,
the models' eager decode): rows prefilled in two groups, the second joining mid-run into grown slots,
then rows leaving from the middle, every step's logits compared row by row. Eagerly on the CPU (fp32,
relative error < 1e-5); replayed from CUDA graphs on a GPU (fp16, logits within fp16 rounding, greedy
tokens equal or tied within it)."""
import pytest
import torch

from bminf.generation import graphs
from bminf.quantization import quantize_
from bminf.serving import batch
from bminf.serving.slots import SlotDecoder
from helpers import recorder, rel_err, tiny_gpt, tiny_t5


def prompts(model, lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, model.config.vocab_size, (n,), generator=g).tolist() for n in lengths]


def prefill(model, sources, t5):
    return batch.prefill(model, sources, [[0]] * len(sources) if t5 else None)


def compare(model, t5: bool, tol: float, use_graphs=None, cls=SlotDecoder):
    """Drive both paths with the same tokens (greedy on the gathered path's logits); returns the slots
    (the last ones: they grow) and every step's logits from them."""
    errors, seen = [], []

    def check(gathered, slotted, order):
        # slot i holds the row that `order[i]` indexes in the gathered batch
        want = gathered[torch.as_tensor(order, device=gathered.device)].float()
        # greedy picks the same token, or (fp16 on random weights) one tied with it within the tolerance
        picked = want.gather(-1, slotted.argmax(-1)[:, None])[:, 0]
        assert bool((want.max(-1).values - picked <= tol * want.abs().max()).all())
        errors.append(rel_err(slotted.float(), want))
        seen.append(slotted)

    with torch.no_grad():
        first, logits_a = prefill(model, prompts(model, [5, 9, 2], seed=1), t5)
        slots = cls.sized(model, rows=4, columns=20, source=9, use_graphs=use_graphs)
        slots.admit(first, 3)
        gathered = batch.join([(first, range(3))], room=40)
        logits, order = logits_a, [0, 1, 2]
        for _ in range(4):
            tokens = logits.argmax(-1)
            logits = batch.step(model, gathered, tokens)
            check(logits, slots.step(tokens), order)
        # two rows join: more rows, longer rows and (T5) a longer source than the slots hold
        second, logits_b = prefill(model, prompts(model, [70 if t5 else 12, 3], seed=2), t5)
        assert not slots.fits(5, 90, 70 if t5 else 0)
        slots = slots.grown(5, 90, 70 if t5 else 0)
        assert (slots.batch_size, slots.max_length, slots.max_source_length if t5 else 128) == (5, 128, 128)
        slots.admit(second, 2)
        gathered = batch.join([(gathered, range(3)), (second, range(2))], room=40)
        logits, order = torch.cat([logits, logits_b]), list(range(5))
        for _ in range(3):
            tokens = logits.argmax(-1)
            logits = batch.step(model, gathered, tokens)
            check(logits, slots.step(tokens), order)
        # rows 1 and 3 leave: row 4 moves into the hole at slot 1
        keep = [0, 2, 4]
        tokens = logits.argmax(-1)[keep]
        order = slots.keep(keep)
        assert order == [0, 4, 2] and slots.running == 3
        gathered = batch.join([(gathered, keep)], room=40)
        slot_tokens = tokens[torch.as_tensor([keep.index(i) for i in order], device=tokens.device)]
        logits = batch.step(model, gathered, tokens)
        check(logits, slots.step(slot_tokens), [keep.index(i) for i in order])
        for _ in range(5):
            tokens = logits.argmax(-1)
            logits = batch.step(model, gathered, tokens)
            slot_tokens = tokens[torch.as_tensor([keep.index(i) for i in order], device=tokens.device)]
            check(logits, slots.step(slot_tokens), [keep.index(i) for i in order])
    assert max(errors) < tol, max(errors)
    return slots, seen


@pytest.mark.parametrize("kind", ["gpt", "t5"])
def test_slots_step_every_row_as_the_gathered_batch_does(kind):
    t5 = kind == "t5"
    model = quantize_(tiny_t5() if t5 else tiny_gpt(max_positions=128))
    slots, _ = compare(model, t5, tol=1e-5)
    assert not slots.use_graphs and slots.running == 3


class Streaming(SlotDecoder):
    """Slots whose steps take the path of blocks streamed under a memory limit (``_segmented``) on the
    CPU, for the blocks that ``graphs._streamed`` names: the graphs of the runs of resident blocks are
    replayed by ``helpers.Replayed`` and collected in ``made`` (grown slots too); ``after_block(rows)``
    runs after each streamed block, ``rows`` the rows of the step's shape."""
    made: list = []
    after_block = staticmethod(lambda rows: None)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.segmented, self._record = True, recorder(self.made)

    def _eager_blocks(self, state, parts, start, end):
        out = super()._eager_blocks(state, parts, start, end)
        self.after_block(len(parts[1]))  # parts: (cache, ids, pos, length), ids one per row
        return out


@pytest.mark.parametrize("kind", ["gpt", "t5"])
def test_slots_with_streamed_blocks_step_exactly_as_a_whole_step(kind, monkeypatch):
    # under a memory limit the server's slots replay a graph per run of resident blocks and run the
    # streamed ones between: the same numbers as the whole static step, bit for bit, as rows join
    # (into grown slots) and leave; then a pass over the limit re-plans inside a step (blocks move),
    # whose rest runs eagerly and must still advance the slots' positions
    t5 = kind == "t5"
    model = quantize_(tiny_t5() if t5 else tiny_gpt(max_positions=128))
    _, want = compare(model, t5, tol=1e-5)
    plan, made, grown = [1], [], {"blocks": 0}

    def re_plan(rows):
        grown["blocks"] += rows == 5
        if grown["blocks"] == 3:  # the grown slots' second step (their capture ran the block first)
            plan[:] = [0, 1]
    monkeypatch.setattr(graphs, "_streamed", lambda layers: tuple(plan))
    monkeypatch.setattr(Streaming, "made", made)
    monkeypatch.setattr(Streaming, "after_block", staticmethod(re_plan))
    slots, got = compare(model, t5, tol=1e-5, cls=Streaming)
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
    source = 128 if t5 else 0
    assert slots.segments_plan == (0, 1) and sorted(slots.segments) == [(4, 64, source), (5, 64, source)]
    # plan [1]: two graph runs for the first slots and the grown ones; [0, 1]: two for each shape
    assert len(made) == 2 + 2 + 4 and slots.graph_count() == 4 and all(g.replays >= 1 for g in made)


def test_slots_refuse_rows_past_their_size_and_steps_of_the_wrong_shape():
    model = tiny_gpt(max_positions=128)
    slots = SlotDecoder.sized(model, rows=2, columns=10)
    assert slots.max_length == 64  # lengths round up to a power of two from 64
    with pytest.raises(ValueError, match="limit of 128"):
        SlotDecoder.sized(model, rows=2, columns=129)
    cache, _ = prefill(model, prompts(model, [3, 3, 3], seed=0), False)
    with pytest.raises(ValueError, match="3 rows"):
        slots.admit(cache, 3)
    slots.admit(cache, 2)
    with pytest.raises(ValueError, match="one token per running row"):
        slots.step(torch.tensor([1, 2, 3]))
    for rows in ([1, 0], [0, 0], [2], [-1]):
        with pytest.raises(ValueError, match="ascending running rows"):
            slots.keep(rows)
    assert slots.keep([1]) == [1] and slots.running == 1
    with pytest.raises(ValueError, match="cannot hold"):
        slots.grown(0, 64)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["gpt", "t5"])
def test_slots_replay_cuda_graphs_that_match_the_gathered_batch_on_gpu(kind):
    torch.manual_seed(0)
    t5 = kind == "t5"
    model = quantize_(tiny_t5() if t5 else tiny_gpt(max_positions=128)).cuda().half()
    slots, _ = compare(model, t5, tol=1e-2)
    assert slots.use_graphs
    # the shapes replayed after the growth: 5 rows, then 3 (in 4), all under 64 tokens; T5's source 70 in 128
    source = 128 if t5 else 0
    assert sorted(slots.graphs) == [(4, 64, source), (5, 64, source)]
