"""Corpora at scale: text, JSONL and Parquet tokenised into memory-mapped shards must give exactly the
ids of in-memory tokenisation; the streaming loader resumes at the exact token and splits batches
across data-parallel ranks without overlap."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from openk2.tokenizer import K2Tokenizer
from openk2.train.shards import (
    CorpusError,
    StreamingLoader,
    TokenShards,
    build_shards,
    iter_documents,
    tokenizer_fingerprint,
)

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

DOCS = [
    "To be, or not to be, that is the question:",
    "def f(x):\n    return x * 2  # code too\n",
    "Ünïcödé and emoji 🙂 survive the round trip.",
    "Whether 'tis nobler in the mind to suffer " * 20,
    "short",
]


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "a.txt").write_text(DOCS[0])
    with open(root / "b.jsonl", "w") as f:
        for doc in DOCS[1:3]:
            f.write(json.dumps({"text": doc, "meta": 1}) + "\n")
    pq.write_table(pa.table({"text": DOCS[3:], "id": [3, 4]}), root / "c.parquet")
    return root


def in_memory(tokenizer, docs):
    return np.concatenate([np.asarray(tokenizer.encode(d) + [tokenizer.eos_id]) for d in docs])


def test_shards_equal_in_memory_tokenisation(corpus, tmp_path):
    tok = K2Tokenizer.byte_level()
    docs = list(iter_documents(corpus))
    assert docs == DOCS  # text, then JSONL lines, then Parquet rows, in path order
    out = build_shards(corpus, tok, tmp_path / "shards", shard_tokens=97)  # many shard boundaries
    shards = TokenShards(out, tok)
    expected = in_memory(tok, DOCS)
    assert len(shards) == len(expected) and len(shards.shards) > 3
    assert np.array_equal(shards.read(0, len(shards)), expected)
    assert np.array_equal(shards.read(90, 20), expected[90:110])  # across a boundary
    meta = json.loads((out / "index.json").read_text())
    assert meta["tokenizer_fingerprint"] == tokenizer_fingerprint(tok) and meta["documents"] == 5


def test_shards_are_reused_and_rebuilt_when_the_corpus_changes(corpus, tmp_path):
    tok = K2Tokenizer.byte_level()
    out = build_shards(corpus, tok, tmp_path / "shards", shard_tokens=97)
    stamp = os.stat(out / "shard-00000.bin").st_mtime_ns
    build_shards(corpus, tok, tmp_path / "shards", shard_tokens=97)
    assert os.stat(out / "shard-00000.bin").st_mtime_ns == stamp  # cached
    (corpus / "a.txt").write_text("changed text, longer than before")
    build_shards(corpus, tok, tmp_path / "shards", shard_tokens=97)
    assert TokenShards(out).read(0, 7).tolist() == list(b"changed")


def test_another_tokenizer_is_refused(corpus, tmp_path):
    out = build_shards(corpus, K2Tokenizer.byte_level(), tmp_path / "shards")
    with pytest.raises(CorpusError, match="another tokenizer"):
        TokenShards(out, K2Tokenizer.default())


def test_bad_sources_are_clear_errors(tmp_path):
    tok = K2Tokenizer.byte_level()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(CorpusError, match=r"bad.jsonl:2: invalid JSON"):
        build_shards(bad, tok, tmp_path / "s1")
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"content": "x"}\n')
    with pytest.raises(CorpusError, match="no string field 'text'"):
        build_shards(nofield, tok, tmp_path / "s2")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(CorpusError, match="no column 'text'"):
        build_shards(tmp_path / "p.parquet", tok, tmp_path / "s3")
    with pytest.raises(CorpusError, match="no such file"):
        build_shards(tmp_path / "missing", tok, tmp_path / "s4")
    out = build_shards(tmp_path / "p.parquet", tok, tmp_path / "s5", text_field="body")
    (out / "shard-00000.bin").write_bytes(b"")
    with pytest.raises(CorpusError, match="truncated"):
        TokenShards(out)


def test_streaming_loader_resumes_at_the_exact_token(corpus, tmp_path):
    tok = K2Tokenizer.byte_level()
    shards = TokenShards(build_shards(corpus, tok, tmp_path / "shards", shard_tokens=64), tok)
    expected = in_memory(tok, DOCS)
    a = StreamingLoader(shards, batch_size=4, seq_len=16, eos_id=tok.eos_id)
    first = a.next_batch()
    assert torch.equal(first.input_ids[1], torch.from_numpy(expected[16:32]))
    assert torch.equal(first.targets[1], torch.from_numpy(expected[17:33]))
    run = [a.next_batch() for _ in range(20)]  # 20 x 64 tokens: wraps around the ~1,000-token corpus
    b = StreamingLoader(shards, batch_size=4, seq_len=16, eos_id=tok.eos_id)
    b.next_batch()
    state = b.state_dict()
    c = StreamingLoader(shards, batch_size=4, seq_len=16, eos_id=tok.eos_id)
    c.load_state_dict(state)
    for want in run:
        got = c.next_batch()
        assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.segment_ids, want.segment_ids)
    assert c.epoch >= 1


def test_data_parallel_ranks_split_each_global_batch(corpus, tmp_path):
    tok = K2Tokenizer.byte_level()
    shards = TokenShards(build_shards(corpus, tok, tmp_path / "shards"), tok)
    whole = StreamingLoader(shards, batch_size=4, seq_len=8)
    ranks = [StreamingLoader(shards, batch_size=4, seq_len=8, rank=r, world=2) for r in range(2)]
    for _ in range(3):
        joined = torch.cat([r.next_batch().input_ids for r in ranks])
        assert torch.equal(joined, whole.next_batch().input_ids)
    with pytest.raises(ValueError, match="not divisible"):
        StreamingLoader(shards, batch_size=3, seq_len=8, world=2)


def test_each_rank_sees_an_uninterrupted_runs_tokens_across_a_save_and_resume(corpus, tmp_path):
    """The torchrun driver's use (`StreamingLoader.shard_` per batch rank): 2 ranks stop after 3
    steps and save their (common, global) position; resumed under 2 ranks, and under 4, each rank
    reads exactly its rows of the global batches an uninterrupted run reads, through a wrap-around."""
    tok = K2Tokenizer.byte_level()
    shards = TokenShards(build_shards(corpus, tok, tmp_path / "shards", shard_tokens=50), tok)
    whole = StreamingLoader(shards, batch_size=4, seq_len=16)
    steps = [whole.next_batch() for _ in range(20)]  # wraps around the ~1,000-token corpus

    def rank_loaders(world: int, state: dict | None) -> list[StreamingLoader]:
        loaders = []
        for r in range(world):
            loader = StreamingLoader(shards, batch_size=4, seq_len=16)
            if state is not None:
                loader.load_state_dict(state)
            loaders.append(loader.shard_(r, world))
        return loaders

    first = rank_loaders(2, None)
    for want in steps[:3]:
        got = [loader.next_batch() for loader in first]
        assert all(b.input_ids.shape == (2, 16) for b in got)  # each rank read only its 2 rows
        assert torch.equal(torch.cat([b.targets for b in got]), want.targets)
    states = [loader.state_dict() for loader in first]
    assert states[0] == states[1]  # one position for the checkpoint, whoever writes it
    for world in (2, 4):
        resumed = rank_loaders(world, states[0])
        for want in steps[3:]:
            rows = torch.cat([loader.next_batch().input_ids for loader in resumed])
            assert torch.equal(rows, want.input_ids)
    with pytest.raises(ValueError, match="cannot be split"):
        StreamingLoader(shards, batch_size=4, seq_len=16).shard_(0, 3)
