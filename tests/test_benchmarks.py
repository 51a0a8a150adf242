"""The benchmark scripts refuse what they cannot run (no CUDA, run as a file) in one line, not with a traceback."""
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
    (["-m", "benchmark.profile_decode", "--device", "cpu"], "it needs a CUDA device"),
])
def test_gpu_benchmarks_refuse_without_cuda(argv, says):
    out = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 2, out.stderr[-2000:]
    assert says in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]


@pytest.mark.parametrize("script", ["benchmark/profile_decode.py", "benchmark/cpm2/decoder.py",
                                    "benchmark/eva/encoder.py"])
def test_package_benchmarks_run_as_files_say_how_to_run_them(script):
    # these import the rest of benchmark/ relatively: as a file that import fails deep inside
    out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    module = script[:-3].replace("/", ".")
    assert out.returncode == 1 and f"python -m {module}" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-2000:]


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
