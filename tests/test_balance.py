"""Aux-loss-free balancing: the bias moves by a fixed step toward balance and actually balances load."""

from __future__ import annotations

import pytest
import torch

from openk2 import ModelConfig, Transformer
from openk2.optim import load_imbalance, update_routing_bias_


def test_bias_moves_toward_balance():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny"))
    e = model.config.n_routed_experts
    counts = {1: torch.tensor([10, 0, 5, 5, 5, 5, 5, 5]), 2: torch.full((e,), 5)}
    update_routing_bias_(model, counts, rate=0.01)
    b1 = model.layers["1"].mlp.gate.e_score_correction_bias
    assert b1[0] == pytest.approx(-0.01) and b1[1] == pytest.approx(0.01)
    assert torch.all(b1[2:] == 0)  # exactly at the mean: no move
    assert torch.all(model.layers["2"].mlp.gate.e_score_correction_bias == 0)
    assert load_imbalance(counts) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        update_routing_bias_(model, counts, rate=-1)


def test_bias_updates_balance_a_skewed_router():
    """A router whose weights favour two experts becomes balanced by bias updates alone."""
    cfg = ModelConfig.from_preset("tiny")
    cfg.num_hidden_layers, cfg.first_k_dense_replace, cfg.n_group = 2, 1, 1
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        model.layers["1"].mlp.gate.weight[:2] += 0.5  # experts 0 and 1 win for most tokens
    ids = torch.randint(0, cfg.vocab_size, (8, 64))
    with torch.no_grad():
        model(ids)
        start = load_imbalance(model.expert_counts())
        for _ in range(300):
            model(ids)
            update_routing_bias_(model, rate=2e-3)
        end = load_imbalance(model.expert_counts())
    assert start > 1.9 and end < 1.3, (start, end)


def test_sequence_aux_loss_is_differentiable():
    cfg = ModelConfig.from_preset("tiny")
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    model.record_stats(True)
    model(torch.randint(0, cfg.vocab_size, (2, 16)))
    aux = model.aux_loss()
    assert aux.item() > 0
    aux.backward()
    assert model.layers["1"].mlp.gate.weight.grad.abs().sum() > 0
