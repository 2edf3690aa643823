"""Mixed precision in training: which precision `--precision auto` resolves to on which hardware,
and that bf16 autocast training follows fp32 training's loss curve (the `tiny` model on Shakespeare;
`benchmarks/precision_curves.py` does the same over the whole `openk2 train` job)."""

from __future__ import annotations

import torch

from openk2 import ModelConfig, Transformer
from openk2.distributed import device
from openk2.distributed.device import autocast_context, bf16_emulated, cpu_has_bf16, resolve_precision
from openk2.train.data import PackedLoader, split_tokens, tokenize_corpus
from openk2.train.loop import TrainConfig, Trainer, build_optimizer, make_schedule, tokenizer_by_name

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
AVX2 = {"fpu", "sse2", "avx", "avx2", "fma"}
ZEN4 = AVX2 | {"avx512f", "avx512bw", "avx512_bf16"}  # AVX512-BF16, no AMX (this project's EPYC)
SAPPHIRE_RAPIDS = AVX2 | {"avx512f", "amx_tile", "amx_bf16", "amx_int8"}


def test_auto_is_bf16_only_where_the_hardware_multiplies_bf16():
    assert not cpu_has_bf16(AVX2) and cpu_has_bf16(ZEN4) and cpu_has_bf16(SAPPHIRE_RAPIDS)
    assert resolve_precision(CPU, "auto", AVX2) == "fp32"
    assert resolve_precision(CPU, "auto", ZEN4) == "bf16"
    assert resolve_precision(CPU, "auto", SAPPHIRE_RAPIDS) == "bf16"
    assert resolve_precision(CUDA, "auto", AVX2) == "bf16"
    assert resolve_precision(torch.device("mps"), "auto", ZEN4) == "fp32"
    for flags in (AVX2, ZEN4):  # an explicit choice is taken as given
        assert resolve_precision(CPU, "fp32", flags) == "fp32"
        assert resolve_precision(CPU, "bf16", flags) == "bf16"
    # bf16 asked for where it is emulated is allowed but flagged (the trainer prints a warning)
    assert bf16_emulated(CPU, "bf16", AVX2) and not bf16_emulated(CPU, "bf16", ZEN4)
    assert not bf16_emulated(CPU, "auto", AVX2) and not bf16_emulated(CUDA, "bf16", AVX2)


def test_autocast_follows_the_resolution_on_this_machine(monkeypatch):
    for native in (False, True):
        monkeypatch.setattr(device, "_this_cpu_has_bf16", lambda native=native: native)
        with autocast_context(CPU, "auto"):
            assert torch.is_autocast_enabled("cpu") == native
            assert torch.get_autocast_dtype("cpu") == torch.bfloat16 or not native


def _train(precision: str, steps: int) -> tuple[list[float], float]:
    cfg = TrainConfig(preset="tiny", steps=steps, warmup_steps=5, batch_size=8, seq_len=64, lr=1e-2,
                      precision=precision, ns_dtype="float32", progress=False)  # fmt: skip
    tok = tokenizer_by_name("byte-level", 512)
    train, val = split_tokens(tokenize_corpus("shakespeare", tok, max_chars=200_000), 0.05, cfg.seq_len)
    loader = PackedLoader(train, cfg.batch_size, cfg.seq_len, seed=0)
    evals = PackedLoader(val, cfg.batch_size, cfg.seq_len, shuffle=False).batches(4)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny"))
    trainer = Trainer(model, build_optimizer(model, cfg), make_schedule(cfg), cfg, CPU)
    losses = [trainer.train_step(loader.batches(1))["loss"] for _ in range(steps)]
    return losses, trainer.evaluate(evals)


def test_bf16_training_tracks_fp32_on_tiny():
    """Same seed, data and fp32 Newton-Schulz; only the forward/backward precision differs. The
    tolerance: every step's loss within 2% of fp32's, the final eval loss within 1%."""
    steps = 40
    fp32, eval32 = _train("fp32", steps)
    bf16, eval16 = _train("bf16", steps)
    assert fp32[-1] < fp32[0] - 1.0  # it really learns (byte-level: 6.2 nats down to ~3)
    gaps = [abs(a - b) / a for a, b in zip(bf16, fp32)]
    assert max(gaps) < 0.02, f"worst step gap {max(gaps):.3%}"
    assert abs(eval16 - eval32) / eval32 < 0.01, (eval16, eval32)
    assert bf16 != fp32  # really a different precision


def test_onednn_fp32_linear_equals_f_linear(monkeypatch):
    """`OPENK2_FP32_MATMUL=onednn` routes the model's fp32 CPU matmuls (forward and both gradients)
    through oneDNN: the same loss and gradients as torch's default (MKL) to float32 rounding."""
    from openk2.model import layers

    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny"))
    ids = torch.randint(0, 512, (2, 17))
    results = {}
    for mode in ("mkl", "onednn"):
        monkeypatch.setattr(layers, "FP32_MATMUL", mode)
        model.zero_grad(set_to_none=True)
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        results[mode] = (loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None])
    (l0, g0), (l1, g1) = results["mkl"], results["onednn"]
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    assert len(g0) == len(g1)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    x = torch.randn(3, 5, 8, requires_grad=True)  # with a bias, batched rows
    lin = layers.Linear(8, 4)
    monkeypatch.setattr(layers, "FP32_MATMUL", "onednn")
    y = lin(x)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-6)
    y.sum().backward()
    torch.testing.assert_close(lin.bias.grad, torch.full((4,), 15.0))
