"""The Triton kernel of ``triton_sampling`` (imported on first use: it imports triton)."""
import triton
import triton.language as tl

NONE = tl.constexpr(2**31 - 1)  # an index past every vocabulary: "not found"


@triton.jit
def scores_tile(logits_row, counts_row, ban_row, ro, ok, temperature, freq, presence,
                SAMPLED: tl.constexpr, PENALIZE: tl.constexpr, BAN: tl.constexpr):
    # sampling.scores on the ids ro: float32, the same ops in the same order; -inf past the vocabulary
    z = tl.load(logits_row + ro, mask=ok, other=0.0).to(tl.float32)
    if SAMPLED:
        z = z / temperature
    if PENALIZE:
        c = tl.load(counts_row + ro, mask=ok, other=0)
        z = z - freq * c.to(tl.float32)
        z = z - presence * tl.where(c > 0, 1.0, 0.0)
    if BAN:
        z = tl.where(tl.load(ban_row + ro, mask=ok, other=0) != 0, float("-inf"), z)
    return tl.where(ok, z, float("-inf"))


@triton.jit
def draw(logits_ptr, counts_ptr, ban_ptr, q_ptr, out_ptr, V, sl_b, sc_b, sb_b, sq_b, temperature, freq, presence,
         top_n, SAMPLED: tl.constexpr, PENALIZE: tl.constexpr, BAN: tl.constexpr, TOP_N: tl.constexpr,
         BLOCK: tl.constexpr, RESIDENT: tl.constexpr):
    # One program per row, in passes over the row's ids, BLOCK at a time (a row's logits stay in L2).
    # Greedy: the first index of the largest score, or of the first NaN (as torch.argmax). Sampled: the
    # first index of the largest p / q, p the softmax of the scores over what top-n keeps (the n largest,
    # ties to the lower index), q the row's Exp(1) draws (sampling.draw's draw); -1 where p is not a
    # distribution (a NaN or +inf score, or every score -inf), as sampling.draw gives.
    b = tl.program_id(0).to(tl.int64)
    logits_row, counts_row, ban_row = logits_ptr + b * sl_b, counts_ptr + b * sc_b, ban_ptr + b * sb_b
    r = tl.arange(0, BLOCK)
    if RESIDENT:  # the whole row in one tile (BLOCK >= V): read once, every pass over registers
        _draw_resident(logits_row, counts_row, ban_row, q_ptr + b * sq_b, out_ptr + b, r, V, temperature, freq,
                       presence, top_n, SAMPLED, PENALIZE, BAN, TOP_N)
    else:
        # pass 1: the largest score that is not NaN, its first index, and whether a score is NaN or +inf
        best = float("-inf")
        best_i = 0
        nan_i = NONE
        for start in range(0, V, BLOCK):
            ro = start + r
            z = scores_tile(logits_row, counts_row, ban_row, ro, ro < V, temperature, freq, presence,
                            SAMPLED, PENALIZE, BAN)
            nan_i = tl.minimum(nan_i, tl.min(tl.where(z != z, ro, NONE)))
            z = tl.where(z != z, float("-inf"), z)
            m = tl.max(z)
            i = tl.min(tl.where(z == m, ro, NONE))
            best_i = tl.where(m > best, i, best_i)  # strictly larger: an earlier tile keeps a tie
            best = tl.maximum(best, m)
            if SAMPLED:
                nan_i = tl.minimum(nan_i, tl.min(tl.where(z == float("inf"), ro, NONE)))
        if not SAMPLED:
            tl.store(out_ptr + b, tl.where(nan_i < NONE, nan_i, best_i).to(tl.int64))
        else:
            pick_i = _pick(logits_row, counts_row, ban_row, q_ptr + b * sq_b, r, V, best, temperature, freq,
                           presence, top_n, PENALIZE, BAN, TOP_N, BLOCK)
            valid = (nan_i == NONE) & (best > float("-inf"))
            tl.store(out_ptr + b, tl.where(valid, pick_i, -1).to(tl.int64))


@triton.jit
def _pick(logits_row, counts_row, ban_row, q_row, r, V, best, temperature, freq, presence, top_n,
          PENALIZE: tl.constexpr, BAN: tl.constexpr, TOP_N: tl.constexpr, BLOCK: tl.constexpr):
    # The first index of the largest p / q. p = exp(score - best) where top-n keeps the score, else 0: the
    # softmax up to its sum, which does not move the argmax, so there is no pass for the sum.
    # top-n: the n-th largest score ``level`` (counting repeats), one pass per distinct value above it;
    # of the scores equal to it the first ``top_n - above`` by index are kept
    level = float("inf")
    above = 0  # scores > level
    if TOP_N:
        seen = 0  # scores >= level
        while (seen < top_n) & (level > float("-inf")):
            nxt = float("-inf")
            count = 0
            for start in range(0, V, BLOCK):
                ro = start + r
                z = scores_tile(logits_row, counts_row, ban_row, ro, ro < V, temperature, freq, presence,
                                True, PENALIZE, BAN)
                m = tl.max(tl.where(z < level, z, float("-inf")))
                c = tl.sum(tl.where(z == m, 1, 0))
                count = tl.where(m > nxt, c, tl.where(m == nxt, count + c, count))
                nxt = tl.maximum(nxt, m)
            above = seen
            seen += count
            level = nxt
    pick = -1.0
    pick_i = 0
    tied = 0  # scores equal to level in the tiles before
    for start in range(0, V, BLOCK):
        ro = start + r
        ok = ro < V
        z = scores_tile(logits_row, counts_row, ban_row, ro, ok, temperature, freq, presence, True, PENALIZE, BAN)
        p = tl.exp(z - best)
        if TOP_N:
            at = z == level
            rank = tied + tl.cumsum(tl.where(at, 1, 0), axis=0)  # 1-based among the scores equal to level
            p = tl.where((z > level) | (at & (rank <= top_n - above)), p, 0.0)
            tied += tl.sum(tl.where(at, 1, 0))
        ratio = p / tl.load(q_row + ro, mask=ok, other=1.0)
        m = tl.max(ratio)
        i = tl.min(tl.where(ratio == m, ro, NONE))
        pick_i = tl.where(m > pick, i, pick_i)  # strictly larger: an earlier tile keeps a tie
        pick = tl.maximum(pick, m)
    return pick_i


@triton.jit
def _draw_resident(logits_row, counts_row, ban_row, q_row, out, ro, V, temperature, freq, presence, top_n,
                   SAMPLED: tl.constexpr, PENALIZE: tl.constexpr, BAN: tl.constexpr, TOP_N: tl.constexpr):
    # draw's passes on a row held in registers: the same rules, but each of top-n's passes costs two
    # reductions instead of a read of the row from L2 (one program per row: at batch 1 one multiprocessor
    # does it all)
    ok = ro < V
    z = scores_tile(logits_row, counts_row, ban_row, ro, ok, temperature, freq, presence, SAMPLED, PENALIZE, BAN)
    nan_i = tl.min(tl.where(z != z, ro, NONE))  # a row with a NaN ends as -1 (sampled) or its index (greedy)
    best = tl.max(z)
    if not SAMPLED:
        best_i = tl.min(tl.where(z == best, ro, NONE))
        tl.store(out, tl.where(nan_i < NONE, nan_i, best_i).to(tl.int64))
    else:
        nan_i = tl.minimum(nan_i, tl.min(tl.where(z == float("inf"), ro, NONE)))
        p = tl.exp(z - best)
        if TOP_N:  # as _pick: the n-th largest score, one pass per distinct value above it
            level = float("inf")
            above = 0
            seen = 0
            while (seen < top_n) & (level > float("-inf")):
                # two reductions: one over (value, count) pairs took longer a pass, 2.24 us against 1.90 over
                # 32768 ids with 32 warps (h200_run115_pass_cost.log)
                nxt = tl.max(tl.where(z < level, z, float("-inf")))
                above = seen
                seen += tl.sum(tl.where(z == nxt, 1, 0))
                level = nxt
            at = z == level
            keep = (z > level) | at
            if seen > top_n:  # the scores equal to level straddle the n-th: the first top_n - above by index
                keep = (z > level) | (at & (tl.cumsum(at.to(tl.int32), axis=0) <= top_n - above))
            p = tl.where(keep, p, 0.0)
        ratio = p / tl.load(q_row + ro, mask=ok, other=1.0)
        pick_i = tl.min(tl.where(ratio == tl.max(ratio), ro, NONE))
        valid = (nan_i == NONE) & (best > float("-inf"))
        tl.store(out, tl.where(valid, pick_i, -1).to(tl.int64))
