"""`openk2 plan`: the 1T layout report, and its activation model checked against what autograd saves."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from openk2.config import ModelConfig
from openk2.distributed.plan import Layout, Plan, activation_elements, measure_activation_bytes
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
    assert "MFU, overlapped" in out and "assumptions:" in out


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
    assert 0 < t["MFU, exposed"] < t["MFU, overlapped"] < plan.matmul_efficiency


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
