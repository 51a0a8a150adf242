"""The README's quick-start demos must keep running, and print what they promise."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# never reach for the network: the demos must fall back to the checkpoints that ship with bminf
ENV = dict(os.environ, BMINF_OFFLINE="1", PYTHONIOENCODING="utf-8")


def run(script, *args, stdin=None):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", script), *args], input=stdin,
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=ENV)
    assert out.returncode == 0, out.stderr
    return out.stdout, out.stderr


def test_quickstart_runs_and_its_checks_hold():
    out, _ = run("quickstart.py", "--steps", "8")
    assert "-> identical" in out
    err = float(out.split("relative error ")[1].split()[0])
    assert err < 1e-4


def test_fill_blank_demo_fills_every_blank_it_shows():
    out, err = run("fill_blank.py", "--text", "今天天气<span>，我们去<span>吧。", "--seed", "1")
    lines = out.splitlines()
    assert "runs cpm2-demo" in err
    assert lines[0] == "Input:  今天天气[____]，我们去[____]吧。"
    assert lines[1].startswith("Output: 今天天气[") and lines[1].endswith("吧。")


def test_generate_demo_continues_the_prompt():
    out, err = run("generate_cpm1.py", "--prompt", "天空是蔚蓝色", "--max-tokens", "8")
    assert "runs cpm1-demo" in err
    assert out.startswith("天空是蔚蓝色") and len(out.strip()) > len("天空是蔚蓝色")


def test_dialogue_demo_answers_each_line_from_stdin():
    out, err = run("dialogue.py", "--seed", "0", stdin="你好\n推荐一本书\n")
    lines = out.splitlines()
    assert "runs eva-demo" in err
    assert lines[0] == "你：你好" and lines[1].startswith("EVA：")
    assert lines[2] == "你：推荐一本书" and lines[3].startswith("EVA：")
