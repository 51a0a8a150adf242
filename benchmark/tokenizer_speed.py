"""Tokenizer throughput: encode a large generated Chinese/English text, print tokens/s and chars/s.

    python benchmark/tokenizer_speed.py                               # tiny generated CPM-2 vocab
    python benchmark/tokenizer_speed.py --model cpm1 --vocab cpm1-new/vocab.txt
    python benchmark/tokenizer_speed.py --model cpm1 --spm spiece.model

jieba segmentation alone is timed on the same text as the ceiling: every tokenizer runs it first.
The text is encoded paragraph by paragraph (about 200 characters each), as prompts are.
"""
import argparse
import os
import platform
import random
import tempfile
import time

from bminf.tokenizers import CPM1Tokenizer, CPM2Tokenizer, EVATokenizer, segment

# common words, so jieba segments the generated text much as it would real prose
WORDS = ("我们 你们 他们 今天 明天 时间 问题 中国 北京 上海 世界 发展 经济 社会 文化 历史 学习 工作 生活 研究 技术 "
         "科学 教育 国家 人民 政府 公司 市场 城市 地方 朋友 孩子 老师 学生 医院 电影 音乐 自然 语言 处理 模型 "
         "数据 计算 系统 方法 影响 环境 天气 不错 喜欢 认为 知道 需要 开始 已经 可以 应该 因为 所以 但是 如果 "
         "虽然 还是 非常 一个 这个 那个 什么 怎么 没有 的 了 在 是 和 有 也 就 都 很 说 看 去 来 到 要 会 能 "
         "hello world GPU CPU model 2021 3.14 100 BMInf").split()
PUNCT = ["，", "。", "！", "？", "、", "：", "；", "（", "）", " ", "…", "ＡＢＣ"]


def generate_text(n_chars: int, seed: int = 0):
    """Paragraphs of random words and punctuation totalling about n_chars characters."""
    rng = random.Random(seed)
    paragraphs, total = [], 0
    while total < n_chars:
        words = [rng.choice(PUNCT) if rng.random() < 0.12 else rng.choice(WORDS) for _ in range(rng.randint(60, 120))]
        paragraphs.append("".join(words) + "\n")
        total += len(paragraphs[-1])
    return paragraphs


def tiny_vocab(path: str, model: str) -> None:
    """Specials, every word and character of the generator (▁-prefixed too for CPM-1), 190 sentinels."""
    pieces = ["<unk>", "<s>", "</s>", "▃", "<sep>", "<pad>", "<mask>", "<eod>", "▁", ",", "▂"]
    chars = sorted({c for w in WORDS + PUNCT for c in w} | set("ABC,!?:;()."))
    pieces += WORDS + chars + (["▁" + w for w in WORDS + chars] if model == "cpm1" else [])
    pieces += [f"<s_{i}>" for i in range(190)]
    # stripped and de-duplicated as the reader would see them (" " and "▁ " are not pieces)
    pieces = dict.fromkeys(p.strip() for p in pieces if p.strip())
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(pieces) + "\n")


def timed(fn, items):
    start = time.perf_counter()
    out = [fn(x) for x in items]
    return out, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["cpm1", "cpm2", "eva"], default="cpm2")
    parser.add_argument("--vocab", help="a released vocab.txt (default: a tiny generated one)")
    parser.add_argument("--spm", help="CPM-1 only: the sentencepiece model of the HF CPM-Generate weights")
    parser.add_argument("--chars", type=int, default=1_000_000, help="size of the generated text")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if args.spm:
        if args.model != "cpm1":
            parser.error("--spm is for --model cpm1")
        tok, source = CPM1Tokenizer.from_sentencepiece(args.spm), args.spm
    else:
        source = args.vocab
        if source is None:
            source = os.path.join(tempfile.mkdtemp(), "vocab.txt")
            tiny_vocab(source, args.model)
        cls = {"cpm1": CPM1Tokenizer, "cpm2": CPM2Tokenizer, "eva": EVATokenizer}[args.model]
        tok = cls(source)

    paragraphs = generate_text(args.chars, args.seed)
    n_chars = sum(map(len, paragraphs))
    start = time.perf_counter()
    tok.encode("预热")  # jieba loads its dictionary on first use; not part of the throughput
    warmup = time.perf_counter() - start

    words, t_seg = timed(segment, paragraphs)
    ids, t_enc = timed(tok.encode, paragraphs)
    _, t_dec = timed(tok.decode, ids)
    n_tokens, n_words = sum(map(len, ids)), sum(map(len, words))
    n_unk = sum(i == tok.unk_id for x in ids for i in x)

    print(f"device: CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), "
          f"python {platform.python_version()}")
    print(f"tokenizer: {type(tok).__name__}, vocab {source} ({tok.vocab_size} entries)")
    print(f"text: {n_chars:,} chars in {len(paragraphs):,} paragraphs -> {n_words:,} jieba words, "
          f"{n_tokens:,} tokens ({n_unk:,} <unk>)")
    print(f"first-use load (jieba dictionary): {warmup:.2f} s")
    print(f"jieba alone : {n_chars / t_seg:12,.0f} chars/s {n_words / t_seg:12,.0f} words/s   (ceiling)")
    print(f"encode      : {n_chars / t_enc:12,.0f} chars/s {n_tokens / t_enc:12,.0f} tokens/s  "
          f"({t_seg / t_enc:.0%} of the jieba ceiling)")
    print(f"decode      : {n_tokens / t_dec:12,.0f} tokens/s")


if __name__ == "__main__":
    main()
