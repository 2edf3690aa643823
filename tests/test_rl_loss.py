"""The K1.5 policy loss against hand-computed values, its gradient and minimiser, the PTX / SFT
masked loss, sequence log-probs, and the temperature schedule."""

import math

import pytest
import torch

from openk2.config import ModelConfig
from openk2.model.transformer import Transformer
from openk2.rl.loss import (
    k15_loss,
    masked_lm_loss,
    masked_sequence_logprobs,
    pack_sequences,
    sequence_logprobs,
    token_logprobs,
)
from openk2.rl.schedules import TemperatureSchedule


def test_k15_loss_matches_hand_computed_value():
    # group 0 (K=2): r = [1, 0], mean 0.5, log-ratios [0.5, 0], tau 0.5
    #   residuals: 0.5 - 0.25 = 0.25, -0.5 - 0 = -0.5  -> (0.0625 + 0.25) / 2 = 0.15625
    # group 1 (K=3): r = [1, 1, 0], mean 2/3, log-ratios [0, -1, 1]
    #   residuals: 1/3, 1/3 + 0.5 = 5/6, -2/3 - 0.5 = -7/6 -> (1/9 + 25/36 + 49/36) / 3 = 26/36
    logp = torch.tensor([-1.0, -2.0, -3.0, -3.0, -3.0])
    logp_old = torch.tensor([-1.5, -2.0, -3.0, -2.0, -4.0])
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    group = torch.tensor([0, 0, 1, 1, 1])
    expected = (0.15625 + 26 / 36) / 2
    assert k15_loss(logp, logp_old, rewards, group, tau=0.5).item() == pytest.approx(expected, abs=1e-6)
    # the group ids may come in any order
    perm = torch.tensor([4, 0, 2, 1, 3])
    got = k15_loss(logp[perm], logp_old[perm], rewards[perm], group[perm], tau=0.5)
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_k15_gradient_on_policy_is_a_baselined_policy_gradient():
    """At pi_theta = pi_old, dL/dlogp_i = -2 tau / (K G) * (r_i - mean r)."""
    tau = 0.3
    logp_old = torch.tensor([-2.0, -1.0, -4.0, -0.5])
    logp = logp_old.clone().requires_grad_(True)
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5])
    group = torch.tensor([0, 0, 1, 1])
    k15_loss(logp, logp_old, rewards, group, tau).backward()
    advantage = torch.tensor([0.5, -0.5, 0.0, 0.0])
    torch.testing.assert_close(logp.grad, -2 * tau / (2 * 2) * advantage)


def test_k15_minimiser_is_the_kl_regularised_solution():
    """Minimising over log pi gives tau * log(pi / pi_old) = r - mean r, where the loss is 0."""
    tau = 0.25
    logp_old = torch.tensor([-1.0, -3.0, -2.0])
    rewards = torch.tensor([1.0, 0.0, 0.0])
    group = torch.zeros(3, dtype=torch.long)
    logp = logp_old.clone().requires_grad_(True)
    opt = torch.optim.SGD([logp], lr=2.0)
    for _ in range(500):
        opt.zero_grad()
        k15_loss(logp, logp_old, rewards, group, tau).backward()
        opt.step()
    torch.testing.assert_close(tau * (logp.detach() - logp_old), rewards - rewards.mean(), atol=1e-4, rtol=0)


def test_k15_loss_rejects_bad_input():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="1-D of one length"):
        k15_loss(x, torch.zeros(2), x, torch.zeros(3, dtype=torch.long), 0.1)
    with pytest.raises(ValueError, match="tau must be positive"):
        k15_loss(x, x, x, torch.zeros(3, dtype=torch.long), 0.0)
    with pytest.raises(ValueError, match="no gaps"):
        k15_loss(x, x, x, torch.tensor([0, 2, 2]), 0.1)


def _tiny():
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset("tiny")).eval()


def test_sequence_logprobs_sum_only_response_tokens():
    model = _tiny()
    prompts, responses = [[1, 2, 3], [4, 5]], [[6, 7], [8, 9, 10, 11]]
    batch = pack_sequences(prompts, responses)
    got = sequence_logprobs(model, batch)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids = torch.tensor([p + r])
        lp = token_logprobs(model(ids)[:, :-1], ids[:, 1:])[0]
        torch.testing.assert_close(got[i], lp[len(p) - 1 :].sum(), atol=1e-5, rtol=0)


def test_loss_masks_keep_context_tokens_out_of_the_sequence_logprobs():
    """A multi-turn response: sampled tokens (mask 1) and appended tool output (mask 0). The sequence
    log-prob sums the sampled ones only, and a context token's value changes nothing but the context."""
    model = _tiny()
    prompt, response, mask = [1, 2, 3], [6, 7, 40, 41, 42, 8, 9], [1, 1, 0, 0, 0, 1, 1]
    batch = pack_sequences([prompt, [4, 5]], [response, [8]], loss_masks=[mask, [1]])
    assert batch["response_mask"][0].tolist() == [0, 0, 0, *mask] and batch["response_mask"][1].tolist()[
        :3
    ] == [0, 0, 1]
    got = sequence_logprobs(model, batch)
    ids = torch.tensor([prompt + response])
    lp = token_logprobs(model(ids)[:, :-1], ids[:, 1:])[0]
    keep = [len(prompt) - 1 + i for i, m in enumerate(mask) if m]
    torch.testing.assert_close(got[0], lp[keep].sum(), atol=1e-5, rtol=0)
    logits = model(batch["input_ids"])
    torch.testing.assert_close(
        masked_sequence_logprobs(logits, batch["input_ids"], batch["response_mask"]), got
    )
    with pytest.raises(ValueError, match="one 0/1 per response token"):
        pack_sequences([prompt], [response], loss_masks=[mask[:-1]])
    with pytest.raises(ValueError, match="one 0/1 per response token"):
        pack_sequences([prompt], [response], loss_masks=[])


def test_masked_lm_loss_counts_only_masked_targets():
    model = _tiny()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 0]], dtype=torch.bool)
    logits = model(ids)
    loss = masked_lm_loss(logits, ids, mask)
    lp = token_logprobs(logits[:, :-1], ids[:, 1:])[0]
    assert loss.item() == pytest.approx(-(lp[2] + lp[3]).item() / 2, abs=1e-5)
    changed = ids.clone()
    changed[0, 5] = 99  # an unmasked target: the loss must not move
    assert masked_lm_loss(model(changed), changed, mask).item() == pytest.approx(loss.item(), abs=1e-6)
    with pytest.raises(ValueError, match="no target tokens"):
        masked_lm_loss(logits, ids, torch.zeros_like(mask))


def test_temperature_schedule():
    for kind in ("linear", "cosine", "exponential"):
        s = TemperatureSchedule(1.2, 0.6, steps=10, kind=kind)
        values = [s(i) for i in range(-2, 15)]
        assert s(0) == pytest.approx(1.2) and s(10) == pytest.approx(0.6) and s(14) == pytest.approx(0.6)
        assert all(a >= b - 1e-12 for a, b in zip(values, values[1:])), kind
    assert TemperatureSchedule(1.0, 0.5, 4, "linear")(2) == pytest.approx(0.75)
    assert TemperatureSchedule(1.0, 0.5, 4, "cosine")(2) == pytest.approx(0.75)
    assert TemperatureSchedule(1.0, 0.25, 4, "exponential")(2) == pytest.approx(0.5)
    assert TemperatureSchedule(1.0, 0.5, 4, "cosine")(1) == pytest.approx(
        0.5 + 0.25 * (1 + math.cos(math.pi / 4))
    )
    with pytest.raises(ValueError, match="kind"):
        TemperatureSchedule(kind="step")
    with pytest.raises(ValueError, match="temperatures"):
        TemperatureSchedule(start=0.0)
    with pytest.raises(ValueError, match="steps"):
        TemperatureSchedule(steps=0)
