"""``sampling.draw`` for CUDA logits in one Triton kernel: the scores (temperature, penalties, filtered
ids), top-n, and the draw, one program per row.

The torch ops of ``sampling.draw`` launch 15-20 small kernels a token (softmax, top-n's topk and
scatter, the validity checks, the ratio and its argmax), each a few microseconds of a GPU that is
otherwise waiting: run 103 (h200_run103.log) sampled EVA at 996 tokens/s after the first token where
its greedy step alone runs 1152. One program per row reads the row's logits in a few passes instead
(they stay in L2): the largest score, one pass per distinct value above top-n's threshold, and the
draw. The numbers are sampling.draw's up to rounding: the same scores, op for op; the largest p / q
over the kept ids with p the softmax's numerator (its sum divides every p alike, so it cannot move the
argmax) and q the same Exp(1) draws from the row's generator, so a seed gives the same text but where
two ratios are within rounding of each other. Greedy takes the argmax of the scores: bit for bit
without penalties; with them Triton may fuse a penalty's multiply and subtract (one rounding fewer).
A vocabulary of up to ``RESIDENT_MAX`` ids (every model's here) is read once into registers, where each
of those passes is two reductions: on an H200 EVA's top-10 draw took 29.7-29.9 us of GPU time against
66.0-66.7 for the passes over L2, its greedy 4.7 against 6.1 (h200_run116.log, benchmark/sampling.py).

top-p needs the probabilities sorted and stays with the torch ops, as does a top-n above ``MAX_TOP_N``
(a pass per distinct value above the threshold).
"""
import functools
from typing import Optional

import torch

from .compile_ahead import launch
from .triton_int8 import available

MAX_TOP_N = 64
BLOCK = 8192  # ids per pass of a program's loop: with 16 warps the fastest over the cases timed (h200_run107)
WARPS = 16
# A vocabulary of up to this many ids is held in registers, read once; top-n's passes are then reductions
# (the loop read the row from L2 once per pass: EVA's top-10 is 11 passes)
RESIDENT_MAX = 32768
RESIDENT_WARPS = 32  # for RESIDENT_MAX ids, 32 a thread: faster than 8 or 16 warps (h200_run111)


@functools.lru_cache(maxsize=None)
def _kernels():
    from . import sampling_kernels  # imports triton: on first use only
    return sampling_kernels


def handles(logits: torch.Tensor, top_n: Optional[int], top_p: Optional[float]) -> bool:
    """Whether ``draw`` takes these logits and settings (else the torch ops do)."""
    return (logits.is_cuda and logits.dim() == 2 and available() and (top_p is None or top_p >= 1)
            and (top_n is None or top_n <= MAX_TOP_N or top_n >= logits.shape[1]))


def draw(logits: torch.Tensor, temperature: float, top_n: Optional[int], frequency_penalty: float,
         presence_penalty: float, counts: Optional[torch.Tensor], filtered: Optional[torch.Tensor],
         q: Optional[torch.Tensor]) -> torch.Tensor:
    """(batch,) int64 tokens from (batch, vocab) ``logits``, as ``sampling.draw`` gives them: greedy when
    ``temperature`` is 0, else the largest p / ``q`` ((batch, vocab) float32 Exp(1) draws), -1 for a row
    with nothing to sample. ``counts`` (batch, vocab) int, ``filtered`` (vocab,) or (batch, vocab) bool."""
    batch, vocab = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    sampled = temperature != 0
    penalize = counts is not None and (frequency_penalty != 0 or presence_penalty != 0)
    if penalize and counts.stride(1) != 1:
        counts = counts.contiguous()
    if filtered is not None:
        filtered = filtered.expand(batch, vocab)  # a (vocab,) mask is every row's: row stride 0
        if filtered.stride(1) != 1:
            filtered = filtered.contiguous()
        filtered = filtered.view(torch.uint8)
    if sampled and q.stride(1) != 1:
        q = q.contiguous()
    top = sampled and top_n is not None and top_n < vocab
    out = torch.empty(batch, dtype=torch.long, device=logits.device)
    placeholder = logits  # for the pointers a setting leaves unread
    counts_arg = counts if penalize else placeholder
    ban_arg = filtered if filtered is not None else placeholder
    q_arg = q if sampled else placeholder
    row = 1 << (vocab - 1).bit_length()  # the row in one tile: a power of two, as tl.arange needs
    resident = row <= RESIDENT_MAX
    block, warps = (row, max(4, RESIDENT_WARPS * row // RESIDENT_MAX)) if resident else (BLOCK, WARPS)
    launch(_kernels().draw, (batch,), logits, counts_arg, ban_arg, q_arg, out, vocab, logits.stride(0),
           counts_arg.stride(0), ban_arg.stride(0), q_arg.stride(0), float(temperature or 1.0),
           float(frequency_penalty), float(presence_penalty), int(top_n) if top else 0,
           SAMPLED=sampled, PENALIZE=penalize, BAN=filtered is not None, TOP_N=top, BLOCK=block,
           RESIDENT=resident, num_warps=warps)
    return out
