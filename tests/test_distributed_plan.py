"""`openk2 plan`: the 1T layout report, and its activation model checked against what autograd saves."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from openk2.config import ModelConfig
from openk2.distributed.plan import Efficiency, Layout, Plan, activation_elements, measure_activation_bytes
from openk2.model.transformer import Transformer


def test_plan_kimi_k2_1t_layout():
    cmd = [sys.executable, "-m", "openk2.cli", "plan", "--preset", "kimi-k2", "--nodes", "64"]
    cmd += ["--gpus-per-node", "8", "--gpu", "h800", "--pp", "16", "--ep", "16"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert "pp=16 (x2 virtual) ep=16 dp=2" in out
    lines = {line.split("  ")[1].strip(): line for line in out.splitlines() if "activations," in line}
    # Without K2's memory savings the layout does not fit an 80 GB H800; with all of them it does.
    assert "does NOT fit in 80 GB" in lines["activations, none"]
    assert "fits in 80 GB" in lines["activations, recompute + fp8 + offload"]
    assert "what each cost contributes" in out and "assumptions:" in out
    for cost in ("pipeline point-to-point", "activation offload (PCIe)", "optimizer", "stage imbalance"):
        assert cost in out


def test_plan_numbers_are_consistent():
    c = ModelConfig.from_preset("kimi-k2")
    plan = Plan(c, Layout().validate(c))
    sp = plan.stage_params()
    # 1T parameters over 16 stages and 16 expert shards: a few billion per GPU.
    assert 3e9 < sp["replicated"] + sp["expert"] < 1e10
    mem = plan.memory()
    acts = [mem[k] for k in mem if k.startswith("activations")]
    assert acts == sorted(acts, reverse=True)  # each saving saves
    t = plan.step_time()
    assert 0 < t["MFU, exposed"] < t["MFU, overlapped"] < plan.efficiency.matmul
    costs = plan.costs()
    assert all(v >= 0 for v in costs.values())
    # K2 at PP16 (2 virtual stages): each token's hidden state and gradient cross 2 chunk boundaries per
    # GPU, ~120 GB of point-to-point traffic; offload moves ~2 TB of activations each way.
    tokens = plan.layout.global_batch_tokens / plan.layout.dp_ep
    p2p_gb = tokens * c.hidden_size * 2 * 2 * 2 / 1e9
    assert 100 < p2p_gb < 140
    offload_tb = costs["activation offload (PCIe)"] * 64e9 * plan.efficiency.offload / 1e12
    assert 1.5 < offload_tb < 2.5


def test_planner_calibration_deepseek_v3():
    """DeepSeek-V3's published pre-training: 2048 H800 (256 nodes), PP16, EP64, FP8 GEMMs, AdamW,
    4096-token sequences, a 15,360-sequence batch, 14.8T tokens in 2.664M GPU-hours: 180K GPU-hours
    per trillion tokens. The planner's default efficiencies must predict it within 15%."""
    c = ModelConfig.from_preset("deepseek-v3")
    lay = Layout(nodes=256, gpus_per_node=8, pp=16, ep=64, seq_len=4096, global_batch_tokens=15360 * 4096)
    plan = Plan(c, lay.validate(c), "h800", matmul_dtype="fp8", optimizer="adamw", offload=False)
    predicted = plan.step_time()["GPU-hours per trillion tokens"]
    assert abs(predicted / 180_000 - 1) < 0.15, predicted
    # Every modelled cost is present and the series sum is slower than the overlapped step.
    t = plan.step_time()
    assert t["step, exposed (s)"] > t["step, overlapped (s)"] > 0


def test_planner_efficiencies_are_inputs():
    c = ModelConfig.from_preset("kimi-k2")
    base = Plan(c, Layout().validate(c))
    slower = Plan(c, Layout().validate(c), efficiency=Efficiency(matmul=base.efficiency.matmul / 2))
    assert slower.costs()["matmuls"] == pytest.approx(2 * base.costs()["matmuls"])
    assert slower.step_time()["step, overlapped (s)"] > base.step_time()["step, overlapped (s)"]


def test_bad_layout_is_a_clear_error():
    c = ModelConfig.from_preset("kimi-k2")
    with pytest.raises(ValueError, match="does not divide n_routed_experts"):
        Layout(nodes=10, pp=16, ep=5).validate(c)
    with pytest.raises(ValueError, match="cannot be split"):
        Layout(nodes=3, gpus_per_node=1, pp=2).validate(c)


@pytest.mark.parametrize("preset,seq", [("tiny", 64), ("small", 128)])
def test_activation_model_matches_measured(preset, seq):
    """The per-token activation model against the bytes autograd really saves in a forward of the
    decoder layers (fp32 on CPU; CPU SDPA is a fused kernel, like flash attention on GPU). The model
    leaves out small index tensors and kernel internals: it must be within 25% of the measurement."""
    c = ModelConfig.from_preset(preset)
    torch.manual_seed(0)
    model = Transformer(c)
    model.embed_tokens = model.norm = model.lm_head = None
    x = torch.randn(2, seq, c.hidden_size, requires_grad=True)
    measured = measure_activation_bytes(model, x, list(model.parameters()))
    per_token = sum(
        sum(activation_elements(c, seq, c.is_moe_layer(i)).values()) for i in range(c.num_hidden_layers)
    )
    estimated = per_token * 4 * x.shape[0] * seq
    assert 0.75 < estimated / measured < 1.25, (estimated, measured)


def test_efficiencies_out_of_range_are_one_line_errors():
    for kw, text in (
        (dict(matmul=0.0), "--eff-matmul"),
        (dict(offload=1.5), "--eff-offload"),
        (dict(memory=float("nan")), "--eff-memory"),
        (dict(expert_imbalance=0.5), "--eff-expert-imbalance"),
    ):
        with pytest.raises(ValueError, match=text):
            Efficiency(**kw)
    cmd = [sys.executable, "-m", "openk2", "plan", "--eff-matmul", "0"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--eff-matmul" in r.stderr
