"""lmcore.Tokenizer against the references: tiktoken built offline from the real GPT-2 rank file,
Hugging Face ``tokenizers`` (on GPT-2's vocab.json + merges.txt and on trained vocabularies), and
transformers' own tiktoken converter for the GPT-2 layout. No mocks; every expected id comes from a
reference implementation in the same run.
"""

from __future__ import annotations

import json
import random
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import tiktoken.load
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiktoken_ext.openai_public import r50k_pat_str
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmcore import Tokenizer
from lmcore.tokenizer.files import bytes_to_unicode
from tests.helpers import GPT2_TIKTOKEN  # the real GPT-2 rank file, found beside the checkout

STDLIB = Path(sysconfig.get_paths()["stdlib"])
HYPOTHESIS = settings(max_examples=120, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

# A varied corpus: prose, code, JSON, scripts, emoji, whitespace, contractions, digits, controls.
CORPUS = [
    "",
    "Hello world",
    "The quick brown fox jumps over the lazy dog. It's 9:41 AM; we're late, aren't we?",
    "I'm sure you'll see they've said he'd go, she's done, it'd be 'quoted' ''' 'S 'T 'RE",
    "don't DON'T Don'T won't y'all 'tis o'clock",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\n\nclass A:\n\tpass\n",
    'if (a && b) { console.log("x", 1e-9); } else {\r\n  return [1,2,3].map(x => x*2);\r\n}',
    json.dumps({"name": "lmstack", "ids": [1, 2, 3], "nested": {"ok": True, "pi": 3.14159}, "s": "\u00e9\n"}),
    "日本語のテキストと中文文本，还有한국어 텍스트。",
    "العربية نص مكتوب من اليمين إلى اليسار، مع أرقام ١٢٣٤٥٦٧٨٩٠",
    "עברית, Ελληνικά, Русский текст, हिन्दी पाठ, ภาษาไทย, ქართული",
    "emoji 🤗🚀👍🏽 family 👨‍👩‍👧‍👦 flag 🇫🇷🇯🇵 keycap 1️⃣ zwj 🏳️‍🌈",
    "      leading spaces and trailing      ",
    "\n\n\n\t\t\t   \r\n \u00a0\u2003\u3000 mixed whitespace\n",
    " " * 200 + "x" + "\n" * 50,
    "0123456789 3.14159265358979 1,000,000 -42 +7 1e10 0xDEADBEEF ١٢٣ 一二三",
    "Mixing scripts: hello世界مرحباпривет🌍abc123日本",
    "control \x00\x01\x02\x07\x08\x1b[31mred\x1b[0m \x7f end",
    "Zalgo t̷̢̧͎̫͔̓͊̈́e̵̛̗̥̿x̴̢̛̭̀t̶̰͆ and combining e\u0301 vs \u00e9",
    "<|endoftext|> appears in user text <|endoftext|>",
    "Ünïcödé ßtraße ÆØÅ œuvre naïve café façade",
    "\ufeffBOM and \u200b zero width \u2028 line sep \u2029 para",
    "a" * 1000,
    "!!!???...---___===+++***&&&%%%$$$###@@@",
    "https://example.com/path?query=1&x=%20#frag user@example.org",
]


def _stdlib_text(names: list[str]) -> str:
    return "\n".join((STDLIB / n).read_text(encoding="utf-8") for n in names if (STDLIB / n).is_file())


@pytest.fixture(scope="module")
def gpt2_file(tmp_path_factory) -> Path:
    if not GPT2_TIKTOKEN.is_file():
        pytest.skip(f"{GPT2_TIKTOKEN} not found")
    dst = tmp_path_factory.mktemp("gpt2") / "gpt2.tiktoken"
    shutil.copyfile(GPT2_TIKTOKEN, dst)
    return dst


@pytest.fixture(scope="module")
def ref(gpt2_file) -> tiktoken.Encoding:
    """The reference: tiktoken's own GPT-2 encoding, built offline from the same rank file."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", "")  # read the file itself, never a cached copy
        ranks = tiktoken.load.load_tiktoken_bpe(str(gpt2_file))
    return tiktoken.Encoding(
        name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256}
    )


@pytest.fixture(scope="module")
def tok(gpt2_file) -> Tokenizer:
    return Tokenizer.from_file(gpt2_file)


@pytest.fixture(scope="module")
def gpt2_layout_dir(gpt2_file, tmp_path_factory) -> Path:
    """GPT-2's original layout (vocab.json + merges.txt), written by transformers' TikTokenConverter
    (an independent implementation of the byte-to-unicode mapping and of merge recovery)."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", "")
        vocab, merges = TikTokenConverter().extract_vocab_merges_from_model(str(gpt2_file))
    vocab["<|endoftext|>"] = 50256
    d = tmp_path_factory.mktemp("gpt2_layout")
    (d / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n", encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def hf_gpt2(gpt2_layout_dir) -> HFTokenizer:
    """Hugging Face's plain BPE (ignore_merges off) over that layout, with GPT-2's own regex."""
    hf = HFTokenizer(models.BPE.from_file(str(gpt2_layout_dir / "vocab.json"), str(gpt2_layout_dir / "merges.txt")))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    return hf


def hf_ids(hf: HFTokenizer, text: str) -> list[int]:
    """Hugging Face ids. Note: ``tokenizers`` always matches special tokens' text (ours only when
    allowed), so where the HF tokenizer has special tokens we compare with ``allowed_special="all"``."""
    return hf.encode(text, add_special_tokens=False).ids


# ---------------------------------------------------------------------------------------------
# GPT-2 parity


def test_gpt2_corpus_matches_tiktoken_and_hf(tok, ref, hf_gpt2):
    code = _stdlib_text(["textwrap.py", "json/encoder.py"])
    assert len(code) > 10_000
    for text in [*CORPUS, code]:
        ids = tok.encode(text)
        assert ids == ref.encode_ordinary(text), text[:60]
        assert ids == hf_ids(hf_gpt2, text), text[:60]
        assert tok.decode(ids) == text
        assert tok.count(text) == len(ids)


def test_gpt2_basics(tok, ref, gpt2_file, tmp_path):
    assert tok.vocab_size == 50257 == ref.n_vocab
    assert tok.eos_id == 50256
    assert tok.special_tokens == {"<|endoftext|>": 50256}
    assert tok.encode("Hello world") == [15496, 995]  # GPT-2's well-known ids
    assert tok.token_bytes(262) == ref.decode_single_token_bytes(262) == b" the"
    assert tok.token_bytes(50256) == b"<|endoftext|>"
    assert tok.decode([50256]) == "<|endoftext|>"
    assert Tokenizer.gpt2(gpt2_file).encode("hi there") == tok.encode("hi there")
    lines = gpt2_file.read_text().splitlines()
    with pytest.raises(ValueError, match="GPT-2 has 50,256 ranks"):
        Tokenizer.gpt2(_write_tiktoken(tmp_path / "short.tiktoken", lines[:1000]))


def test_special_token_policy(tok, ref):
    text = "a<|endoftext|>b <|endoftext|>"
    plain = tok.encode(text)
    assert plain == ref.encode(text, disallowed_special=())
    assert 50256 not in plain
    assert tok.encode(text, allowed_special="all") == ref.encode(text, allowed_special="all")
    assert tok.encode(text, allowed_special={"<|endoftext|>"}).count(50256) == 2
    assert tok.encode(text, allowed_special=set()) == plain
    with pytest.raises(ValueError, match="unknown special token"):
        tok.encode(text, allowed_special={"<|im_start|>"})
    with pytest.raises(ValueError, match="a set of names"):
        tok.encode(text, allowed_special="<|endoftext|>")
    assert tok.count(text, allowed_special="all") == len(ref.encode(text, allowed_special="all"))


def test_encode_batch(tok, ref):
    texts = CORPUS * 3 + [_stdlib_text(["argparse.py"])]
    expected = ref.encode_ordinary_batch(texts)
    assert tok.encode_batch(texts) == expected
    assert tok.encode_batch(texts, num_threads=1) == expected
    assert tok.encode_batch(texts, num_threads=3) == expected
    assert tok.encode_batch(tuple(texts[:5])) == expected[:5]
    assert tok.encode_batch([]) == []
    assert tok.encode_batch(["<|endoftext|>"], allowed_special="all") == [[50256]]


def test_from_tiktoken_shares_the_core(ref):
    wrapped = Tokenizer.from_tiktoken(ref)
    assert wrapped.tiktoken_encoding is ref and wrapped.eos_id == 50256 and wrapped.vocab_size == 50257
    assert wrapped.encode_batch(CORPUS) == ref.encode_ordinary_batch(CORPUS)


def test_pickle_round_trip(tok):
    import pickle

    tok.encode_batch(CORPUS)  # a live thread pool must not break pickling
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode_batch(CORPUS) == tok.encode_batch(CORPUS)
    assert clone.special_tokens == tok.special_tokens and clone.eos_id == tok.eos_id


def test_lone_surrogates_are_replaced_like_tiktoken(tok, ref):
    text = "broken \ud83d pair"
    assert tok.encode(text) == ref.encode_ordinary(text)
    assert tok.decode(tok.encode(text)) == "broken \ufffd pair"
    with pytest.raises(TypeError, match="expects a str"):
        tok.encode(b"bytes")  # type: ignore[arg-type]


@HYPOTHESIS
@given(st.text(max_size=300))
def test_random_unicode_matches_tiktoken(tok, ref, text):
    ids = tok.encode(text)
    assert ids == ref.encode_ordinary(text)
    assert tok.decode(ids) == text


# Text built from the pieces GPT-2's regex cares about, so the property test hits its branches.
PIECES = st.sampled_from([
    " ", "  ", "\n", "\t", "\r\n", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "the", " the",
    "123", " 4", "é", "日本", "🤗", "👨‍👩‍👧", "\u200d", "\u0301", "!?", " ...", "<|endoftext|>", "ab", "Ġ",
])


@HYPOTHESIS
@given(st.lists(PIECES | st.characters(), max_size=60).map("".join))
def test_structured_text_matches_tiktoken(tok, ref, text):
    assert tok.encode(text) == ref.encode_ordinary(text)
    assert tok.encode(text, allowed_special="all") == ref.encode(text, allowed_special="all")


# ---------------------------------------------------------------------------------------------
# decoding and streaming


def test_decode_accepts_sequences_and_rejects_bad_ids(tok):
    ids = tok.encode("streaming 🤗 text")
    assert tok.decode(tuple(ids)) == tok.decode(np.array(ids)) == tok.decode(torch.tensor(ids)) == "streaming 🤗 text"
    assert tok.decode([]) == ""
    for bad, msg in [([-1], "negative"), ([50257], "not in the vocabulary"), ([10**12], "not in the vocabulary"),
                     ([1, 2, "x"], "not an integer")]:
        with pytest.raises(ValueError, match=msg):
            tok.decode(bad)
    with pytest.raises(ValueError, match="position 2"):
        tok.decode([1, 2, -5])
    with pytest.raises(ValueError, match="position 1"):
        tok.decode(torch.tensor([1, 50300]))
    assert tok.decode_bytes(np.array(tok.encode("🤗"))[:2]) == "🤗".encode()[:3]
    with pytest.raises(ValueError, match="negative"):
        tok.token_bytes(-1)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.token_bytes(60000)


def test_invalid_utf8_decodes_with_replacement(tok, ref):
    # Single-byte tokens for bytes that are never valid on their own / a cut-off 4-byte character.
    byte_ids = [ref.encode_single_token(bytes([b])) for b in (0xFF, 0x80, 0xF0, 0x9F)]
    assert tok.decode(byte_ids) == ref.decode(byte_ids) == b"\xff\x80\xf0\x9f".decode("utf-8", "replace")
    assert "\ufffd" in tok.decode(byte_ids)


def test_stream_decoder_holds_partial_characters(tok):
    ids = tok.encode("🤗")
    assert len(ids) == 3  # one emoji, 4 bytes, three GPT-2 tokens
    dec = tok.stream_decoder()
    assert [dec.push(i) for i in ids] == ["", "", "🤗"]
    assert dec.flush() == ""
    # A stream cut mid-character: flush emits the replacement character, like decode.
    assert dec.push(ids[0]) + dec.push(ids[1]) == ""
    assert dec.flush() == tok.decode(ids[:2]) == "\ufffd"
    # A bad id raises and leaves the stream intact.
    assert dec.push(ids[0]) == ""
    with pytest.raises(ValueError, match="negative"):
        dec.push(-3)
    assert dec.push(ids[1]) + dec.push(ids[2]) == "🤗"


MULTIBYTE = st.text(alphabet=st.characters(min_codepoint=0x80, exclude_categories=("Cs",)), max_size=80) | st.lists(
    st.sampled_from(["🤗", "👨‍👩‍👧‍👦", "日本語", "é", "ع", "\u0301", " ", "a", "🇫🇷", "𝔘𝔫𝔦"]), max_size=40
).map("".join)


@HYPOTHESIS
@given(MULTIBYTE)
def test_stream_decoder_equals_decode_on_multibyte_text(tok, text):
    ids = tok.encode(text)
    dec = tok.stream_decoder()
    pieces = [dec.push(i) for i in ids]
    assert "".join(pieces) + dec.flush() == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)  # never a half character on valid text


@HYPOTHESIS
@given(st.lists(st.integers(0, 50256), max_size=50))
def test_stream_decoder_equals_decode_on_arbitrary_ids(tok, ref, ids):
    # Random ids include the byte tokens of broken UTF-8: replacement characters must match exactly.
    dec = tok.stream_decoder()
    streamed = "".join(dec.push(i) for i in ids) + dec.flush()
    assert streamed == tok.decode(ids) == ref.decode(ids)


# ---------------------------------------------------------------------------------------------
# Hugging Face layouts


def test_gpt2_vocab_merges_layout_gives_identical_ids(gpt2_layout_dir, tok, ref):
    layout = Tokenizer.from_file(gpt2_layout_dir)
    assert layout.vocab_size == 50257 and layout.eos_id == 50256
    assert layout.special_tokens == {"<|endoftext|>": 50256}
    for text in CORPUS:
        assert layout.encode(text) == ref.encode_ordinary(text)
    assert Tokenizer.from_file(gpt2_layout_dir / "vocab.json").encode(CORPUS[2]) == tok.encode(CORPUS[2])
    assert Tokenizer.from_file(gpt2_layout_dir / "merges.txt").encode(CORPUS[8]) == tok.encode(CORPUS[8])


def test_tokenizer_json_from_transformers_tiktoken_converter(gpt2_file, ref, tmp_path):
    # A tokenizer.json written by someone else: transformers' converter (Split regex + ByteLevel,
    # every split of every token listed as a merge, ignore_merges on). Loads, and gives GPT-2's ids.
    from transformers.convert_slow_tokenizer import TikTokenConverter

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", "")
        hf = TikTokenConverter(vocab_file=str(gpt2_file), pattern=r50k_pat_str,
                               extra_special_tokens=["<|endoftext|>"]).converted()
    hf.save(str(tmp_path / "tokenizer.json"))
    loaded = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert loaded.pattern == r50k_pat_str and loaded.eos_id == 50256
    for text in CORPUS:
        assert loaded.encode(text) == ref.encode_ordinary(text)
        assert loaded.encode(text, allowed_special="all") == hf_ids(hf, text)


def test_openai_original_file_names(gpt2_layout_dir, tmp_path, ref):
    # OpenAI's GPT-2 release calls the same two files encoder.json and vocab.bpe.
    shutil.copyfile(gpt2_layout_dir / "vocab.json", tmp_path / "encoder.json")
    with pytest.raises(ValueError, match="needs both encoder.json and vocab.bpe"):
        Tokenizer.from_file(tmp_path)
    shutil.copyfile(gpt2_layout_dir / "merges.txt", tmp_path / "vocab.bpe")
    assert Tokenizer.from_file(tmp_path).encode(CORPUS[4]) == ref.encode_ordinary(CORPUS[4])


def test_saved_gpt2_layout_loads_in_tokenizers_and_transformers(tok, ref, tmp_path):
    tok.save(tmp_path)
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (tmp_path / name).is_file()
    merges = (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version") and len(merges) == 1 + 50000
    assert merges[1] == "Ġ t"  # GPT-2's first merge: " " + "t"
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(str(tmp_path))
    assert auto.eos_token_id == 50256
    reloaded = Tokenizer.from_file(tmp_path)
    for text in CORPUS:
        expected = ref.encode_ordinary(text)
        assert hf_ids(hf, text) == ref.encode(text, allowed_special="all")
        assert reloaded.encode(text) == expected
    assert auto(CORPUS[2], add_special_tokens=False)["input_ids"] == ref.encode_ordinary(CORPUS[2])
    (tmp_path / "tokenizer.json").unlink()
    assert Tokenizer.from_file(tmp_path).encode(CORPUS[11]) == ref.encode_ordinary(CORPUS[11])


def test_directory_with_tiktoken_file(gpt2_tiktoken_path, ref):
    t = Tokenizer.from_file(gpt2_tiktoken_path.parent)
    assert t.encode(CORPUS[3]) == ref.encode_ordinary(CORPUS[3]) and t.eos_id == 50256
    custom = Tokenizer.from_file(gpt2_tiktoken_path, special_tokens={"<|endoftext|>": 50256, "<|pad|>": 50257})
    assert custom.vocab_size == 50258 and custom.encode("<|pad|>", allowed_special="all") == [50257]
    (gpt2_tiktoken_path.parent / "other.tiktoken").write_bytes(gpt2_tiktoken_path.read_bytes())
    with pytest.raises(ValueError, match="found 2"):
        Tokenizer.from_file(gpt2_tiktoken_path.parent)


# ---------------------------------------------------------------------------------------------
# bad files


def _write_tiktoken(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_corrupt_tiktoken_files(gpt2_tiktoken_path, tmp_path):
    lines = gpt2_tiktoken_path.read_text().splitlines()
    cases = {
        "bad_b64": (lines[:10] + ["@@notbase64@@ 10"] + lines[11:], "corrupt tiktoken"),
        "no_rank": (lines[:10] + [lines[10].split()[0]] + lines[11:], "corrupt tiktoken"),
        "bad_rank": (lines[:10] + [lines[10].split()[0] + " ten"] + lines[11:], "corrupt tiktoken"),
        "dup_rank": (lines[:300] + [lines[300].split()[0] + " 299"], "rank 299 already used"),
        "dup_token": (lines[:300] + [lines[0].split()[0] + " 300"], "listed twice"),
        "missing_bytes": (lines[5:], "256 single-byte tokens"),
        "empty": ([""], "empty"),
    }
    for name, (content, msg) in cases.items():
        with pytest.raises(ValueError, match=msg):
            Tokenizer.from_file(_write_tiktoken(tmp_path / f"{name}.tiktoken", content))
    with pytest.raises(ValueError, match="no such tokenizer"):
        Tokenizer.from_file(tmp_path / "missing.tiktoken")
    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    with pytest.raises(ValueError, match="no tokenizer found"):
        Tokenizer.from_file(empty_dir)
    with pytest.raises(ValueError, match="invalid pre-tokenizer pattern"):
        Tokenizer.from_file(gpt2_tiktoken_path, pattern="(unclosed")


@pytest.fixture
def small_trained(tmp_path) -> Path:
    """A small saved vocabulary to corrupt in the tests below."""
    t = Tokenizer.train([_stdlib_text(["textwrap.py"])], vocab_size=400)
    d = tmp_path / "small"
    t.save(d)
    return d


def _edit_json(path: Path, edit) -> None:
    obj = json.loads(path.read_text(encoding="utf-8"))
    edit(obj)
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")


def test_unconvertible_tokenizer_json(small_trained):
    tj = small_trained / "tokenizer.json"
    original = tj.read_text(encoding="utf-8")

    def swap_two_merges(o):
        m = o["model"]["merges"]
        m[10], m[11] = m[11], m[10]

    def drop_merge(o):
        del o["model"]["merges"][-1]

    def orphan_token(o):
        o["model"]["vocab"]["Ġorphan"] = len(o["model"]["vocab"])

    cases = [
        (lambda o: o["model"].update(type="WordPiece"), "not a BPE"),
        (lambda o: o.update(normalizer={"type": "NFC"}), "normalizer"),
        (lambda o: o["pre_tokenizer"].update(add_prefix_space=True), "unsupported pre_tokenizer"),
        (lambda o: o.update(pre_tokenizer={"type": "Whitespace"}), "unsupported pre_tokenizer"),
        (lambda o: o["model"].update(continuing_subword_prefix="##"), "continuing_subword_prefix"),
        (lambda o: o["model"]["merges"].append("Ġq zz"), "not in the vocabulary"),
        (lambda o: o["model"]["vocab"].update({"\u4e00x": 9999}), "byte-to-unicode"),
        (lambda o: o["added_tokens"][0].update(special=False), "not special"),
        (swap_two_merges, "ids must grow with merge order"),
        (drop_merge, "BPE can never produce it"),
        (orphan_token, "BPE can never produce it"),
    ]
    for edit, msg in cases:
        tj.write_text(original, encoding="utf-8")
        _edit_json(tj, edit)
        with pytest.raises(ValueError, match=msg):
            Tokenizer.from_file(tj)
    tj.write_text(original[: len(original) // 2], encoding="utf-8")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        Tokenizer.from_file(tj)


def test_inexact_merge_is_refused(tmp_path):
    # merges: b+c (256), a+b (257), ab+c (258). Hugging Face turns "abc" into [a, bc] (no merge
    # a+bc is listed); tiktoken, joining by rank, reaches [abc]. The two disagree, so refuse.
    b2u = bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)} | {"bc": 256, "ab": 257, "abc": 258}
    merges = ["b c", "a b", "ab c"]
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    hf = HFTokenizer(models.BPE.from_file(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    ranks = {bytes([b]): b for b in range(256)} | {b"bc": 256, b"ab": 257, b"abc": 258}
    tt = tiktoken.Encoding("inexact", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={})
    assert hf_ids(hf, "abc") == [ord("a"), 256] and tt.encode_ordinary("abc") == [258]
    with pytest.raises(ValueError, match="cannot convert exactly"):
        Tokenizer.from_file(tmp_path)
    # Listing the merge tiktoken actually performs (a + bc) makes the layout exact.
    (tmp_path / "merges.txt").write_text("#version: 0.2\nb c\na b\na bc\n", encoding="utf-8")
    exact = Tokenizer.from_file(tmp_path)
    hf = HFTokenizer(models.BPE.from_file(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    for text in ["abc", "abcabc ab bc cab", "aabbcc abcc"]:
        assert exact.encode(text) == hf_ids(hf, text) == tt.encode_ordinary(text)


# ---------------------------------------------------------------------------------------------
# training


TRAIN_FILES = ["textwrap.py", "argparse.py", "json/decoder.py", "string.py"]
HELD_OUT = [_stdlib_text(["shlex.py"]), *CORPUS]


def _hf_trainer_tokenizer(texts: list[str], vocab_size: int) -> HFTokenizer:
    """Hugging Face's BPE trained directly (the reference for a trained vocabulary)."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return hf


def test_trained_vocabulary_matches_tokenizers_on_held_out_text():
    texts = [_stdlib_text([f]) for f in TRAIN_FILES]
    hf = _hf_trainer_tokenizer(texts, 1200)
    ours = Tokenizer.from_hf(hf)
    assert ours.vocab_size == hf.get_vocab_size() == 1200
    for text in HELD_OUT:
        assert ours.encode(text, allowed_special="all") == hf_ids(hf, text), text[:60]
        assert ours.decode(ours.encode(text)) == text
    assert ours.encode("<|endoftext|>", allowed_special="all") == [ours.eos_id] == [hf.token_to_id("<|endoftext|>")]


def test_train_save_reload_identical(tmp_path):
    files = [STDLIB / f for f in TRAIN_FILES]
    trained = Tokenizer.train(files, vocab_size=1000, special_tokens=["<|endoftext|>", "<|pad|>"])
    assert trained.vocab_size == 1000
    assert trained.special_tokens == {"<|endoftext|>": 0, "<|pad|>": 1} and trained.eos_id == 0
    again = Tokenizer.train(files, vocab_size=1000, special_tokens=["<|endoftext|>", "<|pad|>"])
    assert again.merges() == trained.merges()  # deterministic
    trained.save(tmp_path)
    reloaded = Tokenizer.from_file(tmp_path)
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert reloaded.special_tokens == trained.special_tokens and reloaded.eos_id == 0
    for text in HELD_OUT:
        ids = trained.encode(text)
        assert reloaded.encode(text) == ids
        assert reloaded.encode(text, allowed_special="all") == hf_ids(hf, text)
    assert reloaded.encode("a<|pad|>b", allowed_special="all")[1] == 1
    (tmp_path / "tokenizer.json").unlink()  # the vocab.json + merges.txt pair alone reloads too
    again = Tokenizer.from_file(tmp_path)
    assert again.encode(HELD_OUT[0]) == trained.encode(HELD_OUT[0])
    assert again.special_tokens == trained.special_tokens


def test_train_custom_pattern_round_trip(tmp_path):
    pattern = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
    t = Tokenizer.train([_stdlib_text(TRAIN_FILES[:2])], vocab_size=600, pattern=pattern)
    t.save(tmp_path)
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    reloaded = Tokenizer.from_file(tmp_path)
    assert reloaded.pattern == pattern
    assert reloaded.eos_id == t.eos_id == 0
    for text in HELD_OUT[:8]:
        assert reloaded.encode(text) == t.encode(text)
        assert reloaded.encode(text, allowed_special="all") == hf_ids(hf, text)


def test_custom_eos_token_survives_save(tmp_path):
    t = Tokenizer.train([_stdlib_text(["string.py"])], vocab_size=300, special_tokens=["<|pad|>", "<|end|>"],
                        eos_token="<|end|>")
    assert t.eos_id == 1 and t.eos_token == "<|end|>"
    t.save(tmp_path)
    assert Tokenizer.from_file(tmp_path).eos_id == 1
    (tmp_path / "tokenizer.json").unlink()
    assert Tokenizer.from_file(tmp_path).eos_id == 1
    no_eos = Tokenizer.train(["abc abc"], vocab_size=300, special_tokens=["<|pad|>"])
    assert no_eos.eos_id is None and no_eos.special_tokens == {"<|pad|>": 0}


def test_train_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="too small to train"):
        Tokenizer.train(["some text"], vocab_size=200)
    with pytest.raises(ValueError, match="256 byte tokens \\+ 2 special"):
        Tokenizer.train(["some text"], vocab_size=257, special_tokens=["<|endoftext|>", "<|pad|>"])
    with pytest.raises(ValueError, match="distinct non-empty"):
        Tokenizer.train(["x"], vocab_size=300, special_tokens=["a", "a"])
    with pytest.raises(ValueError, match="str texts or pathlib.Path"):
        Tokenizer.train([b"bytes"], vocab_size=300)
    with pytest.raises(ValueError, match="cannot read training file"):
        Tokenizer.train([tmp_path / "missing.txt"], vocab_size=300)
    # 256 + 1 is the floor: the bytes alone, no merge, still a working tokenizer.
    minimal = Tokenizer.train(["hello hello"], vocab_size=257)
    assert minimal.vocab_size == 257 and minimal.decode(minimal.encode("héllo 🤗")) == "héllo 🤗"
    assert len(minimal.encode("hello")) == 5


def test_model_directory_round_trip_with_trained_tokenizer(tmp_path):
    from lmcore import GPT, GPTConfig, load_model, save_pretrained

    trained = Tokenizer.train([_stdlib_text(TRAIN_FILES[:2])], vocab_size=500)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", vocab_size=trained.vocab_size))
    save_pretrained(model, tmp_path / "m", tokenizer=trained)
    loaded = load_model(tmp_path / "m")
    assert isinstance(loaded.tokenizer, Tokenizer)
    for text in HELD_OUT[:6]:
        assert loaded.tokenizer.encode(text) == trained.encode(text)
    assert loaded.tokenizer.eos_id == trained.eos_id
    ids = torch.tensor([trained.encode("def main():")])
    with torch.inference_mode():
        torch.testing.assert_close(loaded(ids), model.eval()(ids))
    save_pretrained(model, tmp_path / "bare")
    assert load_model(tmp_path / "bare").tokenizer is None


def test_train_from_large_file_is_chunked_like_text(tmp_path):
    # Files stream in ~1 MiB blocks cut only before a non-space line start: the same merges as
    # handing the whole text over at once.
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "    indented", "\n", "\n\n", "日本", "🤗"]
    text = " ".join(rng.choice(words) for _ in range(400_000))
    path = tmp_path / "big.txt"
    path.write_text(text, encoding="utf-8")
    assert path.stat().st_size > 2 << 20
    from_file = Tokenizer.train([path], vocab_size=320)
    from_text = Tokenizer.train([text], vocab_size=320)
    assert from_file.merges() == from_text.merges()
