"""The device side of ``dependent_launch`` (imported on first use: it imports triton)."""
import triton
import triton.language as tl

try:  # grid dependency control and the launch_pdl option came with Triton 3.3-3.4
    from triton.backends.nvidia.compiler import CUDAOptions
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    AVAILABLE = "launch_pdl" in CUDAOptions.__dataclass_fields__
except ImportError:
    gdc_launch_dependents = gdc_wait = None  # never reached: PDL stays off (dependent_launch.enabled)
    AVAILABLE = False


@triton.jit
def wait_then_release(PDL: tl.constexpr):
    # Launched with PDL, this kernel may be running beside the one before it: wait until that one has
    # finished and its writes are visible, then let the next kernel launch. Every store, and every load
    # of what the previous kernel writes, comes after this call. Without PDL there is nothing to wait for.
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
