"""Property tests of the tokenizers on a small vocab: any Unicode string encodes to ids in range and
decodes without error, and decode(encode(s)) gives back ``s`` up to exactly the changes reference §4.4
allows (full-width folding, out-of-vocabulary characters as ``<unk>``, marks, CPM-1's ``▁``)."""
import pytest

pytest.importorskip("hypothesis")
from hypothesis import given, strategies as st

from bminf.tokenizers import CPM1Tokenizer, CPM2Tokenizer

# Every multi-character piece (specials included) is spelled with single-character pieces, so greedy
# matching can only ever change how a string is cut, never which characters come back.
SINGLES = list("<>unkspeodar_0123456789我们喜欢北京天气好，。！,.!?-abcdhlw") + ["▁", "▂", "▃"]
PIECES = ["<unk>", "<s>", "<eod>", "<sep>", "<pad>", "我们", "喜欢", "北京", "天气", "hello", "ab", "12", "..."]
CPM1_PIECES = PIECES + ["▁我们", "▁喜欢", "▁北京", "▁hello", "▁好"]
# characters neither tokenizer folds or unmarks (CPM-1 folds the full-width ，。！)
ALPHABET = [c for c in SINGLES if c not in "▁▂▃" and c.translate(CPM1Tokenizer._fold) == c] + [" ", "\n"]
# round trips exact: vocab characters, spaces, newlines; plus anything at all
TEXT = st.text(st.sampled_from(ALPHABET), max_size=40)
ANY = st.text(st.sampled_from(ALPHABET) | st.characters(codec=None) | st.sampled_from("ＡＢ１　…\r\t\x00\ud800"),
              max_size=40)


def _write(path, pieces):
    seen = list(dict.fromkeys(pieces))
    path.write_text("\n".join(seen) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    return (CPM1Tokenizer(_write(root / "cpm1.txt", CPM1_PIECES + SINGLES)),
            CPM2Tokenizer(_write(root / "cpm2.txt", PIECES + SINGLES), n_sentinels=0))


def expected(tok, text: str) -> str:
    """What §4.4 says decode(encode(text)) gives, character by character."""
    singles = {t for t in tok._tokens if len(t) == 1}
    out = []
    for c in text.translate(tok._fold):
        if c in " \n":
            out.append(c)
        elif c in singles:
            out.append(c.translate(tok._unmark))
        else:
            out.append("<unk>")
    return "".join(out)


@given(text=TEXT)
def test_vocab_text_round_trips_exactly(tokenizers, text):
    for tok in tokenizers:
        assert tok.decode(tok.encode(text)) == text


@given(text=ANY)
def test_any_string_encodes_and_decodes_as_the_reference_says(tokenizers, text):
    for tok in tokenizers:
        ids = tok.encode(text)
        assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == expected(tok, text)
        assert tok.tokenize(text) == [tok.id_to_token(i) for i in ids]


@given(ids=st.lists(st.integers(0, 200), max_size=30))
def test_any_ids_in_range_decode_and_others_are_refused(tokenizers, ids):
    for tok in tokenizers:
        if all(i < tok.vocab_size for i in ids):
            assert isinstance(tok.decode(ids), str)
        else:
            with pytest.raises(ValueError, match="outside the vocabulary"):
                tok.decode(ids)
