"""MuonClip: Newton-Schulz, the RMS-matched update, weight decay, the parameter split, a real descent."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from openk2 import ModelConfig, Transformer
from openk2.optim import MuonClip, muon_update, newton_schulz, split_parameters
from openk2.optim.muon import muon_scale, muon_updates, newton_schulz_by_shape, resolve_ns_dtype


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_preset("tiny"))


@pytest.mark.parametrize("shape", [(32, 128), (128, 32), (8, 48, 16), (2, 3, 20, 24)])
def test_newton_schulz_singular_values_near_one(shape):
    torch.manual_seed(0)
    G = torch.randn(*shape)
    O = newton_schulz(G)
    assert O.shape == G.shape and O.dtype == G.dtype
    s = torch.linalg.svdvals(O)  # batched over leading dims
    assert s.min() > 0.6 and s.max() < 1.2, (s.min(), s.max())


def test_newton_schulz_keeps_singular_vectors():
    """NS changes singular values only: O = U f(S) V^T for G = U S V^T."""
    torch.manual_seed(1)
    U, _ = torch.linalg.qr(torch.randn(40, 40))
    V, _ = torch.linalg.qr(torch.randn(24, 24))
    S = torch.linspace(0.5, 3.0, 24)
    G = U[:, :24] @ torch.diag(S) @ V.T
    O = newton_schulz(G)
    core = U[:, :24].T @ O @ V  # should be diagonal
    off = core - torch.diag(torch.diagonal(core))
    assert off.abs().max() < 1e-4
    assert torch.diagonal(core).min() > 0.6


def test_newton_schulz_bf16_close_to_fp32():
    torch.manual_seed(2)
    G = torch.randn(4, 64, 96)
    ref = newton_schulz(G)
    low = newton_schulz(G.bfloat16())
    assert low.dtype == torch.bfloat16
    s = torch.linalg.svdvals(low.float())
    assert s.min() > 0.6 and s.max() < 1.25
    assert (low.float() - ref).norm() / ref.norm() < 0.05
    # computing in bf16 from an fp32 input returns fp32
    assert newton_schulz(G, dtype=torch.bfloat16).dtype == torch.float32


def test_newton_schulz_rejects_vectors_and_handles_zero():
    with pytest.raises(ValueError, match="matrix"):
        newton_schulz(torch.randn(5))
    assert torch.equal(newton_schulz(torch.zeros(3, 4)), torch.zeros(3, 4))


@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (16, 96, 32)])
def test_update_rms_matches_adamw(shape):
    """0.2 * sqrt(max(n, m)) scaling: a full-rank update has RMS ~0.2 whatever the shape."""
    torch.manual_seed(3)
    g = torch.randn(*shape)
    buf = torch.zeros_like(g)
    u = muon_update(g, buf, beta=0.95, nesterov=True)
    rms = u.pow(2).mean().sqrt().item()
    assert 0.15 < rms < 0.22, rms
    assert muon_scale(shape) == pytest.approx(0.2 * max(shape[-2:]) ** 0.5)
    # the momentum buffer was updated in place: M = 0.95 * 0 + g
    assert torch.equal(buf, g)


def test_muon_update_momentum_and_nesterov():
    torch.manual_seed(4)
    g1, g2 = torch.randn(8, 12), torch.randn(8, 12)
    buf = torch.zeros(8, 12)
    muon_update(g1, buf, beta=0.9)
    u = muon_update(g2, buf, beta=0.9, nesterov=True)
    m = 0.9 * g1 + g2
    assert torch.allclose(buf, m)
    assert torch.allclose(u, newton_schulz(g2 + 0.9 * m) * muon_scale((8, 12)), atol=1e-6)
    buf2 = g1.clone()
    u_plain = muon_update(g2, buf2, beta=0.9, nesterov=False)
    assert torch.allclose(u_plain, newton_schulz(m) * muon_scale((8, 12)), atol=1e-6)


def test_parameter_split():
    model = tiny_model()
    split = split_parameters(model)
    muon = {n for n, _ in split.muon}
    adamw = {n for n, _ in split.adamw}
    assert "embed_tokens.weight" in adamw and "lm_head.weight" in adamw
    assert "norm.weight" in adamw and "layers.0.input_layernorm.weight" in adamw
    assert "layers.1.self_attn.q_b_proj.weight" in muon
    assert "layers.1.self_attn.kv_b_proj.weight" in muon
    assert "layers.1.mlp.experts.gate_proj" in muon  # stacked (E, out, in): E matrices
    assert "layers.1.mlp.gate.weight" in muon  # the router is a matrix too (K2: all but embed/head)
    assert "layers.0.mlp.up_proj.weight" in muon
    assert all(p.ndim >= 2 for _, p in split.muon)
    names = {n for n, _ in model.named_parameters()}
    assert muon | adamw == names and not muon & adamw
    assert not any("e_score_correction_bias" in n for n in names)  # a buffer, not trained


def test_step_matches_the_formula():
    """One optimizer step on a Muon matrix is exactly W - lr (muon_update + wd W); the routing bias
    buffer is untouched by the optimizer."""
    model = tiny_model()
    opt = MuonClip(model, lr=0.02, weight_decay=0.1, qk_clip_tau=None, ns_dtype=None)
    ids = torch.randint(0, 512, (2, 16))
    logits = model(ids[:, :-1])
    F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
    p = model.layers["1"].mlp.experts.up_proj
    w0, g = p.detach().clone(), p.grad.clone()
    bias0 = model.layers["1"].mlp.gate.e_score_correction_bias.clone()
    expected = w0 - 0.02 * (muon_update(g, torch.zeros_like(g)) + 0.1 * w0)
    assert opt.step() == 0
    assert torch.allclose(p, expected, atol=1e-6)
    assert torch.equal(model.layers["1"].mlp.gate.e_score_correction_bias, bias0)


def test_weight_decay_is_decoupled():
    """With zero gradients the only change is W *= (1 - lr wd) for matrices; 1-D params stay."""
    model = tiny_model()
    opt = MuonClip(model, lr=0.1, weight_decay=0.5, qk_clip_tau=None)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        factor = 1 - 0.1 * 0.5 if p.ndim >= 2 else 1.0
        assert torch.allclose(p, before[n] * factor, atol=1e-7), n


def test_adamw_part_matches_torch():
    """Embeddings, head and norms follow torch's AdamW exactly."""
    torch.manual_seed(5)
    model = tiny_model()
    ref = tiny_model()
    opt = MuonClip(model, lr=1e-2, weight_decay=0.1, qk_clip_tau=None)
    emb = ref.embed_tokens.weight
    ref_opt = torch.optim.AdamW([emb], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for _ in range(3):
        g = torch.randn_like(emb)
        model.embed_tokens.weight.grad = g.clone()
        emb.grad = g.clone()
        opt.step()
        ref_opt.step()
    assert torch.allclose(model.embed_tokens.weight, emb, atol=1e-6)


def test_muonclip_trains_and_state_round_trips():
    model = tiny_model()
    opt = MuonClip(model, lr=0.02)
    torch.manual_seed(6)
    ids = torch.randint(0, 64, (4, 33))  # a small alphabet: learnable quickly
    losses = []
    for _ in range(15):
        opt.zero_grad()
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    clone = tiny_model()
    clone.load_state_dict(model.state_dict())
    opt2 = MuonClip(clone, lr=0.02)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as torch.save/load would
    for m, o in ((model, opt), (clone, opt2)):
        o.zero_grad()
        F.cross_entropy(m(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
        o.step()
    for (n, a), (_, b) in zip(model.named_parameters(), clone.named_parameters()):
        assert torch.equal(a, b), n


def test_bad_arguments():
    model = tiny_model()
    with pytest.raises(ValueError, match="learning rate"):
        MuonClip(model, lr=0)
    with pytest.raises(ValueError, match="momentum"):
        MuonClip(model, lr=1e-3, momentum=1.0)
    with pytest.raises(ValueError, match="qk_clip_tau"):
        MuonClip(model, lr=1e-3, qk_clip_tau=-1)


def test_newton_schulz_precision_follows_the_hardware():
    """ "auto" (the default) is bf16, as K2, where matmuls run natively in bf16, and float32 on a CPU
    without bf16 units, where an emulated bf16 matmul is many times slower than fp32."""
    native = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    assert resolve_ns_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if native else torch.float32)
    assert resolve_ns_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_ns_dtype("float32", torch.device("cpu")) == torch.float32
    assert resolve_ns_dtype(torch.bfloat16, torch.device("cpu")) == torch.bfloat16
    assert resolve_ns_dtype(None, torch.device("cpu")) is None
    model = Transformer(ModelConfig.from_preset("tiny"))
    assert MuonClip(model).ns_dtype == resolve_ns_dtype("auto", torch.device("cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_newton_schulz_by_shape_equals_one_matrix_at_a_time(dtype):
    """Stacking same-shaped matrices (and stacks) into one batched call gives each matrix's own
    result: mixed shapes, a tall one, an (E, out, in) stack, in the input order."""
    g = torch.Generator().manual_seed(0)
    shapes = [(16, 32), (8, 24, 16), (32, 16), (16, 32), (24, 16), (3, 16, 32)]
    mats = [torch.randn(s, generator=g) for s in shapes]
    batched = newton_schulz_by_shape(mats, dtype=dtype)
    tol = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=0, atol=2e-2)
    for m, b in zip(mats, batched):
        assert b.shape == m.shape and b.dtype == m.dtype
        torch.testing.assert_close(b, newton_schulz(m, dtype=dtype), **tol)
        if m.ndim == 3:  # a stack is its matrices one by one
            for i in range(m.shape[0]):
                torch.testing.assert_close(b[i], newton_schulz(m[i], dtype=dtype), **tol)


def test_muon_updates_equal_per_matrix_muon_update():
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(s, generator=g) for s in [(16, 32), (4, 16, 32), (32, 16), (16, 32)]]
    bufs = [torch.randn_like(x) for x in grads]
    bufs_one = [b.clone() for b in bufs]
    many = muon_updates(grads, bufs, beta=0.9, ns_dtype=torch.float32)
    for x, m, b, b1 in zip(grads, many, bufs, bufs_one):
        torch.testing.assert_close(m, muon_update(x, b1, beta=0.9, ns_dtype=torch.float32), rtol=0, atol=1e-5)
        torch.testing.assert_close(b, b1)  # the same momentum update, in place
