"""Programmatic dependent launch (PDL): each decode kernel overlaps the tail of the one before it.

A decode step is some 300 kernels of a few microseconds each, and every one pays its launch, the
ramp-up of its programs and the tail of its last ones: a 2048 x 2048 int8 GEMV reads its 4 MB in
5.3 us where the HBM rate allows 0.9 (EVA on an H200, h200_run14.log). On Hopper and later a kernel
launched with ``launch_pdl`` may start while the kernel before it on the stream is still running.
Ours then keep one rule (``gdc.wait_then_release``):

- before ``griddepcontrol.wait`` a kernel reads only what the kernel just before it cannot be
  writing (the weights: the GEMV loads its first weight tile there) and stores nothing;
- after the wait, which returns once that kernel has finished and its writes are visible, it lets
  the next kernel start (``griddepcontrol.launch_dependents``).

So when a kernel starts, every kernel before the one just ahead of it has finished, by induction;
kernels launched without PDL (torch's, cuBLAS's) and copies keep full stream order. CUDA graphs
record the launch attribute as a programmatic edge. ``BMINF_PDL=0`` turns it off (outputs are the
same bit for bit either way; the tests check it on the GPU).

The weights are constant only within a step: elsewhere the kernel just before ours may be an
optimizer's update or a dtype conversion writing a weight that ours would read before its wait. So
kernels launch with PDL only inside ``within_a_step()``, which ``GraphedDecoder`` enters for the
steps it captures into CUDA graphs, their warm-up calls and its eager calls (a prompt, T5's first
step; each begins with torch's embedding lookup, so never right after a kernel that wrote a weight;
and they compile the same kernel variants as the graphs, not a second set).

On an H200 (h200_run20.log, h200_run21.log) PDL alone took CPM-2/CPM-1/EVA's graphed decode from
430/631/768 to 454/681/893 tokens/s; loading the first weight tile, the scales and the first key
tile before the wait, to 469/741/1022.
"""
import contextlib
import contextvars
import functools
import os

import torch

_IN_A_STEP = contextvars.ContextVar("bminf_dependent_launch", default=False)


@contextlib.contextmanager
def within_a_step():
    """Launch our kernels with PDL (where ``enabled``) inside: a decode or encode step, during which no
    kernel writes the weights."""
    token = _IN_A_STEP.set(True)
    try:
        yield
    finally:
        _IN_A_STEP.reset(token)


@functools.lru_cache(maxsize=None)
def enabled(device: torch.device) -> bool:
    """Whether our Triton kernels launch with PDL on ``device``: a CUDA GPU of compute capability 9.0 or
    later with a Triton that has it, unless ``BMINF_PDL=0``. Never in Triton's CPU interpreter."""
    value = os.environ.get("BMINF_PDL", "1")
    if value not in ("0", "1"):
        raise ValueError(f"BMINF_PDL must be '0' or '1', got {value!r}")
    if value == "0" or device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if torch.cuda.get_device_capability(device)[0] < 9:
        return False
    from . import gdc  # imports triton
    return gdc.AVAILABLE


def options(device: torch.device) -> dict:
    """The launch keywords for a kernel that calls ``gdc.wait_then_release(PDL)``: its ``PDL`` constant
    and, inside ``within_a_step()`` where enabled, ``launch_pdl``.

    >>> # kernel[grid](..., **dependent_launch.options(x.device))
    """
    return dict(PDL=True, launch_pdl=True) if _IN_A_STEP.get() and enabled(device) else dict(PDL=False)
