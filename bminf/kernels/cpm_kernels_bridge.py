"""Optional backend: the int8 GEMM of ``cpm_kernels`` (the CUDA kernels BMInf 1.x and 2.0 shipped).

Used by ``int8_linear`` only on a CUDA device where it imported, its kernels loaded and a
numerical self-check against our PyTorch path passed; otherwise bminf logs one line and stays
on PyTorch. On the H100 it failed ("no kernel image": its fatbins stop before sm_90), so GPUs of
compute capability 9.0 and later are not probed.

It changes numerics: cpm_kernels is W8A8 (each activation row is quantized to int8 too, with its
own absmax/127 scale), so results differ from the W8A16 PyTorch path by about 1/254 of each row's
range; and it needs fp16 inputs and K, N multiples of 4. Set ``BMINF_CPM_KERNELS=0`` to turn it off.

>>> usable(torch.device("cpu"))
False
"""
import logging
import os
from typing import Callable, Dict, Optional, Tuple

import torch

__all__ = ["usable", "supports", "int8_linear", "self_check", "probe", "TOLERANCE"]

_log = logging.getLogger("bminf")
_state: Dict[Tuple[str, int], bool] = {}
_ops = None
# max |kernel - reference| / max |reference| on the self-check problem. W8A8 rounding gives ~0.01;
# a wrong kernel (layout, transposition, garbage) gives ~1.
TOLERANCE = 0.03


def _load():
    """Import cpm_kernels' torch-level GEMM helpers (loading its CUDA libraries)."""
    from cpm_kernels.torch.gemm import calc_scale, gemm_and_scale, round_i8
    return calc_scale, round_i8, gemm_and_scale


def _reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.float() @ (weight.float() * scale.float()[:, None]).t()


def self_check(kernel: Callable, device: torch.device, dtype: torch.dtype = torch.float16) -> Tuple[bool, float]:
    """Run ``kernel(x, weight, scale)`` on a fixed random problem and compare with the reference.

    Returns ``(passed, relative max error)``.
    """
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 256, generator=g).to(device, dtype)
    weight = torch.randint(-127, 128, (64, 256), generator=g, dtype=torch.int8).to(device)
    scale = (torch.rand(64, generator=g) * 0.01 + 1e-3).to(device, torch.float16)
    ref = _reference(x, weight, scale)
    out = kernel(x, weight, scale)
    if out.shape != ref.shape:
        return False, float("inf")
    err = float((out.float() - ref).abs().max() / ref.abs().max())
    return err <= TOLERANCE, err


def _w8a8(ops, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    calc_scale, round_i8, gemm_and_scale = ops
    m = x.shape[0]
    pad = (-m) % 4  # cuBLASLt int8 needs M, N, K multiples of 4; zero rows quantize to zero
    a = torch.nn.functional.pad(x, (0, 0, 0, pad)).contiguous()[None]          # (1, M, K)
    with torch.cuda.device(x.device):
        sa = calc_scale(a, False)                                               # (1, M)
        qa = round_i8(a, sa, False)
        out = gemm_and_scale(qa, sa, weight.contiguous()[None], scale.contiguous()[None], False, True)
    return out[0, :m]                                                           # (M, N) fp16


def probe(device: torch.device, loader: Callable = _load) -> bool:
    """Load the kernels and self-check them on ``device``; log one line on failure."""
    global _ops
    try:
        ops = loader()
        ok, err = self_check(lambda x, w, s: _w8a8(ops, x, w, s), device)
    except Exception as e:  # any import, driver or kernel-load failure means: not on this device
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        _log.info("bminf: cpm_kernels not used on %s (%s); using the PyTorch int8 path", device, reason)
        return False
    if not ok:
        _log.warning("bminf: cpm_kernels failed its self-check on %s (relative error %.3g > %g); "
                     "using the PyTorch int8 path", device, err, TOLERANCE)
        return False
    _ops = ops
    _log.info("bminf: cpm_kernels int8 GEMM (W8A8) in use on %s (self-check error %.3g)", device, err)
    return True


def usable(device: torch.device) -> bool:
    """Whether ``int8_linear`` may use cpm_kernels on ``device`` (probed once per device)."""
    if device.type != "cuda" or os.environ.get("BMINF_CPM_KERNELS", "1") == "0":
        return False
    key = (device.type, device.index if device.index is not None else torch.cuda.current_device())
    if key not in _state:
        dev = torch.device(*key)
        if torch.cuda.get_device_capability(dev)[0] >= 9:
            # its fatbins stop before sm_90 ("no kernel image" on the H100 and H200): importing it and
            # failing the self-check cost a first call 0.4 s (more where Python has no bytecode cached)
            _log.info("bminf: cpm_kernels not used on %s (no kernels for compute capability 9.0 and later); "
                      "using the PyTorch int8 path", dev)
            _state[key] = False
        else:
            _state[key] = probe(dev)
    return _state[key]


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the loaded kernels can run this problem (fp16, dimensions multiples of 4)."""
    n, k = weight.shape
    return _ops is not None and x.dtype == torch.float16 and not (k % 4 or n % 4) and x.numel() > 0


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                bias: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """W8A8 ``x @ (weight * scale[:, None]).T + bias`` for fp16 ``x``; None where the kernels
    cannot run this problem (the caller then uses the PyTorch path)."""
    k, n = weight.shape[1], weight.shape[0]
    if not supports(x, weight):
        return None
    out = _w8a8(_ops, x.reshape(-1, k), weight, scale).view(*x.shape[:-1], n)
    return out if bias is None else out + bias.to(out.dtype)
