"""The one-row int8 GEMV for T5's feed-forward output and CPM-1's attention output, written in Gluon,
Triton's lower-level language.

``triton_gemv``'s kernel loads each weight tile into registers, one tile in flight per program (Triton
pipelines loads into shared memory only for ``tl.dot``'s operands, and a loop carrying tiles in
registers ran at half the speed: h200_run50.log, h200_run79_80_norm_fuse_ahead.log). Here each program
copies its tiles into a ring of shared memory with ``cp.async``, ``STAGES`` tiles in flight, the first
ones issued before the dependent-launch wait, and sums each tile once it has landed.

Measured on an H200 with Triton 3.6 (``h200_run84_85_gluon_gemv.log``, ``h200_run86_87_gluon_step.log``):
as a decode step launches it, back to back, 4096x10240 reads 79% of HBM against the Triton GEMV's 75%,
10240x4096 82% against 70%, but 4096x4096 65% against 70%; in the graphed step only the feed-forward
output gained: CPM-2's step 1.984 against 2.025 ms (medians of four, alternated), EVA's 0.902 against
0.911, while the gated input and the square shapes took longer. So ``TABLE`` holds those two shapes:
CPM-2 then decodes 503.2 tokens/s against 492.0-492.1, EVA 1095.8-1096.9 against 1084.0-1084.5
(h200_run88_gluon_ffn_out.log, alternated twice). With the Triton GEMV's bias, GELU and residual-add
epilogues (same roundings), CPM-1's shapes were tried one at a time in its graphed step
(h200_run133_gluon_epilogues.log): only the attention output (2560x2560, + bias + residual) gained,
1240.8-1240.9 us a step against 1280.8-1281.7 alternated twice; the feed-forward input (GELU) and output
took 12-201 us longer with every tile tried.

Gluon's API is experimental and changes between Triton releases (3.9 renamed the copy this kernel
uses), so the kernel runs only with the Triton it was measured with (``TRITONS``), on Hopper, and the
Triton GEMV serves everywhere else. ``BMINF_GEMV_GLUON=0`` turns it off. It widens int8 by byte
permutes only (``BMINF_GEMV_WIDEN=cvt`` keeps the Triton GEMV). Numbers: the same products and fp32
sums as the Triton GEMV, added in another order (within 1e-3 of it, relative).
"""
import functools
import importlib.util
import os
from typing import Optional, Tuple

import torch

from . import dependent_launch
from .compile_ahead import launch

TRITONS = ("3.6",)  # Triton releases (major.minor) this kernel was measured with
# (n, k) -> (BLOCK_N, BLOCK_K, STAGES, num_warps), chosen on the graphed decode step: T5's feed-forward output
# (h200_run86_87_gluon_step.log) and CPM-1's attention output with its residual add (h200_run133_gluon_epilogues.log)
TABLE = {(4096, 10240): (8, 1024, 2, 4), (2048, 5120): (8, 1024, 2, 4), (2560, 2560): (8, 512, 2, 4)}


@functools.lru_cache(maxsize=None)
def usable(device: torch.device) -> bool:
    """Whether the kernel may run on ``device``: a Hopper GPU (compute capability 9.x), a Triton of
    ``TRITONS`` with Gluon, and ``BMINF_GEMV_GLUON`` not 0 (the caller checks the widening)."""
    value = os.environ.get("BMINF_GEMV_GLUON", "1")
    if value not in ("0", "1"):
        raise ValueError(f"BMINF_GEMV_GLUON must be '0' or '1', got {value!r}")
    if value == "0" or device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if torch.cuda.get_device_capability(device)[0] != 9:
        return False
    try:
        import triton
    except ImportError:
        return False
    has_gluon = importlib.util.find_spec("triton.experimental.gluon") is not None
    return has_gluon and ".".join(triton.__version__.split(".")[:2]) in TRITONS


def tiles(x2: torch.Tensor, weight: torch.Tensor) -> Optional[Tuple[int, int, int, int]]:
    """``TABLE``'s tiles for ``x2`` (m, k) times ``weight`` (n, k)^T where this kernel takes it (one row, a
    shape of the table, a weight on a 16-byte boundary, a usable device), else None."""
    n, k = weight.shape
    if x2.shape[0] != 1 or (n, k) not in TABLE or not _aligned(weight) or not usable(x2.device):
        return None
    return TABLE[(n, k)]


def _aligned(weight: torch.Tensor) -> bool:
    # cp.async copies 16 bytes at a time: the kernel compiles only for a weight whose address (and
    # each row's: k is a multiple of 16) Triton can tell lies on a 16-byte boundary
    return weight.data_ptr() % 16 == 0 and weight.shape[1] % 16 == 0


@functools.lru_cache(maxsize=None)
def _kernel():
    from . import gluon_kernels  # imported on first use: it imports triton's experimental Gluon
    return gluon_kernels.int8_gemv


def int8_gemv(x2: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, out: torch.Tensor,
              tile: Tuple[int, int, int, int], bias: Optional[torch.Tensor] = None, epilogue: int = 0,
              residual: Optional[torch.Tensor] = None) -> None:
    """``out = x2 @ (weight * scale[:, None]).T (+ bias)`` for one row ``x2`` (1, k) fp16, into ``out`` (1, n),
    through ``triton_gemv``'s ``epilogue`` PLAIN, GELU or ADD (``+ residual`` (1, n)), with ``tile`` =
    (BLOCK_N, BLOCK_K, STAGES, num_warps) that divide the shape."""
    from .triton_gemv import ADD, GELU, PLAIN
    n, k = weight.shape
    block_n, block_k, stages, warps = tile
    if n % block_n or k % block_k:
        raise ValueError(f"gluon_gemv: tiles {tile} do not divide the weight's shape {(n, k)}")
    if not _aligned(weight):
        raise ValueError("gluon_gemv: the weight must start on a 16-byte boundary, with rows a multiple of 16 bytes")
    if epilogue not in (PLAIN, GELU, ADD) or (epilogue == ADD) != (residual is not None):
        raise ValueError(f"gluon_gemv: epilogue {epilogue} with{'out' if residual is None else ''} a residual")
    launch(_kernel(), (n // block_n,), x2, weight, scale, scale if bias is None else bias,
           out if residual is None else residual, out, n, k, HAS_BIAS=bias is not None, EPILOGUE=epilogue,
           BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages, LANES_K=min(32, block_k // 16), WARPS=warps,
           num_warps=warps, **dependent_launch.options(x2.device))
