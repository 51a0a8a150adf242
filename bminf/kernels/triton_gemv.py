"""Weight-only int8 GEMV for decode in Triton: ``y = x @ (weight * scale[:, None]).T + bias`` for 1-4 rows.

A decode step multiplies one row (or a few) by every weight of the model once, so its speed is how
fast the int8 weight streams out of memory. ``tl.dot`` pads a single row to 16 and uses tensor cores
for nothing; here each program instead owns ``BLOCK_N`` output features over the whole of K, widens
its (BLOCK_N, BLOCK_K) int8 tile in registers, multiplies by the row(s) of ``x`` and accumulates in
fp32, reducing over K once at the end. Narrow tiles give many programs (several per multiprocessor),
which keeps enough bytes in flight without split-K (and without atomics or a second kernel, so a CUDA
graph holds one node per linear). The row scale and bias are applied to the fp32 accumulator.

Tiles come from ``config(m, n, k)``: a table for the shapes of CPM-1 (2560/10240), CPM-2 (4096/10240)
and EVA (2048/5120), measured on an H200 with ``benchmark/int8_linear.py --sweep``, and a rule for
other shapes. ``BMINF_GEMV_TABLE`` names a JSON file (``{"NxK": [BLOCK_N, BLOCK_K, num_warps]}``, as
``--table-out`` writes it) whose entries take precedence, for tuning another GPU.
"""
import functools
import json
import os
from typing import Dict, Optional, Tuple

import torch

MAX_ROWS = 4

# (n, k) -> (BLOCK_N, BLOCK_K, num_warps) for one row: the fastest of benchmark/int8_linear.py --sweep
# on an H200 (2026-11-29, Triton 3.6; benchmark/results/h200_gemv_table.json). CPM-2's four shapes
# reach 46-52% of HBM read bandwidth with these (fp16 cuBLAS: 79-84%).
TABLE: Dict[Tuple[int, int], Tuple[int, int, int]] = {
    (4096, 4096): (8, 1024, 4), (10240, 4096): (16, 256, 4), (4096, 10240): (8, 1024, 4),     # CPM-2
    (2560, 2560): (4, 512, 4), (10240, 2560): (16, 256, 4), (2560, 10240): (4, 1024, 4),      # CPM-1
    (2048, 2048): (4, 1024, 4), (5120, 2048): (8, 512, 4), (2048, 5120): (4, 1024, 4),        # EVA
}


@functools.lru_cache(maxsize=None)
def _table() -> Dict[Tuple[int, int], Tuple[int, int, int]]:
    table = dict(TABLE)
    path = os.environ.get("BMINF_GEMV_TABLE")
    if path:
        try:
            with open(path) as f:
                entries = json.load(f)
            table.update({tuple(int(v) for v in key.split("x")): tuple(int(v) for v in tiles)
                          for key, tiles in entries.items()})
        except (OSError, ValueError, AttributeError, TypeError) as e:
            raise ValueError(f"BMINF_GEMV_TABLE={path!r}: expected a JSON file of {{\"NxK\": [BLOCK_N, BLOCK_K, "
                             f"num_warps]}} ({e})") from None
    return table


@functools.lru_cache(maxsize=None)
def _kernel():
    # built on first use: importing triton costs time, and CPU-only installs may lack it
    import triton
    import triton.language as tl

    @triton.jit
    def int8_gemv(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K,
                  HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # x (M, K), w (N, K) int8, s (N,), b (N,), y (M, N); all contiguous, M <= BLOCK_M
        pid = tl.program_id(0)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.arange(0, BLOCK_M)
        rk = tl.arange(0, BLOCK_K)
        n_ok = rn < N
        # (BLOCK_M, BLOCK_N, BLOCK_K) partial sums; summed over K once, after the loop
        acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            k_ok = kk < K
            w = tl.load(w_ptr + rn[:, None] * K + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
            x = tl.load(x_ptr + rm[:, None] * K + kk[None, :], mask=(rm[:, None] < M) & k_ok[None, :], other=0.0)
            acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
        out = tl.sum(acc, axis=2)  # (BLOCK_M, BLOCK_N)
        out *= tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            out += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * N + rn[None, :], out.to(y_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & n_ok[None, :])

    return int8_gemv, triton.cdiv


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def config(m: int, n: int, k: int, device: torch.device) -> Tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps)`` for an (m, k) x (n, k)^T problem.

    The rule: the widest power-of-two tile of output features that still gives every
    multiprocessor four programs (memory parallelism comes from many programs in flight), 512
    bytes of each weight row per step; fewer K per step for more rows (registers).
    """
    block_m = 1 if m == 1 else (2 if m == 2 else 4)
    table = _table()
    if (n, k) in table:
        block_n, block_k, warps = table[(n, k)]
    else:
        block_n = 32
        while block_n > 4 and n // block_n < 4 * _multiprocessors(device):
            block_n //= 2
        block_k, warps = 512, 4
    # the accumulator holds BLOCK_M * BLOCK_N * BLOCK_K fp32 values over 32 * warps threads
    while block_m * block_n * block_k > 64 * 32 * warps and block_k > 64:
        block_k //= 2
    return block_m, block_n, block_k, warps


def int8_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor] = None,
              tiles: Optional[Tuple[int, int, int]] = None) -> torch.Tensor:
    """Weight-only int8 linear for ``x`` of at most ``MAX_ROWS`` rows (any leading shape).

    ``tiles`` = (BLOCK_N, BLOCK_K, num_warps) overrides the table (for tuning).

    >>> # on a GPU: int8_gemv(x_fp16[1, 4096], w_int8[10240, 4096], s_fp16[10240]).shape == (1, 10240)
    """
    kernel, cdiv = _kernel()
    n, k = weight.shape
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    if not 0 < m <= MAX_ROWS:
        raise ValueError(f"int8_gemv takes 1 to {MAX_ROWS} rows, got {m}")
    block_m, block_n, block_k, warps = config(m, n, k, x.device)
    if tiles is not None:
        block_n, block_k, warps = tiles
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    b = bias.to(x.dtype).contiguous() if bias is not None else scale  # a placeholder pointer when absent
    kernel[(cdiv(n, block_n),)](x2, weight, scale.contiguous(), b, y, m, n, k, HAS_BIAS=bias is not None,
                                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    return y.reshape(*x.shape[:-1], n)
