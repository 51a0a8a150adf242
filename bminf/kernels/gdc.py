"""The device side of ``dependent_launch`` (imported on first use: it imports triton)."""
import triton
import triton.language as tl
from triton.language.extra import cuda


@triton.jit
def wait_then_release(PDL: tl.constexpr):
    # Launched with PDL, this kernel may be running beside the one before it: wait until that one has
    # finished and its writes are visible, then let the next kernel launch. Every store, and every load
    # of what the previous kernel writes, comes after this call. Without PDL there is nothing to wait for.
    if PDL:
        cuda.gdc_wait()
        cuda.gdc_launch_dependents()
