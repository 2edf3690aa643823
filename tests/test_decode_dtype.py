"""bf16 serving: the engine decodes with bf16 weights and cache and stays close to fp32 on the serving
path itself (teacher-forced logits and argmax, free-running greedy); `openk2 serve --dtype bfloat16`
loads a checkpoint that way. benchmarks/bench_decode_floor.py reports the same comparison on `small`
over more prompts and tokens, for the compiled bf16 step too (not a test: inductor takes ~10x longer
to compile the bf16 step than the fp32 one, over 13 minutes on the loaded 2-core machine)."""

from __future__ import annotations

import torch
from serve_util import tiny_model

from openk2.checkpoint import save_model
from openk2.serve.cli import load_engine
from openk2.serve.engine import Engine
from openk2.serve.precision import compare_precision, forced_logits
from openk2.serve.sampling import SamplingParams
from openk2.tokenizer.tokenizer import K2Tokenizer

TEXTS = ["hello world", "a", "The quick brown fox", "bf16 decode agrees"]


def engines() -> tuple[Engine, Engine]:
    tok = K2Tokenizer.byte_level()
    fp32 = Engine(tiny_model(0, 256), tok, max_batch=4, max_seq_len=256)
    bf16 = Engine(tiny_model(0, 256).to(torch.bfloat16), tok, max_batch=4, max_seq_len=256)
    return fp32, bf16


def check_close(report) -> None:
    assert report.teacher_forced_agreement >= 0.9, report.summary()
    assert report.mean_logit_error < 0.05 * report.logit_std, report.summary()
    assert report.max_logit_error < 0.5 * report.logit_std, report.summary()
    assert report.greedy_prefix_agreement >= 0.5, report.summary()


def test_bf16_decode_agrees_with_fp32():
    fp32, bf16 = engines()
    assert bf16.cache.kv.dtype == bf16.prefix_cache.pool.dtype == torch.bfloat16
    tok = fp32.tokenizer
    report = compare_precision(fp32, bf16, [tok.encode(t) for t in TEXTS], 8)
    check_close(report)
    assert report.mean_logit_error > 0  # really a different precision


def test_forced_logits_are_the_engines_greedy_logits():
    """The comparison's own tool: teacher-forcing an engine with its greedy tokens reproduces them."""
    fp32, _ = engines()
    ps = [fp32.tokenizer.encode(t) for t in TEXTS]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    greedy = [o.completions[0].token_ids for o in fp32.generate(ps, params)]
    logits = forced_logits(fp32, ps, greedy)
    assert logits.shape == (4, 6, fp32.vocab_size) and logits.dtype == torch.float32
    assert logits.argmax(-1).tolist() == greedy


def test_serve_dtype_loads_bf16(tmp_path):
    path = tmp_path / "tiny"
    save_model(tiny_model(max_positions=160), path)
    K2Tokenizer.byte_level().save_pretrained(path)
    engine = load_engine(str(path), 2, None, "bfloat16", prefix_cache_tokens=64)
    assert engine.dtype == engine.cache.kv.dtype == engine.prefix_cache.pool.dtype == torch.bfloat16
    assert engine.stats()["prefix_cache_tokens"] == 64
    assert load_engine(str(path), 2, None, None, prefix_cache_tokens=0).prefix_cache is None
    assert all(p.dtype == torch.bfloat16 for p in engine.model.parameters())
    out = engine.generate([engine.tokenizer.encode("hi")], SamplingParams(max_tokens=4, temperature=0))[0]
    assert 1 <= len(out.completions[0].token_ids) <= 4
