"""Compiling a step's Triton kernels on a thread pool, before the step first runs.

On a machine whose Triton cache is empty, CPM-2's first decode call took 7.3 to 10.8 s longer than a
warm one on an H200 (runs 26 and 27, against +2.0 s once the cache is filled): a dozen kernels
compiled one after another as the step reached them, each through LLVM and ptxas, and each kernel
function's launcher built with the C compiler. Inside ``compiling_only()`` our launch sites
(``launch``) hand the kernel to Triton's ``warmup`` instead of running it, under Triton's
``AsyncCompileMode``: the compilations run on threads, and leaving the block waits for all of them.
ptxas and the C compiler run beside each other there, but Triton's code generation is Python and holds
Python's lock: 3.2 s of CPM-2's first call on an empty cache still ran one kernel at a time
(h200_run32_first_call_profile.log; processes would be needed for that part). A graph capture runs
its step once that way before its warm-up calls, which then find every kernel compiled. On an empty
cache CPM-2's first call then took +8.2 and +5.15 s against +9.3 and +8.1 s, EVA's +5.8 against
+8.4 and CPM-1's +4.5 against +6.6 (h200_run28.log).

In such a pass our kernels do not run, so their outputs hold whatever their memory held, and the
torch ops between them compute on that. A step that a CUDA graph can record has no host syncs and no
branches on device values, so nothing there can fail or change course on those numbers; the warm-up
calls after the pass overwrite every buffer it wrote.

``available()`` is False in Triton's interpreter and where Triton lacks ``AsyncCompileMode`` (before
3.4) or its kernels' ``_init_handles``: then no pass is made and kernels compile where they first run.

Before any kernel compiles, a process pays for Triton itself once: on an H200, CPM-2's first call on an
empty cache spent 0.44-0.75 s hashing Triton's own files (its cache key), 0.36-0.64 s building its C
helpers and 0.2 s importing Gluon (h200_run90: cProfile of the main thread, four processes). A model
that loads onto a GPU starts that on a thread first thing (``set_up_in_background``), so it runs while
the checkpoint is read; our launches wait for it to end (``_wait_for_set_up``).
"""
import contextlib
import contextvars
import functools
import importlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch

_COMPILING_ONLY = contextvars.ContextVar("bminf_compiling_only", default=False)
_SET_UP: Optional[threading.Thread] = None


def set_up_in_background(device: torch.device) -> None:
    """Start Triton's once-a-process setup for our kernels on ``device`` (a daemon thread), if not started.

    >>> # set_up_in_background(torch.device("cuda"))   # then read the checkpoint
    """
    global _SET_UP
    if _SET_UP is not None or device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return
    _SET_UP = threading.Thread(target=_set_up, args=(device,), name="bminf-triton-setup", daemon=True)
    _SET_UP.start()


def _set_up(device: torch.device) -> None:
    try:
        from triton.runtime import driver
        from triton.runtime.cache import triton_key

        from . import gluon_gemv
        modules = ["attention_kernels", "gemv_kernels", "matmul_kernels", "norm_kernels"]
        modules += ["gluon_kernels"] if gluon_gemv.usable(device) else []
        for name in modules:  # each parses its kernels' source when imported
            importlib.import_module(f".{name}", __package__)
        driver.active.utils  # the driver object builds (or loads) its C helpers on first use
        triton_key()  # kept by Triton for the process
    except Exception:  # the first launch then does the same, and reports what fails
        pass


def _wait_for_set_up() -> None:
    # Triton creates its driver object without a lock: our first launch waits for the thread that may
    # be creating it
    thread = _SET_UP
    if thread is not None and thread.is_alive():
        thread.join()


def launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``; inside ``compiling_only()``, its compilation only."""
    _wait_for_set_up()
    if _COMPILING_ONLY.get():
        kernel.warmup(*args, grid=grid, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether ``compiling_only`` can compile on threads with this Triton."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return False
    try:
        from triton.compiler.compiler import CompiledKernel
        from triton.runtime._async_compile import AsyncCompileMode  # noqa: F401
    except ImportError:
        return False
    return hasattr(CompiledKernel, "_init_handles")


class _Pool(ThreadPoolExecutor):
    """Threads that compile a kernel, then load it on ``device`` and build its launcher, which its
    first launch would otherwise do on the calling thread."""

    def __init__(self, device: torch.device):
        super().__init__(max_workers=max(1, min(16, os.cpu_count() or 1)), thread_name_prefix="bminf-compile")
        self.device = device

    def submit(self, fn, /, *args, **kwargs):
        def compile_and_load():
            kernel = fn(*args, **kwargs)
            with torch.cuda.device(self.device):
                kernel._init_handles()
            return kernel
        return super().submit(compile_and_load)


@contextlib.contextmanager
def compiling_only(device: torch.device):
    """Inside, ``launch`` only compiles, on threads; leaving waits for every compilation (and raises
    the first error of one). Needs ``available()``.

    >>> # with compiling_only(x.device): step()     # then step() runs with every kernel compiled
    """
    from triton.runtime._async_compile import AsyncCompileMode
    _wait_for_set_up()
    token = _COMPILING_ONLY.set(True)
    try:
        with _Pool(device) as pool, AsyncCompileMode(pool):
            yield
    finally:
        _COMPILING_ONLY.reset(token)
