"""Weight-only int8 GEMV for decode in Triton: ``y = x @ (weight * scale[:, None]).T + bias`` for 1-4 rows
(``triton_int8`` sends it one: from 2 rows on its split-K matmul is faster).

A decode step multiplies one row (or a few) by every weight of the model once, so its speed is how
fast the int8 weight streams out of memory. ``tl.dot`` pads a single row to 16 and uses tensor cores
for nothing; here each program instead owns ``BLOCK_N`` output features over the whole of K, widens
its (BLOCK_N, BLOCK_K) int8 tile in registers, multiplies by the row(s) of ``x`` and accumulates in
fp32. The row scale and bias are applied to the fp32 accumulator.

Measured on an H200 with weights that do not fit in L2 (``benchmark/int8_linear.py --sweep``), a
launch costs a few microseconds of ramp-up and tail whatever its size, which is most of a 16 MB
weight's 3.7 us at the HBM rate. So one launch does more than one linear where a layer allows:

``int8_gemv_many`` runs up to three linears of one shape on the same input (attention's q, k and v),
the programs of all of them in one grid: CPM-2's q/k/v take 20.9 us in one launch against 26.2 us
in three. The kernel also applies what follows a linear before its store (``EPILOGUE``):
``int8_gemv_gated`` is T5's feed-forward input, each program reading the same rows of both weights
and storing ``gelu(a) * g`` (CPM-2: 22.2 us, 88% of HBM read, against 26.5 for one launch then the
GELU and product; h200_run14.log), ``int8_gemv_gelu`` GPT's (9.2 us against 10.4 at CPM-1's size)
and ``int8_gemv_add`` a residual add (9.9 against 11.2). The epilogues round to fp16 where the torch
ops they replace store fp16 tensors, so they differ from them only in the GELU's tanh.

int8 is widened to fp32 without conversion instructions, which on Hopper run at a quarter of the
FMA rate, about the HBM byte rate: a byte permute puts ``v + 128`` under the exponent of 2^23 and
one subtraction leaves ``v`` exactly (``gemv_kernels.WIDEN_PRMT``). On CPM-2's three shapes that
took 8.1/14.6/13.5 us against 8.4/15.9/16.7 us through ``cvt`` to fp16 then fp32
(``BMINF_GEMV_WIDEN=cvt``; benchmark/results/h200_int8_linear_widen.json), which was itself faster
than straight to fp32; loads without masks where the tiles divide the shape helped too (the first
kernel took 9.7/22.5/20.5 us). For one row, summing each tile's products over K as they come (an
accumulator of BLOCK_N floats, so registers go to loads in flight) with the weight loaded
``evict_first`` then took 6.5/12.5/13.1 us (60/78/75% of HBM read; h200_gemv_sweep2.log).

Launched with programmatic dependent launch (``dependent_launch``), each program loads its first
weight tile, its scales and bias while the kernel before it is finishing, and waits for it only to
read ``x``.

T5's feed-forward output at CPM-2's and EVA's sizes and CPM-1's attention output take ``gluon_gemv``
instead where it can run (Triton 3.6 on Hopper), which streams the weight through shared memory and made
those steps 1-3% faster.

Tiles come from ``config(m, n, k)``: a table for the shapes of CPM-1 (2560/10240), CPM-2 (4096/10240)
and EVA (2048/5120), and a rule for other shapes. ``BMINF_GEMV_TABLE`` names a JSON file
(``{"NxK": [BLOCK_N, BLOCK_K, num_warps, num_stages]}``; ``"NxKx2"`` for the gated GELU) whose entries
take precedence, for tuning another GPU or model: ``python -m benchmark.tune_step --table-out`` writes
one tuned on the graphed decode step, ``benchmark/int8_linear.py --sweep --table-out`` on each kernel
alone.
"""
import functools
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import dependent_launch, gluon_gemv
from .compile_ahead import launch

MAX_ROWS = 4
MAX_GROUP = 3
PLAIN, GELU, GATED, ADD = 0, 1, 2, 3  # the kernel's epilogues (gemv_kernels reads these)

# (n, k) -> (BLOCK_N, BLOCK_K, num_warps, num_stages) for one row: the fastest in a sweep on an H200
# (2026-11-29, Triton 3.6; benchmark/results/h200_gemv_sweep2.json), weights rotating through more
# memory than L2 holds, widening by byte permutes. num_stages is 1: Triton pipelines only loads that
# feed tl.dot, so it changes nothing here. Four entries were then tuned on the graphed decode step
# itself, where each launch follows a norm, attention or another GEMV under dependent launch and a lone
# kernel's best is not the step's: T5's gated input at CPM-2's size (8, 256, 4) took the step from 2.105
# to 2.022 ms; EVA's 2048x2048 (4, 2048, 4) from 0.932 to 0.914; CPM-1's 2560x2560 and 2560x10240
# together from 1.371 to 1.291 (h200_run70_step_tune.log, each pair alternated twice in one process).
TABLE: Dict[Tuple[int, ...], Tuple[int, int, int, int]] = {
    (4096, 4096): (2, 2048, 2, 1), (10240, 4096): (4, 1024, 2, 1), (4096, 10240): (2, 2048, 2, 1),     # CPM-2
    (2560, 2560): (4, 512, 2, 1), (10240, 2560): (4, 512, 2, 1), (2560, 10240): (2, 2048, 4, 1),       # CPM-1
    (2048, 2048): (4, 2048, 4, 1), (5120, 2048): (2, 2048, 2, 1), (2048, 5120): (1, 1024, 4, 1),       # EVA
    # T5's gated GELU: each program reads the tile of both input weights
    (10240, 4096, 2): (8, 256, 4, 1), (5120, 2048, 2): (2, 512, 2, 1),
}


def _four(tiles, name: str) -> Tuple[int, int, int, int]:
    """``(BLOCK_N, BLOCK_K, num_warps, num_stages)`` from three or four numbers (two stages if absent)."""
    tiles = tuple(int(v) for v in tiles)
    if len(tiles) not in (3, 4):
        raise ValueError(f"{name}: {len(tiles)} numbers")
    return tiles if len(tiles) == 4 else tiles + (2,)


@functools.lru_cache(maxsize=None)
def _table() -> Dict[Tuple[int, ...], Tuple[int, int, int, int]]:
    table = dict(TABLE)
    path = os.environ.get("BMINF_GEMV_TABLE")
    if path:
        try:
            with open(path) as f:
                entries = json.load(f)
            for key, tiles in entries.items():
                table[tuple(int(v) for v in key.split("x"))] = _four(tiles, key)
        except (OSError, ValueError, AttributeError, TypeError) as e:
            raise ValueError(f"BMINF_GEMV_TABLE={path!r}: expected a JSON file of {{\"NxK\": [BLOCK_N, BLOCK_K, "
                             f"num_warps, num_stages]}} ({e})") from None
    return table


@functools.lru_cache(maxsize=None)
def widen_by_permute() -> bool:
    """Whether the GEMV (and ``triton_int8``'s split-K matmul) widen int8 by byte permutes (``prmt``, the
    default) rather than conversion instructions (``BMINF_GEMV_WIDEN=cvt``); both give the same numbers."""
    value = os.environ.get("BMINF_GEMV_WIDEN", "prmt")
    if value not in ("cvt", "prmt"):
        raise ValueError(f"BMINF_GEMV_WIDEN must be 'cvt' or 'prmt', got {value!r}")
    # Triton's CPU interpreter (the tests' TRITON_INTERPRET=1) cannot run inline PTX
    return value == "prmt" and os.environ.get("TRITON_INTERPRET") != "1"


@functools.lru_cache(maxsize=None)
def _kernel():
    # imported on first use: importing triton costs time, and CPU-only installs may lack it
    from . import gemv_kernels
    return gemv_kernels.int8_gemv, gemv_kernels.triton.cdiv


@functools.lru_cache(maxsize=None)
def multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def config(m: int, n: int, k: int, device: torch.device, weights: int = 1) -> Tuple[int, int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)`` for an (m, k) x (n, k)^T problem, each
    program reading that tile of ``weights`` matrices (2: the gated GELU).

    The rule: the widest power-of-two tile of output features that still gives every
    multiprocessor four programs (memory parallelism comes from many programs in flight), 512
    bytes of each weight row per step. More rows take one row's tiles: each row's products are
    summed from the same widened tile (at 3-4 rows on CPM-2's shapes within 7% of the best tile in a
    sweep; at 2 rows 10240x4096 took 22.5 us against the best 17.0, the others within 4%;
    h200_run37_gemv_rows.log).
    """
    block_m = 1 if m == 1 else (2 if m == 2 else 4)
    table = _table()
    if (n, k) in table:
        block_n, block_k, warps, stages = table[(n, k)]
    else:
        block_n = 32
        while block_n > 4 and n // block_n < 4 * multiprocessors(device):
            block_n //= 2
        block_k, warps, stages = 512, 4, 2
    if (n, k, weights) in table:
        block_n, block_k, warps, stages = table[(n, k, weights)]
    # the widened tiles hold weights * BLOCK_N * BLOCK_K fp32 values over 32 * warps threads
    while weights * block_n * block_k > 64 * 32 * warps and block_k > 64:
        block_k //= 2
    return block_m, block_n, block_k, warps, stages


def _rows(x: torch.Tensor, k: int) -> torch.Tensor:
    x2 = x.reshape(-1, k).contiguous()
    if not 0 < x2.shape[0] <= MAX_ROWS:
        raise ValueError(f"int8_gemv takes 1 to {MAX_ROWS} rows, got {x2.shape[0]}")
    return x2


def padded(seq: Sequence) -> list:
    """``seq`` filled up to ``MAX_GROUP`` with its first item: the kernels always take three of each."""
    return list(seq) + [seq[0]] * (MAX_GROUP - len(seq))


def check_group(weights: Sequence[torch.Tensor], scales: Sequence[torch.Tensor],
                biases: Sequence[Optional[torch.Tensor]]) -> None:
    """Raise ``ValueError`` unless these are 1-3 weights of one shape, each with a scale, and a bias for
    every weight or for none."""
    if not 0 < len(weights) <= MAX_GROUP or len(scales) != len(weights):
        raise ValueError(f"int8_gemv_many takes 1 to {MAX_GROUP} weights with one scale each")
    if len(biases) != len(weights) or len({b is None for b in biases}) > 1:
        raise ValueError("int8_gemv_many: give a bias for every weight or for none")
    for w in weights[1:]:
        if w.shape != weights[0].shape:
            raise ValueError(f"int8_gemv: grouped weights must share one shape, got {tuple(weights[0].shape)} "
                             f"and {tuple(w.shape)}")


def check_residual(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor) -> None:
    if residual.shape != (*x.shape[:-1], weight.shape[0]):
        raise ValueError(f"int8_gemv_add: residual shape {tuple(residual.shape)} does not match the output "
                         f"{(*x.shape[:-1], weight.shape[0])}")


def _launch(x: torch.Tensor, weights: Sequence[torch.Tensor], scales: Sequence[torch.Tensor],
            biases: Sequence[Optional[torch.Tensor]], tiles, epilogue: int = 0,
            residual: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
    kernel, cdiv = _kernel()
    check_group(weights, scales, biases)
    n, k = weights[0].shape
    x2 = _rows(x, k)
    m = x2.shape[0]
    gated = epilogue == GATED
    outs = [torch.empty(m, n, dtype=x.dtype, device=x.device) for _ in weights[:1 if gated else None]]
    has_bias = biases[0] is not None
    r = x2 if residual is None else residual.reshape(m, n).contiguous()
    if epilogue != GATED and len(weights) == 1 and tiles is None and widen_by_permute():
        tile = gluon_gemv.tiles(x2, weights[0])  # where it was faster in a step: see gluon_gemv
        if tile is not None:
            bias = biases[0].to(x.dtype).contiguous() if has_bias else None
            gluon_gemv.int8_gemv(x2, weights[0], scales[0].contiguous(), outs[0], tile, bias, epilogue,
                                 None if residual is None else r)
            return [outs[0].reshape(*x.shape[:-1], n)]
    block_m, block_n, block_k, warps, stages = config(m, n, k, x.device, 2 if gated else 1)
    if tiles is not None:
        block_n, block_k, warps, stages = _four(tiles, "tiles")
    s = [t.contiguous() for t in scales]
    b = [t.to(x.dtype).contiguous() for t in biases] if has_bias else s  # placeholders when absent
    pad = padded
    grid = (cdiv(n, block_n) * (1 if gated else len(weights)),)
    launch(kernel, grid, x2, *pad(weights), *pad(s), *pad(b), *pad(outs), r, m, n, k, GROUP=len(weights),
           HAS_BIAS=has_bias, EVEN=n % block_n == 0 and k % block_k == 0, PRMT=widen_by_permute(), EPILOGUE=epilogue,
           BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
           **dependent_launch.options(x.device))
    return [y.reshape(*x.shape[:-1], n) for y in outs]


def int8_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor] = None,
              tiles: Optional[Tuple[int, ...]] = None) -> torch.Tensor:
    """Weight-only int8 linear for ``x`` of at most ``MAX_ROWS`` rows (any leading shape).

    ``tiles`` = (BLOCK_N, BLOCK_K, num_warps[, num_stages]) overrides the table (for tuning).

    >>> # on a GPU: int8_gemv(x_fp16[1, 4096], w_int8[10240, 4096], s_fp16[10240]).shape == (1, 10240)
    """
    return _launch(x, [weight], [scale], [bias], tiles)[0]


def int8_gemv_many(x: torch.Tensor, weights: Sequence[torch.Tensor], scales: Sequence[torch.Tensor],
                   biases: Optional[Sequence[Optional[torch.Tensor]]] = None,
                   tiles: Optional[Tuple[int, ...]] = None) -> List[torch.Tensor]:
    """``[int8_gemv(x, w, s, b) for ...]`` for 1-3 weights of one shape, in one launch.

    >>> # on a GPU: q, k, v = int8_gemv_many(x, [wq, wk, wv], [sq, sk, sv])
    """
    biases = list(biases) if biases is not None else [None] * len(weights)
    return _launch(x, list(weights), list(scales), biases, tiles)


def int8_gemv_gelu(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                   bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``gelu_tanh(int8_gemv(x, weight, scale, bias))`` in one launch (GPT's feed-forward input)."""
    return _launch(x, [weight], [scale], [bias], None, GELU)[0]


def int8_gemv_gated(x: torch.Tensor, weight_in: torch.Tensor, scale_in: torch.Tensor, weight_gated: torch.Tensor,
                    scale_gated: torch.Tensor) -> torch.Tensor:
    """``gelu_tanh(int8_gemv(x, weight_in, scale_in)) * int8_gemv(x, weight_gated, scale_gated)`` (T5 v1.1's
    feed-forward input) in one launch, each program reading the same rows of both weights (of one
    shape, as ``_launch`` checks)."""
    return _launch(x, [weight_in, weight_gated], [scale_in, scale_gated], [None, None], None, GATED)[0]


def int8_gemv_add(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                  residual: torch.Tensor) -> torch.Tensor:
    """``residual + int8_gemv(x, weight, scale, bias)`` in one launch (the output rounded to fp16 before
    the add, as the two torch ops round)."""
    check_residual(x, weight, residual)
    return _launch(x, [weight], [scale], [bias], None, ADD, residual.to(x.dtype))[0]
