"""`bminf generate`, `fill-blank` and `chat` on the demo checkpoints that ship with bminf."""
import json
import os
import subprocess
import sys

import pytest

import bminf
from bminf.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("BMINF_OFFLINE", "1")


def test_generate_prints_prompt_and_continuation(capsys):
    assert main(["generate", "天空是蔚蓝色", "--max-tokens", "6", "--temperature", "0", "--no-stream"]) == 0
    out, err = capsys.readouterr()
    expected, _ = bminf.models.CPM1(version="cpm1-demo").generate("天空是蔚蓝色", max_tokens=6, temperature=0)
    assert out == "天空是蔚蓝色" + expected + "\n"
    assert "runs cpm1-demo" in err  # the one-line note goes to stderr, never into the text


def test_generate_streamed_equals_not_streamed(capsys):
    args = ["generate", "北京", "--max-tokens", "8", "--seed", "3", "--version", "cpm1-demo"]
    main(args + ["--stream"])
    streamed = capsys.readouterr().out
    main(args + ["--no-stream"])
    assert capsys.readouterr().out == streamed


def test_generate_with_cpm2_and_stop(capsys):
    assert main(["generate", "北京", "--model", "cpm2", "--version", "cpm2-demo", "--max-tokens", "5",
                 "--temperature", "0", "--stop", "。", "--no-stream"]) == 0
    assert capsys.readouterr().out.startswith("北京")


def test_fill_blank_json(capsys):
    assert main(["fill-blank", "今天<span>很好", "--json", "--max-tokens", "6", "--temperature", "0",
                 "--no-stream"]) == 0
    blanks = json.loads(capsys.readouterr().out)
    assert blanks == bminf.models.CPM2(version="cpm2-demo").fill_blank("今天<span>很好", max_tokens=6, temperature=0)


@pytest.mark.parametrize("args, message", [
    (["fill-blank", "没有空白", "--no-stream"], "no <span>"),
    (["generate", "好", "--top-p", "2", "--no-stream"], "top_p"),
    (["generate", "好", "--memory-limit", "6GiB", "--device", "cpu"], "memory_limit"),
    (["chat", "--version", "nonsense"], "not one this model runs"),
])
def test_bad_flags_give_one_line_errors(capsys, args, message):
    assert main(args) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_chat_keeps_context_and_resets():
    lines = "你好\n推荐一本书\n/reset\n你是谁\n/quit\n不会被读到\n"
    out = subprocess.run([sys.executable, "-m", "bminf", "chat", "--max-tokens", "5", "--seed", "0"], input=lines,
                         capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env=dict(os.environ, BMINF_OFFLINE="1"))
    assert out.returncode == 0, out.stderr
    replies = [line for line in out.stdout.splitlines() if line.startswith("EVA：")]
    assert len(replies) == 3 and "(context cleared)" in out.stderr
    eva = bminf.models.EVA(version="eva-demo")
    first = eva.dialogue(["你好"], max_tokens=5, seed=0)[0]
    second = eva.dialogue(["你好", first, "推荐一本书"], max_tokens=5, seed=0)[0]
    third = eva.dialogue(["你是谁"], max_tokens=5, seed=0)[0]
    assert replies == [f"EVA：{first}", f"EVA：{second}", f"EVA：{third}"]
