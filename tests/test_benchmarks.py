"""The benchmark scripts refuse what they cannot run (no CUDA, run as a file) in one line, not with a traceback."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
@pytest.mark.parametrize("argv, says", [
    (["-m", "benchmark.attention"], "no CUDA device is available"),
    (["benchmark/int8_linear.py"], "no CUDA device is available"),
    (["benchmark/sampling.py"], "no CUDA device is available"),
    (["-m", "benchmark.profile_decode", "--device", "cpu"], "it needs a CUDA device"),
    (["-m", "benchmark.tune_step", "--device", "cpu"], "it needs a CUDA device"),
])
def test_gpu_benchmarks_refuse_without_cuda(argv, says):
    out = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 2, out.stderr[-2000:]
    assert says in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]


@pytest.mark.parametrize("script", ["benchmark/profile_decode.py", "benchmark/cpm2/decoder.py",
                                    "benchmark/eva/encoder.py", "benchmark/tune_step.py"])
def test_package_benchmarks_run_as_files_say_how_to_run_them(script):
    # these import the rest of benchmark/ relatively: as a file that import fails deep inside
    out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    module = script[:-3].replace("/", ".")
    assert out.returncode == 1 and f"python -m {module}" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-2000:]


@pytest.mark.parametrize("script", ["benchmark/models.py", "benchmark/serve.py"])
def test_file_benchmarks_import_what_they_wrap(script):
    # models.py wraps the decode loop's sampler at import (serve.py imports it for its checkpoint): a
    # renamed function breaks them on the GPU machine only, unless this imports them here
    out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0 and "usage" in out.stdout, out.stderr[-2000:]


def test_the_header_says_how_full_tritons_cache_was(tmp_path):
    # a first call's figure depends on it: the header says where the cache is and what it held
    pytest.importorskip("triton")
    (tmp_path / "a1").mkdir()
    (tmp_path / "a1" / "int8_gemv.cubin").write_bytes(b"")
    (tmp_path / "a1" / "int8_gemv.json").write_text("{}")
    (tmp_path / "b2").mkdir()
    (tmp_path / "b2" / "rms_norm.cubin").write_bytes(b"")
    show = ("from benchmark.common import header, machine; import torch; "
            "m = machine(torch.device('cpu')); print(m['triton_cache']); "
            "header({'machine': m}, 'cpm2', 'cfg')")
    for folder, want in ((tmp_path, "2 compiled kernels at the start\n"),
                         (tmp_path / "none", "0 compiled kernels at the start (empty: the first call compiles")):
        out = subprocess.run([sys.executable, "-c", show], cwd=ROOT, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "PYTHONPATH": ROOT, "TRITON_CACHE_DIR": str(folder)})
        assert out.returncode == 0, out.stderr[-2000:]
        assert f"Triton's cache {folder}: {want}" in out.stdout, out.stdout


def test_step_tuning_tries_each_tile_one_step_away_once():
    from benchmark.tune_step import neighbours
    for tiles, k, weights in (((2, 2048, 2), 4096, 1), ((8, 256, 4), 4096, 2), ((1, 1024, 4), 5120, 1),
                              ((4, 512, 4), 64, 1)):
        found = neighbours(tiles, k, weights)
        assert found[0] == tiles and len(set(found)) == len(found)
        top = max(tiles[1], 1 << (k - 1).bit_length())
        for bn, bk, warps in found[1:]:
            steps = [a / b for a, b in zip((bn, bk, warps), tiles)]
            assert all(r in (0.5, 1, 2) for r in steps) and steps != [1, 1, 1]
            assert bn >= 1 and 64 <= bk <= top and 1 <= warps <= 8 and weights * bn * bk <= 64 * 32 * warps
    # every tile one step from (2, 2048, 2) on a 4096-wide K that keeps to the register bound
    assert sorted(neighbours((2, 2048, 2), 4096, 1)[1:]) == [
        (1, 1024, 1), (1, 1024, 2), (1, 1024, 4), (1, 2048, 1), (1, 2048, 2), (1, 2048, 4), (1, 4096, 2),
        (1, 4096, 4), (2, 1024, 1), (2, 1024, 2), (2, 1024, 4), (2, 2048, 4), (2, 4096, 4), (4, 1024, 2),
        (4, 1024, 4), (4, 2048, 4)]


def test_step_tuning_writes_a_table_the_gemv_reads(tmp_path, monkeypatch):
    from benchmark.tune_step import table_json
    from bminf.kernels import triton_gemv
    kept = {(4096, 4096): (2, 1024, 4), (10240, 4096, 2): (8, 256, 4)}
    path = tmp_path / "tiles.json"
    path.write_text(json.dumps(table_json(kept)))
    assert json.loads(path.read_text()) == {"4096x4096": [2, 1024, 4, 1], "10240x4096x2": [8, 256, 4, 1]}
    monkeypatch.setenv("BMINF_GEMV_TABLE", str(path))
    triton_gemv._table.cache_clear()
    try:
        cpu = torch.device("cpu")
        assert triton_gemv.config(1, 4096, 4096, cpu) == (1, 2, 1024, 4, 1)
        assert triton_gemv.config(1, 10240, 4096, cpu, weights=2) == (1, 8, 256, 4, 1)
    finally:
        triton_gemv._table.cache_clear()


@pytest.mark.gpu
def test_step_tuning_runs_on_a_tiny_model(tmp_path):
    out = subprocess.run([sys.executable, "-m", "benchmark.tune_step", "--preset", "eva", "--tiny", "--steps", "4",
                          "--input-length", "16", "--budget", "20", "--table-out", str(tmp_path / "t.json"),
                          "--json", str(tmp_path / "r.json")], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "r.json").read_text())
    table = json.loads((tmp_path / "t.json").read_text())
    # the tiny T5 decodes through its q/k/v, output and feed-forward output GEMVs and the gated input
    assert set(table) == set(result["kept"]) == set(result["start"]) and any(key.endswith("x2") for key in table)
    assert all(len(v) == 4 for v in table.values()) and len(result["start_vs_kept_ms"]) == 2
    assert sum(len(s["tried"]) for s in result["shapes"].values()) > 0
