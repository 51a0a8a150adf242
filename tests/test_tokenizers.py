"""Tokenizers against hand-built vocabularies, the released reader's rules, and HF's CpmTokenizer.

The goldens below were worked out by hand from the vocab lists in this file and jieba's accurate
mode segmentation (each case notes the jieba words); they are not the implementation's output.
"""
import random
import subprocess
import sys
import types

import pytest

from bminf.tokenizers import CPM1Tokenizer, CPM2Tokenizer, EVATokenizer, Tokenizer, load_vocab, segment

UNK = 0

# a CPM-1-like vocab: the released one starts with the same 11 pieces (▁ = 8)
CPM1_VOCAB = [
    "<unk>", "<s>", "</s>", "▃", "<sep>", "<pad>", "<mask>", "<eod>",  # 0-7
    "▁", ",", "▂", "▁我们", "我们", "▁喜欢", "▁北京", "▁hello",       # 8-15
    "hel", "lo", "▁world", "!", "▁!", "...", ".", "▁12",              # 16-23
    "3", "45", "AB", "C", "<", ">", "▁span", "a",                     # 24-31
    "好", "，", "。",                                                 # 32-34
]

# a CPM-2-like vocab (no ▁ word pieces) with 4 sentinels at the end
T5_VOCAB = [
    "<unk>", "<s>", "</s>", "▃", "<sep>", "<pad>", "<mask>", "<eod>",  # 0-7
    "▁", ",", "▂", "我们", "喜欢", "北京", "天安门", "，",            # 8-15
    "。", "！", "hello", "hell", "he", "w", "or", "l",                # 16-23
    "d", "!", "12", "3", "45", "AB", "C", "<",                        # 24-31
    ">", "span", "a", "...", "<s_0>", "<s_1>", "<s_2>", "<s_3>",      # 32-39
]


def write_vocab(path, tokens, blank_after=7):
    """One token a line, with a blank and a whitespace-only line after ``blank_after`` (skipped on read)
    and padding around one entry (stripped on read), as the released reader tolerates."""
    lines = [f"  {t}\t" if t == "北京" else t for t in tokens]
    lines[blank_after + 1:blank_after + 1] = ["", "   "]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def cpm1(tmp_path_factory):
    return CPM1Tokenizer(write_vocab(tmp_path_factory.mktemp("cpm1") / "vocab.txt", CPM1_VOCAB))


@pytest.fixture(scope="module")
def cpm2(tmp_path_factory):
    return CPM2Tokenizer(write_vocab(tmp_path_factory.mktemp("cpm2") / "vocab.txt", T5_VOCAB), n_sentinels=4)


# ---------------------------------------------------------------- vocab reader and checks

def test_reader_skips_blank_lines_and_strips(tmp_path):
    tokens, n_blank = load_vocab(write_vocab(tmp_path / "v.txt", T5_VOCAB))
    assert n_blank == 2
    assert tokens == T5_VOCAB  # "  北京\t" read back as "北京", ids count kept lines only
    assert tokens.index("▁") == 8


def test_special_ids(cpm1, cpm2):
    assert (cpm1.unk_id, cpm1.eod_id, cpm1.pad_id, cpm1.sep_id, cpm1.sod_id) == (0, 7, 5, 4, 1)
    assert (cpm2.unk_id, cpm2.sod_id, cpm2.eod_id, cpm2.sep_id) == (0, 1, 7, 4)
    assert (cpm1.vocab_size, len(cpm2), cpm2.vocab_size) == (35, 40, 40)
    assert [cpm2.get_span(i) for i in range(4)] == cpm2.sentinel_ids == [36, 37, 38, 39]
    assert cpm2.token_to_id("天安门") == 14 and cpm2.token_to_id("天") is None
    assert cpm1.id_to_token(8) == "▁"
    assert isinstance(cpm1, Tokenizer) and isinstance(cpm2, Tokenizer)


def test_missing_specials_raise_with_file_name(tmp_path, cpm1, cpm2):
    with pytest.raises(ValueError, match=r"vocab\.txt.*<s_4>"):  # default asks for all 190 sentinels
        CPM2Tokenizer(cpm2.source)
    with pytest.raises(ValueError, match="<s_4>"):
        cpm2.get_span(4)
    with pytest.raises(ValueError, match="<s_0>"):
        cpm1.get_span(0)  # CPM-1 has no sentinels
    no_eod = write_vocab(tmp_path / "no_eod.txt", [t for t in T5_VOCAB if t != "<eod>"])
    with pytest.raises(ValueError, match=r"no_eod\.txt.*'<eod>'"):
        CPM2Tokenizer(no_eod, n_sentinels=4)
    with pytest.raises(ValueError, match=r"no_eod\.txt.*'<eod>'"):
        CPM1Tokenizer(no_eod)
    no_sep = write_vocab(tmp_path / "no_sep.txt", [t for t in T5_VOCAB if t != "<sep>"])
    with pytest.raises(ValueError, match="'<sep>'"):
        EVATokenizer(no_sep, n_sentinels=4)
    tok = CPM2Tokenizer(no_sep, n_sentinels=4)  # CPM-2 does not need <sep>: only its id is missing
    with pytest.raises(ValueError, match=r"no_sep\.txt.*'<sep>'"):
        tok.sep_id
    assert getattr(tok, "sep_id", None) is None  # the error is an AttributeError too
    dup = write_vocab(tmp_path / "dup.txt", T5_VOCAB[:20] + ["我们"] + T5_VOCAB[20:])
    with pytest.raises(ValueError, match=r"dup\.txt: piece '我们' appears twice \(ids 11 and 20"):
        CPM2Tokenizer(dup, n_sentinels=4)
    no_mark = write_vocab(tmp_path / "no_mark.txt", [t for t in CPM1_VOCAB if t != "▁"])
    with pytest.raises(ValueError, match="'▁'"):
        CPM1Tokenizer(no_mark)


def test_vocab_size_checked_against_model(tmp_path, cpm2):
    assert CPM2Tokenizer(cpm2.source, expected_size=40, n_sentinels=4).vocab_size == 40
    with pytest.raises(ValueError, match=r"40 entries after skipping 2 blank line\(s\).*expects 41"):
        CPM2Tokenizer(cpm2.source, expected_size=41, n_sentinels=4)
    # EVA's public vocab.txt has a blank line at index 8: read as released it has 29999 entries
    eva = ["<unk>", "<s>", "</s>", "▃", "<sep>", "<pad>", "<mask>", "<eod>", ""]
    eva += [f"x{i}" for i in range(29810 - len(eva))] + [f"<s_{i}>" for i in range(190)]
    path = tmp_path / "eva_vocab.txt"
    path.write_text("\n".join(eva) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"eva_vocab\.txt: vocabulary has 29999 entries after skipping 1"):
        EVATokenizer(path, expected_size=30000)
    eva[8] = "<placeholder>"  # the fix the reference suggests: sentinels land on 29810..29999
    path.write_text("\n".join(eva) + "\n", encoding="utf-8")
    tok = EVATokenizer(path, expected_size=30000)
    assert (tok.get_span(0), tok.get_span(189), tok.sep_id) == (29810, 29999, 4)


# ---------------------------------------------------------------- goldens

# (text, jieba words, ids). CPM-1 encodes "▁" + word; full-width ASCII, U+3000 and … are folded first.
CPM1_GOLDEN = [
    ("我们喜欢北京", "我们|喜欢|北京", [11, 13, 14]),
    ("hello", "hello", [15]),                                # ▁hello beats ▁ + hel + lo
    ("hello world", "hello| |world", [15, 8, 10, 18]),       # the space word is ▁▂
    ("我们\n北京", "我们|\n|北京", [11, 8, 3, 14]),
    ("我们\u3000北京", "我们| |北京", [11, 8, 10, 14]),      # U+3000 folds to a space
    ("ＡＢＣ！", "ABC|!", [8, 26, 27, 20]),                   # no ▁ABC piece: ▁ + AB + C
    ("ＡＢＣ，我们！", "ABC|,|我们|!", [8, 26, 27, 8, 9, 11, 20]),  # CPM-1 folds ，and ！ too
    ("好…", "好|...", [8, 32, 8, 21]),
    ("我们。", "我们|。", [11, 8, 34]),
    ("12345", "12345", [23, 24, 25]),
    ("我们<span>", "我们|<|span|>", [11, 8, 28, 30, 8, 29]),
    ("😀", "😀", [8, UNK]),
    ("helo", "helo", [8, 16, UNK]),                          # no piece for "o": one <unk>
    ("我们\t北京", "我们|\t|北京", [11, 8, UNK, 14]),        # a tab can never be a vocab line
    ("我们▁", "我们|▁", [11, 8, 8]),
    ("", "", []),
    ("a" * 199, "a*199", [8] + [31] * 199),                  # ▁ + 199 chars = 200: still matched
    ("a" * 200, "a*200", [UNK]),                             # 201 chars with ▁: one <unk>
]

CPM2_GOLDEN = [
    ("我们喜欢北京", "我们|喜欢|北京", [11, 12, 13]),
    ("我们喜欢天安门。", "我们|喜欢|天安门|。", [11, 12, 14, 16]),
    ("hello", "hello", [18]),
    ("hellhe", "hellhe", [19, 20]),                          # longest first: hell, then he
    ("hello world", "hello| |world", [18, 10, 21, 22, 23, 24]),
    ("我们\n\n北京", "我们|\n|\n|北京", [11, 3, 3, 13]),
    ("我们\u3000北京", "我们| |北京", [11, 10, 13]),
    ("ＡＢＣ，我们！", "ABC|，|我们|！", [29, 30, 15, 11, 17]),  # ，and ！ are exempt from folding
    ("１２３", "123", [26, 27]),
    ("我们…", "我们|…", [11, UNK]),                           # … is not folded for CPM-2
    ("12345", "12345", [26, 27, 28]),
    ("我们<span>", "我们|<|span|>", [11, 31, 33, 32]),
    ("😀", "😀", [UNK]),
    ("我们\t北京", "我们|\t|北京", [11, UNK, 13]),
    ("我们▁", "我们|▁", [11, 8]),                            # ▁ is an ordinary piece here
    ("", "", []),
    ("a" * 200, "a*200", [34] * 200),
    ("a" * 201, "a*201", [UNK]),
]


@pytest.mark.parametrize("text,words,ids", CPM1_GOLDEN, ids=[repr(c[0][:12]) for c in CPM1_GOLDEN])
def test_cpm1_golden(cpm1, text, words, ids):
    assert cpm1.encode(text) == ids


@pytest.mark.parametrize("text,words,ids", CPM2_GOLDEN, ids=[repr(c[0][:12]) for c in CPM2_GOLDEN])
def test_cpm2_golden(cpm2, text, words, ids):
    assert cpm2.encode(text) == ids


def test_eva_shares_cpm2_rules(cpm2):
    eva = EVATokenizer(cpm2.source, n_sentinels=4)
    for text, _, ids in CPM2_GOLDEN:
        assert eva.encode(text) == ids


def test_tokenize_gives_pieces(cpm1, cpm2):
    assert cpm1.tokenize("hello world") == ["▁hello", "▁", "▂", "▁world"]
    assert cpm2.tokenize("helo") == ["he", "l", "<unk>"]  # "o" alone is not a piece


def test_control_tokens_in_text_are_text(cpm1, cpm2):
    # <span>, <eod>, <s_0> typed by a user are characters, never control ids (fill_blank splits <span>)
    assert 7 not in cpm1.encode("<eod>") and 7 not in cpm2.encode("<eod>")
    assert not set(cpm2.encode("<s_0><span>")) & set(cpm2.sentinel_ids)


# ---------------------------------------------------------------- decode and round trips

def test_decode_rules(cpm1, cpm2):
    assert cpm1.decode([11, 8, 10, 8, 3, 7]) == "我们 \n<eod>"   # ▁ deleted, specials literal
    assert cpm2.decode([11, 8, 10, 3, 36, 7, 0]) == "我们▁ \n<s_0><eod><unk>"  # ▁ kept
    with pytest.raises(ValueError, match="outside the vocabulary"):
        cpm2.decode([40])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        cpm2.decode([-1])


ROUND_TRIP_CPM1 = ["我们喜欢北京", "hello world", "我们\n北京", "我们<span>", "12345", "好...", "我们。",
                   "hello\n\nworld  我们", "a" * 199, ""]
ROUND_TRIP_CPM2 = ["我们喜欢天安门。", "hello world", "我们\n\n北京 hello", "北京，我们！", "我们<span>",
                   "12345", "我们▁", "a" * 200, ""]


@pytest.mark.parametrize("text", ROUND_TRIP_CPM1)
def test_cpm1_round_trip(cpm1, text):
    assert cpm1.decode(cpm1.encode(text)) == text


@pytest.mark.parametrize("text", ROUND_TRIP_CPM2)
def test_cpm2_round_trip(cpm2, text):
    assert cpm2.decode(cpm2.encode(text)) == text


# the exceptions the reference lists (§4.4): text -> what comes back
CPM1_LOSSY = [
    ("ＡＢＣ，我们！", "ABC,我们!"),     # full-width ASCII folded
    ("我们\u3000北京", "我们 北京"),     # U+3000 -> space
    ("好…", "好..."),                   # … -> ...
    ("😀我们", "<unk>我们"),             # out of vocabulary
    ("a" * 200, "<unk>"),               # word over the 200-character limit
    ("我们▁", "我们"),                  # literal ▁ vanishes
    ("a▂a", "a a"),                     # literal ▂ becomes a space
]
CPM2_LOSSY = [
    ("ＡＢＣ，我们！", "ABC，我们！"),
    ("我们\u3000北京", "我们 北京"),
    ("我们…", "我们<unk>"),
    ("a" * 201, "<unk>"),
    ("a▂a\t", "a a<unk>"),
]


@pytest.mark.parametrize("text,back", CPM1_LOSSY)
def test_cpm1_lossy_cases(cpm1, text, back):
    assert cpm1.decode(cpm1.encode(text)) == back


@pytest.mark.parametrize("text,back", CPM2_LOSSY)
def test_cpm2_lossy_cases(cpm2, text, back):
    assert cpm2.decode(cpm2.encode(text)) == back


# ---------------------------------------------------------------- lazy loading

def test_import_and_construction_load_neither_jieba_nor_sentencepiece(cpm2):
    code = (
        "import sys\n"
        "from bminf.tokenizers import CPM2Tokenizer\n"
        f"tok = CPM2Tokenizer({cpm2.source!r}, n_sentinels=4)\n"
        "assert 'jieba' not in sys.modules and 'sentencepiece' not in sys.modules, 'imported early'\n"
        "assert tok.eod_id == 7 and tok.decode([11]) == '我们'\n"
        "assert 'jieba' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- sentencepiece model vs HF CpmTokenizer

WORDS = ["我们", "喜欢", "北京", "天安门", "今天", "天气", "不错", "自然语言", "处理", "版本", "hello", "world",
         "3.14", "，", "。", "！", "1,", "2,", "12,", "2019,", "“", "”"]
SPECIALS = ["▃", "<sep>", "<pad>", "<mask>", "<eod>", "▂"]  # ids 3..8, close to CPM-1's layout


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(3000)]
    prefix = tmp_path_factory.mktemp("spm") / "cpm1"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(prefix), vocab_size=120,
                                   model_type="bpe", user_defined_symbols=SPECIALS, character_coverage=1.0,
                                   minloglevel=2)
    return f"{prefix}.model"


@pytest.fixture(scope="module")
def hf_cpm(spm_path):
    pytest.importorskip("transformers")
    # transformers 5 insists on importing rjieba in CpmTokenizer.__init__ but never calls it (see below);
    # a stand-in module lets the test run without the Rust package
    stand_in = types.ModuleType("rjieba")
    stand_in.cut = lambda text, hmm=True: pytest.fail("CpmTokenizer called rjieba: revisit this test")
    saved = sys.modules.get("rjieba")
    sys.modules["rjieba"] = stand_in
    try:
        from transformers import CpmTokenizer

        yield CpmTokenizer(spm_path)
    finally:
        if saved is None:
            sys.modules.pop("rjieba", None)
        else:
            sys.modules["rjieba"] = saved


def agreement_texts():
    rng = random.Random(1)
    extra = ["我们 喜欢", "  北京\n\n天气  ", "ＡＢＣ，１２３！", "我们\u3000北京", "好…", "café naïve", "``quoted''",
             "😀我们", "我们<span>", "\U0001F102\U0001F103 北京", "hello\tworld", "a" * 250, "今天天气不错！", ""]
    pool = WORDS + [" ", "\n", "ｈｅｌｌｏ", "é", "😀", "x", "99"]
    return extra + ["".join(rng.choice(pool) for _ in range(rng.randint(1, 20))) for _ in range(200)]


def test_sentencepiece_agrees_with_hf_cpm_tokenizer(spm_path, hf_cpm):
    ours = CPM1Tokenizer.from_sentencepiece(spm_path, expected_size=120)
    assert ours.eod_id == hf_cpm.convert_tokens_to_ids("<eod>") == 7
    # CpmTokenizer used to run jieba in _tokenize before XLNet's steps; transformers 5 replaced that
    # _tokenize with XLNet's own and left the fast class's jieba hook uncalled, so it now skips
    # segmentation. We hand it the segmented text that its 4.x _tokenize built, and compare the rest.
    for text in agreement_texts():
        segmented = " ".join(w.replace(" ", "▂").replace("\n", "▃") for w in segment(text))
        expected = hf_cpm.encode(segmented, add_special_tokens=False)
        got = ours.encode(text)
        assert got == expected, text
        assert ours.decode(got) == hf_cpm.decode(expected), text


def test_sentencepiece_splits_number_comma_pieces(spm_path):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=spm_path)
    # U+1F102 is "2," after NFKD: the BPE model has a piece ▁2, that CpmTokenizer cuts into ▁2 and ,
    assert sp.EncodeAsPieces("2,") == ["▁2,"]
    tok = CPM1Tokenizer.from_sentencepiece(spm_path)
    assert tok.tokenize("\U0001F103") == ["▁2", ","]


def test_sentencepiece_rules(spm_path):
    tok = CPM1Tokenizer.from_sentencepiece(spm_path)
    assert tok.decode(tok.encode("我们 喜欢\n北京")) == "我们 喜欢\n北京"
    assert tok.tokenize("我们 喜欢") == ["▁我们", "▁", "▂", "▁喜欢"]  # jieba words, the space word is ▂
    with pytest.raises(ValueError, match="expects 30000"):
        CPM1Tokenizer.from_sentencepiece(spm_path, expected_size=30000)


def test_sentencepiece_bad_file(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("<unk>\n<eod>\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"vocab\.txt: not a sentencepiece model"):
        CPM1Tokenizer.from_sentencepiece(path)


# ---------------------------------------------------------------- bad input never does harm

def test_bad_text_and_ids_give_clear_errors(cpm1, cpm2, spm_path):
    import numpy as np
    import torch

    spm = CPM1Tokenizer.from_sentencepiece(spm_path)
    for tok in (cpm1, cpm2, spm):
        with pytest.raises(TypeError, match="text must be a str, got NoneType"):
            tok.encode(None)
        with pytest.raises(TypeError, match=r"text must be a str, got bytes; decode it first"):
            tok.encode("我们".encode())
        with pytest.raises(TypeError, match="text must be a str, got list"):
            tok.encode(["我们"])
        with pytest.raises(TypeError, match="token ids must be integers, got float 1.5"):
            tok.decode([1.5])
        with pytest.raises(TypeError, match="token ids must be integers, got str"):
            tok.decode(["1"])
        with pytest.raises(TypeError, match="token ids must be integers, got bool"):
            tok.decode([True])
        with pytest.raises(TypeError, match="ids must be an iterable of token ids, got NoneType"):
            tok.decode(None)
        with pytest.raises(TypeError, match="ids must be an iterable of token ids, got str"):
            tok.decode("12")
        with pytest.raises(ValueError, match=r"ids must be one sequence \(1-D\), got shape \(1, 2\)"):
            tok.decode(torch.tensor([[1, 2]]))
        with pytest.raises(ValueError, match="outside the vocabulary"):
            tok.decode([-1])
        with pytest.raises(TypeError, match="token ids must be integers, got float"):
            tok.id_to_token(2.0)
        # integer ids of any integer type decode alike
        ids = tok.encode("我们")
        expected = tok.decode(ids)
        assert tok.decode(torch.tensor(ids)) == tok.decode(np.array(ids)) == tok.decode(tuple(ids)) == expected
    with pytest.raises(TypeError, match="token ids must be integers, got float"):
        cpm2.get_span(0.5)


def test_bad_vocab_files_name_the_file(tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("<unk>\n<s>\n<eod>\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt: line 4 is not valid UTF-8"):
        CPM2Tokenizer(latin1, n_sentinels=0)
    with pytest.raises(FileNotFoundError, match=r"vocab file .*missing\.txt does not exist"):
        CPM2Tokenizer(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="is a directory; pass the vocab.txt inside it"):
        CPM1Tokenizer(tmp_path)
    with pytest.raises(TypeError, match="vocab_path must be a path"):
        CPM2Tokenizer(None)
    with pytest.raises(FileNotFoundError, match=r"sentencepiece model .*nope\.model does not exist"):
        CPM1Tokenizer.from_sentencepiece(tmp_path / "nope.model")
