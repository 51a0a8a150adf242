"""GPU time of one token's draw: ``triton_sampling.draw`` with the row held in registers and with the loop
of passes over L2, for each task's default settings and a few more, on the vocabularies of the models.

    python benchmark/sampling.py [--json sampling.json]

Each figure is the GPU time of one draw: 50 draws captured in a CUDA graph, replayed five times, the best
replay over 50 (the host's Python is not in it). Every path must give the same tokens, or the run stops.
"""
import argparse
import json

import torch

from bminf.kernels import triton_sampling

DRAWS = 50
SETTINGS = {  # (temperature, top_n, frequency_penalty)
    "greedy": (0, None, 0.0),
    "T=0.9": (0.9, None, 0.0),
    "T=0.85 top-10 (EVA's dialogue)": (0.85, 10, 0.0),
    "T=0.9 top-50": (0.9, 50, 0.0),
    "T=0.85 top-10, penalized": (0.85, 10, 0.3),
}


def graph_us(fn) -> float:
    """GPU microseconds of one ``fn()``, from ``DRAWS`` calls replayed in a CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(DRAWS):
            fn()
    best = float("inf")
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / DRAWS)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("this times the sampling kernel on a GPU; no CUDA device is available")
    import triton
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__, "us": {}}
    print(f"{results['gpu']}, torch {results['torch']}, triton {results['triton']}", flush=True)
    paths = {"rows in registers": triton_sampling.RESIDENT_MAX, "passes over L2": 0}
    for batch, vocab in ((1, 30000), (1, 26240), (16, 26240)):  # CPM-1 and EVA, CPM-2
        case = f"batch {batch}, vocabulary {vocab}"
        logits = torch.randn(batch, vocab, device="cuda").half() * 3
        ban = torch.zeros(vocab, dtype=torch.bool, device="cuda")
        ban[:8] = True
        q = torch.empty(batch, vocab, device="cuda").exponential_()
        counts = torch.randint(0, 3, (batch, vocab), dtype=torch.int32, device="cuda")
        row = results["us"][case] = {"q: exponential_ of one row": graph_us(lambda: q[0].exponential_())}
        print(f"{case}: one row's q.exponential_() {row['q: exponential_ of one row']:.1f} us", flush=True)
        for name, (t, n, penalty) in SETTINGS.items():
            times, want = {}, None
            for path, resident_max in paths.items():
                triton_sampling.RESIDENT_MAX = resident_max

                def draw():
                    return triton_sampling.draw(logits, t, n, penalty, 0.0, counts if penalty else None, ban, q)
                got = draw()
                if want is not None and not torch.equal(got, want):
                    raise SystemExit(f"{case}, {name}: {path} drew {got.tolist()}, not {want.tolist()}")
                want = got
                times[path] = graph_us(draw)
            triton_sampling.RESIDENT_MAX = paths["rows in registers"]
            row[name] = times
            print(f"  {name:32s} " + " | ".join(f"{k} {v:6.1f} us" for k, v in times.items()), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
