"""`bminf serve` under load: N concurrent streaming clients against CPM-2, resident and in a GPU budget.

For each setting (``--memory-limits``: ``none`` = every block resident, or a budget such as 6GiB) the
script starts a real server process (``python -m bminf serve``), warms it up, then for each client
count N (``--clients``) starts N clients at once, each streaming ``--requests`` completions one after
another. It prints, per N: total tokens/s over the wall time, per-client tokens/s, time to first token
(TTFT), the mean batch the engine ran (tokens / decode steps), and total(N) / total(1), against the
target of >= 8x at 16 clients.

Without ``--version`` it writes a real-size CPM-2 checkpoint with random int8 weights, as
benchmark/models.py does (11.3 GB; needs a GPU to fill it quickly). The weights are random, so the
text is noise; prompts are fill-blank prompts whose answers only end at the blank's closing sentinel,
so most requests run to ``--max-tokens``; tokens are counted from each response's ``usage``.

    python benchmark/serve.py --memory-limits none 6GiB --clients 1 4 16 --max-tokens 64 --json out.json
    python benchmark/serve.py --memory-limits none --eager-too --warm-each   # CUDA graphs against eager
    python benchmark/serve.py --version cpm2-demo --device cpu --memory-limits none --clients 1 4 --max-tokens 8
"""
import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "北京环球影城指定单日门票将采用<span>制度，即推出淡季日、平季日、旺季日和特定日门票。第{i}位游客说"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A ``python -m bminf serve`` process; its log goes to ``log_path``."""

    def __init__(self, version: str, device: str, limit, max_batch: int, log_path: str,
                 dynamic_memory: Optional[str] = None, cuda_graphs: bool = True):
        self.port, self.log_path = free_port(), log_path
        cmd = [sys.executable, "-m", "bminf", "serve", "--model", "cpm2", "--version", version, "--device", device,
               "--port", str(self.port), "--max-batch", str(max_batch)]
        if not cuda_graphs:
            cmd.append("--no-cuda-graphs")
        if limit is not None:
            cmd += ["--memory-limit", limit] + (["--dynamic-memory", dynamic_memory] if dynamic_memory else [])
        self.log = open(log_path, "w")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def health(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=30) as r:
            return json.loads(r.read())

    def wait_ready(self, timeout: float) -> float:
        start = time.perf_counter()
        while time.perf_counter() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{open(self.log_path).read()}")
            try:
                self.health()
                return time.perf_counter() - start
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"the server did not answer within {timeout} s:\n{open(self.log_path).read()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def stream_completion(port: int, body: dict) -> dict:
    """One streamed completion: seconds to the first text chunk and to the end, and the tokens it got."""
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/completions", json.dumps(dict(body, stream=True, stream_options={"include_usage": True})),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:500]!r}")
    first, tokens = None, None
    for line in response:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if "error" in chunk:
            raise RuntimeError(f"the stream failed: {chunk['error']}")
        if first is None and any(c.get("text") for c in chunk["choices"]):
            first = time.perf_counter() - start
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    conn.close()
    end = time.perf_counter() - start
    return dict(ttft=first if first is not None else end, seconds=end, tokens=tokens or 0)


def captures(log: str) -> list:
    """The seconds of each decode-step graph capture in the server's log so far."""
    with open(log) as f:
        return [float(line.rsplit(" in ", 1)[1].split()[0]) for line in f if "captured the decode step of" in line]


def compiled_kernels() -> int:
    """Entries in Triton's cache, which the server shares: each kernel variant compiled adds one (a
    variant per constant, and per integer argument that is 1 or a multiple of 16, unless the kernel
    says not to specialize on it)."""
    try:
        from triton.runtime.cache import default_cache_dir
    except ImportError:
        return 0
    where = os.environ.get("TRITON_CACHE_DIR") or default_cache_dir()
    return len(os.listdir(where)) if os.path.isdir(where) else 0


def run_clients(server: Server, n: int, requests: int, body: dict, log: str) -> dict:
    """``n`` clients at once, each sending ``requests`` completions one after another; with the graph
    captures the server logged while they ran and the kernels it compiled (their wait counts in the
    time to first token)."""
    barrier = threading.Barrier(n + 1)
    results = [[] for _ in range(n)]
    errors = []

    def client(i: int) -> None:
        barrier.wait()
        try:
            for r in range(requests):
                results[i].append(stream_completion(server.port, dict(body, prompt=PROMPT.format(i=i * requests + r),
                                                                      seed=i * requests + r)))
        except Exception as exc:  # noqa: BLE001 -- reported below, with the others' numbers
            errors.append(f"client {i}: {exc}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    steps, before, kernels = server.health()["steps"], len(captures(log)), compiled_kernels()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    steps = server.health()["steps"] - steps
    captured = captures(log)[before:]
    kernels = compiled_kernels() - kernels
    if errors:
        raise RuntimeError("; ".join(errors))
    tokens = sum(r["tokens"] for rs in results for r in rs)
    per_client = [sum(r["tokens"] for r in rs) / sum(r["seconds"] for r in rs) for rs in results]
    ttfts = [r["ttft"] for rs in results for r in rs]
    return dict(clients=n, requests=n * requests, tokens=tokens, wall_s=round(wall, 3),
                total_tok_s=round(tokens / wall, 2), per_client_tok_s_mean=round(statistics.mean(per_client), 2),
                per_client_tok_s_min=round(min(per_client), 2), ttft_mean_s=round(statistics.mean(ttfts), 3),
                ttft_max_s=round(max(ttfts), 3), decode_steps=steps,
                mean_batch=round(tokens / steps, 2) if steps else None,
                graphs_captured=len(captured), capture_s=round(sum(captured), 2), kernels_compiled=kernels)


def completion_text(port: int, body: dict) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    reply = json.loads(conn.getresponse().read())
    conn.close()
    return reply["choices"][0]["text"]


def batch_consistency(server: Server, n: int, max_tokens: int) -> bool:
    """Whether a greedy request gives the same text alone and while ``n - 1`` other greedy requests decode
    with it (in fp16 on a GPU, kernels chosen per batch size may round differently)."""
    body = dict(model="cpm2", max_tokens=max_tokens, temperature=0)
    alone = completion_text(server.port, dict(body, prompt=PROMPT.format(i=0)))
    texts = [None] * n
    barrier = threading.Barrier(n)

    def client(i: int) -> None:
        barrier.wait()
        texts[i] = completion_text(server.port, dict(body, prompt=PROMPT.format(i=i)))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return texts[0] == alone


def bench_setting(version: str, device: str, limit, args, workdir: str, cuda_graphs: bool = True) -> list:
    name = ("resident" if limit is None else f"budget {limit}") + ("" if cuda_graphs else ", eager")
    log = os.path.join(workdir, f"server-{'resident' if limit is None else limit}{'' if cuda_graphs else '-eager'}.log")
    server = Server(version, device, limit, max(args.clients), log, args.dynamic_memory, cuda_graphs)
    rows = []
    try:
        ready = server.wait_ready(args.start_timeout)
        body = dict(model="cpm2", max_tokens=args.max_tokens, temperature=args.temperature)
        stream_completion(server.port, dict(body, prompt=PROMPT.format(i=-1), max_tokens=4))  # warm-up
        print(f"\n{name}: server ready in {ready:.1f} s ({json.dumps(server.health())})", flush=True)
        print(f"{'clients':>7} {'tokens':>7} {'wall s':>7} {'total tok/s':>11} {'per client':>10} "
              f"{'TTFT mean':>9} {'TTFT max':>8} {'mean batch':>10} {'graphs captured':>15} {'compiled':>8}",
              flush=True)
        for n in args.clients:
            if args.warm_each:  # the same load once untimed: graphs of new shapes are captured there
                run_clients(server, n, args.requests, body, log)
            row = dict(setting=name, memory_limit=limit, cuda_graphs=cuda_graphs,
                       **run_clients(server, n, args.requests, body, log))
            rows.append(row)
            print(f"{n:>7} {row['tokens']:>7} {row['wall_s']:>7.2f} {row['total_tok_s']:>11.1f} "
                  f"{row['per_client_tok_s_mean']:>10.1f} {row['ttft_mean_s']:>9.3f} {row['ttft_max_s']:>8.3f} "
                  f"{row['mean_batch'] or 0:>10.2f} {row['graphs_captured']:>4} ({row['capture_s']:.2f} s) "
                  f"{row['kernels_compiled']:>8}", flush=True)
        base = next((r["total_tok_s"] for r in rows if r["clients"] == 1), None)
        for r in rows:
            r["speedup_vs_1"] = round(r["total_tok_s"] / base, 2) if base else None
        biggest = rows[-1]
        if base and biggest["clients"] > 1:
            print(f"{name}: {biggest['clients']} clients get {biggest['speedup_vs_1']}x the total throughput of one "
                  f"(target at 16: >= 8x)", flush=True)
        if args.check_equal:
            same = batch_consistency(server, max(args.clients), args.max_tokens)
            print(f"{name}: a greedy request alone and among {max(args.clients) - 1} others gives the same text: "
                  f"{same}", flush=True)
            for r in rows:
                r["greedy_equal_alone_and_batched"] = same
        health = server.health()
        if "gpu_peak_gib" in health:
            print(f"{name}: GPU memory peak {health['gpu_peak_gib']} GiB (allocated now {health['gpu_allocated_gib']} GiB)",
                  flush=True)
            for r in rows:
                r["gpu_peak_gib_after_all"] = health["gpu_peak_gib"]
        with open(log) as f:
            growth = [line.strip() for line in f if "reserving" in line or "blocks resident" in line
                      or "decode step" in line or "decode slots" in line]
        for line in growth:  # placement, and each time a batch outgrew the budget's reserve
            print(f"{name}: server log: {line}", flush=True)
    finally:
        server.stop()
    return rows


def make_real_size(directory: str) -> str:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch
    from models import make_checkpoint  # benchmark/models.py: the real-size random checkpoints

    start = time.perf_counter()
    size = make_checkpoint("cpm2", directory, torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the server is another process: leave it the GPU
    print(f"wrote a real-size random CPM-2 checkpoint ({size / 1e9:.2f} GB) in {time.perf_counter() - start:.0f} s",
          flush=True)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--version", help="a CPM-2 version or directory (default: a real-size random checkpoint)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--memory-limits", nargs="+", default=["none", "6GiB"],
                        help="'none' (resident) and/or GPU budgets such as 6GiB")
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=1, help="completions each client sends, one after another")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--dynamic-memory", help="the server's --dynamic-memory under a budget (default: its own)")
    parser.add_argument("--no-check-equal", dest="check_equal", action="store_false",
                        help="skip comparing a greedy request alone and in a full batch")
    parser.add_argument("--eager-too", action="store_true",
                        help="also run each setting with `bminf serve --no-cuda-graphs` (the gathered batch, eager)")
    parser.add_argument("--warm-each", action="store_true",
                        help="run each client count once untimed before timing it")
    parser.add_argument("--start-timeout", type=float, default=600, help="seconds to wait for the server")
    parser.add_argument("--dir", help="where to write the checkpoint and logs (default: a temporary directory)")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    limits = [None if m.lower() == "none" else m for m in args.memory_limits]
    if args.device == "cpu" and any(limits):
        parser.error("--memory-limits caps GPU memory: use 'none' with --device cpu")
    import torch

    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"{where}, torch {torch.__version__}, clients {args.clients}, max_tokens {args.max_tokens}, "
          f"temperature {args.temperature}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as workdir:
        version = args.version or make_real_size(os.path.join(workdir, "cpm2"))
        for limit in limits:
            rows += bench_setting(version, args.device, limit, args, workdir)
            if args.eager_too:
                rows += bench_setting(version, args.device, limit, args, workdir, cuda_graphs=False)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=where, torch=torch.__version__, max_tokens=args.max_tokens, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
