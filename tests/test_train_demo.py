"""scripts/train_demo.py and its task formats, on a tiny made-up corpus (no download, CPU, seconds)."""
import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from bminf.checkpoint import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts")

DOCS = [
    "今天天气很好。我们一起去公园散步，看见很多孩子在放风筝。大家都很高兴！",
    "这本书写得非常好，内容丰富，值得一读。物流也很快，包装完好。",
    "新年到了，城市里处处张灯结彩。人们走上街头，互相祝福。孩子们穿上了新衣服。",
    "质量一般，用了两天就坏了。客服态度还可以，但是问题没有解决。不推荐购买。",
    "经济工作会议在北京召开。会议总结了去年的工作，部署了今年的任务。代表们进行了认真讨论。",
    "房间很干净，服务员很热情。早餐品种不多，味道还行。下次还会再来。",
    "科学技术是第一生产力。我们要加快科技进步，提高劳动者素质。",
    "他每天早上六点起床，先跑步，再读书。这个习惯已经坚持了十年。",
]


def _corpus(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for split, docs in (("train", DOCS[:6]), ("heldout", DOCS[6:])):
        with open(corpus / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for text in docs:
                f.write(json.dumps({"source": "test", "text": text}, ensure_ascii=False) + "\n")
    return corpus


@pytest.fixture
def tasks(monkeypatch):
    monkeypatch.syspath_prepend(SCRIPTS)  # the scripts import their siblings by name
    import demo_spec
    import demo_tasks
    return demo_spec, demo_tasks


def test_word_cut_encoding_equals_tokenizer_encode(tasks):
    demo_spec, _ = tasks
    for version in ("cpm1-demo", "cpm2-demo", "eva-demo"):
        tok = demo_spec.tokenizer(version)
        for text in DOCS[:3]:
            words = demo_spec.encode_words(tok, text)
            assert len(words) > 3 and [i for w in words for i in w] == tok.encode(text)


def test_examples_follow_the_model_classes_formats(tasks, tmp_path):
    demo_spec, demo_tasks = tasks
    corpus_dir = str(_corpus(tmp_path))
    rng = np.random.default_rng(0)
    tok = demo_spec.tokenizer("cpm2-demo")
    corpus = demo_tasks.tokenize("cpm2-demo", "train", corpus_dir)
    assert corpus.n_docs == 6
    sentinels = set(tok.sentinel_ids)
    for d in range(corpus.n_docs):
        words = corpus.doc_words(d)
        src, dec, tgt = demo_tasks.fill_blank_example(words, tok, rng)
        blanks = [i for i in src if i in sentinels]
        n = len(blanks)
        assert 1 <= n <= 4 and blanks == [tok.get_span(i) for i in range(n)]
        assert dec[0] == tok.sod_id and dec[1:] == tgt[:-1]
        assert [i for i in tgt if i in sentinels] == [tok.get_span(i) for i in range(n + 1)]
        assert tgt[0] == tok.get_span(0) and tgt[-1] == tok.get_span(n)
        # the text around and inside the blanks is the document, in order
        restored = []
        spans = {}
        current = None
        for i in tgt:
            if i in sentinels:
                current = tok.sentinel_ids.index(i)
                spans[current] = []
            else:
                spans[current].append(i)
        for i in src:
            restored += spans[tok.sentinel_ids.index(i)] if i in sentinels else [i]
        assert tok.decode(restored) in tok.decode([i for w in words for i in w])

        src, dec, tgt = demo_tasks.generate_example(words, tok, rng)
        assert src[-1] == tok.get_span(189) and tgt[0] == tok.get_span(189) and dec[0] == tok.sod_id
        assert tgt[-1] == tok.eod_id  # these documents are short: the continuation reaches the end
        assert tok.decode(src[:-1] + tgt[1:-1]) == tok.decode([i for w in words for i in w])

    tok = demo_spec.tokenizer("eva-demo")
    sampler = demo_tasks.ExampleSampler("eva-demo", demo_tasks.tokenize("eva-demo", "train", corpus_dir), tok)
    for task, (src, dec, tgt) in sampler.heldout(seed=0):
        assert task == "dialogue"
        assert src[-1] == tok.get_span(0) and src[-2] == tok.sep_id and tok.unk_id not in src
        assert dec[0] == tok.get_span(0) and dec[1:] == tgt[:-1] and tgt[-1] == tok.sep_id
        assert tok.decode(tgt[:-1]).endswith(("。", "！", "？"))


def test_train_demo_smoke_run(tmp_path):
    corpus = _corpus(tmp_path)
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(SCRIPTS, "train_demo.py"), "--device", "cpu", "--steps", "2",
           "--batch", "2", "--seq", "32", "--corpus-dir", str(corpus), "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))  # tiny ops: threads only contend
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "train_report.json").read_text(encoding="utf-8"))
    assert sorted(report["models"]) == ["cpm1-demo", "cpm2-demo", "eva-demo"]
    for version, r in report["models"].items():
        assert r["steps"] == 2 and r["heldout_target_tokens"] > 0
        ppl = r["perplexity"]
        assert all(np.isfinite(v) and v > 1 for v in ppl.values())
        # int8 round-off changes the float model's perplexity only slightly
        assert abs(ppl["int8_checkpoint"] / ppl["float_before_quantization"] - 1) < 0.05
        model = load_model(str(out / version), dtype=torch.float32)
        assert model.config.vocab_size in (5800, 6000)
    assert set(report["models"]["cpm2-demo"]["int8_perplexity_by_task"]) == {"fill_blank", "generate"}


def test_training_on_the_cpu_is_deterministic(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(SCRIPTS)
    import train_demo
    corpus = str(_corpus(tmp_path))
    args = argparse.Namespace(steps=2, batch=2, seq=32, device="cpu", limit=0, max_seconds=0, stop_after=None,
                              log_every=100)
    files, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only contend (and the result must not depend on them)
    try:
        for run in ("a", "b"):
            train_demo.train("cpm1-demo", args, corpus, str(tmp_path / run))
            files.append((tmp_path / run / "cpm1-demo" / "checkpoint.pt").read_bytes())
    finally:
        torch.set_num_threads(threads)
    assert files[0] == files[1]  # the same seed and data on the CPU give the same bytes
