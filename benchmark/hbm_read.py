"""The HBM read ceiling that the benchmarks' floors divide by: the fastest of two plain reads of a
large buffer, timed with CUDA events.

``t.sum()`` over 2 GiB of fp16, the only reader until run 104, read 4124-4229 GB/s on the H200, where a
streaming Triton kernel read 4438-4513 GB/s of the same memory (h200_run104_ceiling_overhead.log):
floors computed from the sum were 7-9% lower than the memory allows, and every share of the floor
measured against them that much too high.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _read(x_ptr, out_ptr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    # one program sums ITERS blocks in a row; its sum is stored so that the loads are not removed
    base = tl.program_id(0).to(tl.int64) * BLOCK * ITERS
    acc = tl.zeros([BLOCK], tl.int32)
    for i in range(ITERS):
        acc += tl.load(x_ptr + base + i * BLOCK + tl.arange(0, BLOCK), eviction_policy="evict_first")
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc))


def _event_seconds(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return best


def gb_per_s(device: torch.device, reps: int = 10) -> dict:
    """``{"sum": GB/s of t.sum(), "stream": GB/s of the Triton read, "best": the larger}`` over up to
    4 GiB (a quarter of the free memory on smaller GPUs)."""
    block, iters = 1024, 16
    chunk = block * iters * 4  # bytes a program reads
    size = min(4 << 30, torch.cuda.mem_get_info(device)[0] // 4) // chunk * chunk
    with torch.cuda.device(device):
        x = torch.empty(size // 4, dtype=torch.int32, device=device).random_(-1000, 1000)
        out = torch.empty(size // chunk, dtype=torch.int32, device=device)
        halves = x.view(torch.float16)
        result = {"sum": size / _event_seconds(lambda: halves.sum(), reps) / 1e9,
                  "stream": size / _event_seconds(lambda: _read[(out.numel(),)](x, out, BLOCK=block, ITERS=iters,
                                                                               num_warps=4), reps) / 1e9}
    del x, out, halves
    result["best"] = max(result["sum"], result["stream"])
    return result
