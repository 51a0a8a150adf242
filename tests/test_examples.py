"""The README's quick-start demo must keep running."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_runs_and_its_checks_hold():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "quickstart.py"), "--steps", "8"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "-> identical" in out.stdout
    err = float(out.stdout.split("relative error ")[1].split()[0])
    assert err < 1e-4
