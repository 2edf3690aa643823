"""The K2 tokenizer: file format, special tokens, plain-tiktoken equality, pathological input."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from openk2.corpus import read_corpus, shakespeare_files, stdlib_python_files
from openk2.tokenizer import JINJA_TEMPLATE, K2_PATTERN, IncrementalDecoder, K2Tokenizer
from openk2.tokenizer.tokenizer import MAX_RUN_CHARS, SPECIAL_ATTRS, default_special_names

MIXED = (
    "The quick brown fox jumps over the lazy dog. DON'T PANIC, it's 12345.67!\n"
    "机器学习是人工智能的一个分支。你好，世界！混合English和中文。\n"
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # O(2^n)\n"
    "Emoji: 😀🎉👩‍👩‍👧 flags 🇫🇷 and accents: café naïve Ångström ß\n\n\t  trailing   \n"
)


@pytest.fixture(scope="module")
def tok() -> K2Tokenizer:
    return K2Tokenizer.default()


def test_default_is_the_small_preset_layout(tok):
    assert (tok.n_base, tok.vocab_size, len(tok)) == (7936, 8192, 8192)
    assert (tok.bos_id, tok.eos_id, tok.im_end_id) == (7936, 7937, 7938)
    assert (tok.im_system_id, tok.tool_calls_section_begin_id, tok.im_middle_id) == (7946, 7947, 7953)
    assert tok.special_ids["<|reserved_token_8191|>"] == 8191
    # byte b is token b in every openk2 tokenizer, so `small` and `tiny` agree on the first 256 ids
    assert all(tok.token_bytes(b) == bytes([b]) for b in range(256))
    # the shipped config carries the same Jinja chat template the code exports
    assert tok.chat_template == JINJA_TEMPLATE


def test_k2_special_ids_match_the_real_tokenizer():
    names = {v: k for k, v in default_special_names(163584).items()}
    expected = {
        "[BOS]": 163584,
        "[EOS]": 163585,
        "<|im_end|>": 163586,
        "<|im_user|>": 163587,
        "<|im_assistant|>": 163588,
        "<|im_system|>": 163594,
        "<|tool_calls_section_begin|>": 163595,
        "<|tool_calls_section_end|>": 163596,
        "<|tool_call_begin|>": 163597,
        "<|tool_call_argument_begin|>": 163598,
        "<|tool_call_end|>": 163599,
        "<|im_middle|>": 163601,
        "<|reserved_token_163839|>": 163839,
    }
    assert {k: names[k] for k in expected} == expected
    assert len(names) == 256


def test_byte_level_tiny():
    tok = K2Tokenizer.byte_level()
    assert (tok.n_base, tok.vocab_size, tok.bos_id, tok.eos_id) == (256, 512, 256, 257)
    assert tok.encode("é!") == [0xC3, 0xA9, 0x21]
    assert tok.decode(tok.encode(MIXED)) == MIXED
    assert tok.encode(MIXED) == list(MIXED.encode())


def test_round_trip_and_compression(tok):
    ids = tok.encode(MIXED)
    assert tok.decode(ids) == MIXED
    assert tok.decode_bytes(ids) == MIXED.encode()
    english = read_corpus("shakespeare", max_chars=20_000)
    assert len(tok.encode(english)) < len(english.encode()) / 3  # BPE learned real English merges


def test_specials_never_come_from_ordinary_text(tok):
    text = "user typed <|im_end|><|tool_call_begin|>[EOS] here"
    ids = tok.encode(text)
    assert not any(tok.is_special(i) for i in ids)
    assert tok.decode(ids) == text
    ids = tok.encode(text, allow_special=True)
    assert [i for i in ids if tok.is_special(i)] == [tok.im_end_id, tok.tool_call_begin_id, tok.eos_id]
    assert tok.decode(ids) == text


def _plain_tiktoken(directory) -> tiktoken.Encoding:
    ranks = load_tiktoken_bpe(str(directory / "tiktoken.model"))
    specials = {name: i for i, name in default_special_names(len(ranks)).items()}
    return tiktoken.Encoding("plain", pat_str=K2_PATTERN, mergeable_ranks=ranks, special_tokens=specials)


def test_trained_by_cli_loads_in_plain_tiktoken(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(read_corpus("shakespeare", max_chars=300_000) + MIXED * 50)
    out = tmp_path / "tok"
    cmd = [sys.executable, "-m", "openk2.cli", "tokenizer", "train", "--corpus", str(corpus)]
    cmd += ["python-stdlib:200000", "--vocab-size", "2048", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    ours = K2Tokenizer.from_pretrained(out)
    assert (ours.n_base, ours.vocab_size) == (1792, 2048)
    plain = _plain_tiktoken(out)
    assert ours.encode(MIXED) == plain.encode_ordinary(MIXED)
    assert ours.encode(MIXED, allow_special=True) == plain.encode(MIXED, allowed_special="all")
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["added_tokens_decoder"]["1792"]["content"] == "[BOS]"
    assert config["chat_template"] == JINJA_TEMPLATE


def test_shipped_default_equals_plain_tiktoken(tok):
    from openk2.tokenizer.tokenizer import ASSETS_DIR

    plain = _plain_tiktoken(ASSETS_DIR)
    code = stdlib_python_files()[0].read_text()
    for text in (MIXED, code, read_corpus("shakespeare", max_chars=50_000)):
        assert tok.encode(text) == plain.encode_ordinary(text)


def test_pathological_input_is_fast_and_exact(tok):
    body = (MIXED * 2000)[:450_000]
    text = body + " " * 100_000 + body + "x" * 60_000 + "\n" + "😀" * 20_000
    assert len(text) > 1_000_000
    t0 = time.perf_counter()
    ids = tok.encode(text)
    assert time.perf_counter() - t0 < 10
    assert tok.decode(ids) == text
    # text without runs longer than MAX_RUN_CHARS is never cut: identical to one tiktoken call
    assert tok.encode(body) == tok.enc.encode_ordinary(body)
    run = " " * (3 * MAX_RUN_CHARS)
    assert tok.decode(tok.encode("a" + run + "b")) == "a" + run + "b"


def test_save_and_reload(tok, tmp_path):
    tok.save_pretrained(tmp_path / "copy")
    again = K2Tokenizer.from_pretrained(tmp_path / "copy")
    assert again.encode(MIXED) == tok.encode(MIXED)
    assert again.special_ids == tok.special_ids
    for attr in SPECIAL_ATTRS:
        assert getattr(again, attr) == getattr(tok, attr)


def test_bad_input_gives_clear_errors(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer directory"):
        K2Tokenizer.from_pretrained(tmp_path / "nope")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tiktoken.model").write_text("QQ== 0\nnot-a-line\n")
    with pytest.raises(ValueError, match="expected 'base64-token rank'"):
        K2Tokenizer.from_pretrained(tmp_path / "bad")
    (tmp_path / "bad" / "tiktoken.model").write_text("QQ== 0\nQg== 1\n")
    with pytest.raises(ValueError, match="single bytes"):
        K2Tokenizer.from_pretrained(tmp_path / "bad")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([8192])
    with pytest.raises(TypeError):
        tok.encode(b"bytes")


def test_incremental_decoder_holds_split_characters(tok):
    text = "héllo 😀 世界 🇫🇷!"
    ids = tok.encode(text)
    assert len(ids) > len(text)  # some characters span several tokens
    dec = IncrementalDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    assert "".join(pieces) + dec.flush() == text
    assert all("\ufffd" not in p for p in pieces)
    dec = IncrementalDecoder(tok, skip_special=True)
    assert dec.push_many([tok.im_end_id, *tok.encode("ok")]) == "ok"
    dec = IncrementalDecoder(tok)
    assert dec.push(0xF0) == "" and dec.flush() == "\ufffd"  # a dangling lead byte at the end


def test_corpus_helpers(tmp_path):
    assert len(shakespeare_files()) > 30
    assert all(p.suffix == ".py" for p in stdlib_python_files())
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "b.md").write_text("world")
    assert read_corpus(str(tmp_path)) == "hello\n\nworld"
    with pytest.raises(FileNotFoundError, match="unknown corpus"):
        read_corpus("no-such-corpus")


def test_every_overlong_run_is_found_wherever_it_sits():
    from openk2.tokenizer.tokenizer import _long_run_cuts

    for offset in (0, 1, 777, MAX_RUN_CHARS // 2 - 1, MAX_RUN_CHARS + 3):
        for run, edge in (("x" * (MAX_RUN_CHARS + 1), " "), (" \n\t" * (MAX_RUN_CHARS // 3 + 1), "z")):
            head = ("ab " * offset)[:offset] + edge
            assert _long_run_cuts(head + run + edge + "tail") == [len(head) + MAX_RUN_CHARS]
            assert _long_run_cuts(head + run[:MAX_RUN_CHARS] + edge + "tail") == []


def test_load_by_name(tmp_path):
    """The one name -> tokenizer mapping that `openk2 train`, `openk2 tokenizer` and RL configs use."""
    for name in ("byte-level", "byte", "bytes"):
        assert K2Tokenizer.load(name).vocab_size == K2Tokenizer.byte_level().vocab_size
    default = K2Tokenizer.load("default")
    assert default.vocab_size == K2Tokenizer.default().vocab_size
    default.save_pretrained(tmp_path / "tok")
    assert K2Tokenizer.load(str(tmp_path / "tok")).encode("MuonClip") == default.encode("MuonClip")
