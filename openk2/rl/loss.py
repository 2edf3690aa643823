"""The Kimi K1.5 policy loss (used unchanged by K2), the PTX loss and the log-prob helpers they share.

For a prompt x with K samples y_i drawn from the rollout policy pi_old and rewards r_i:

    L(x) = 1/K * sum_i ( r_i - mean_j r_j - tau * log(pi_theta(y_i|x) / pi_old(y_i|x)) )^2

It is a squared regression of the log-ratio onto the group-relative advantage: at the minimum
tau * log(pi_theta / pi_old) = r_i - mean r, i.e. the closed-form solution of reward maximisation
with a KL(pi_theta || pi_old) penalty of strength tau. Its gradient at pi_theta = pi_old is
-2 tau / K * sum_i (r_i - mean r) grad log pi_theta(y_i|x), a policy gradient with a group-mean
baseline; as pi_theta moves away from pi_old over several updates on the same rollouts, the squared
term pulls it back (a trust region without clipping). Log-probs are sums over the tokens the policy
sampled: in a multi-turn episode the tool outputs and user turns are context, not actions, and are
masked out (`pack_sequences(..., loss_masks=...)`).
"""

from __future__ import annotations

import torch

from openk2.train.loop import causal_lm_loss


def k15_loss(
    logp: torch.Tensor, logp_old: torch.Tensor, rewards: torch.Tensor, group: torch.Tensor, tau: float
) -> torch.Tensor:
    """Mean over prompts of the K1.5 loss.

    logp, logp_old, rewards: (N,) per sample (sequence log-probs are sums over the sampled tokens);
    group: (N,) long, the prompt each sample belongs to (ids 0..G-1, any order, groups may differ in
    size). Groups of one sample have advantage 0 and only the drift term remains.
    """
    if not (logp.shape == logp_old.shape == rewards.shape == group.shape) or logp.ndim != 1:
        raise ValueError(
            f"logp, logp_old, rewards and group must be 1-D of one length, got {tuple(logp.shape)}, "
            f"{tuple(logp_old.shape)}, {tuple(rewards.shape)}, {tuple(group.shape)}"
        )
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    n_groups = int(group.max()) + 1
    size = torch.zeros(n_groups, dtype=rewards.dtype).index_add_(0, group, torch.ones_like(rewards))
    if bool((size == 0).any()):
        raise ValueError("group ids must be 0..G-1 with no gaps")
    mean = torch.zeros(n_groups, dtype=rewards.dtype).index_add_(0, group, rewards) / size
    advantage = rewards - mean[group]
    residual = advantage.detach() - tau * (logp - logp_old.detach())
    per_group = torch.zeros(n_groups, dtype=residual.dtype).index_add_(0, group, residual.square()) / size
    return per_group.mean()


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target_t | ...) for logits (B, T, V) and targets (B, T) -> (B, T), in float32."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def sequence_logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the log-probs of the tokens in the loss (the sampled ones) per sequence; batch from
    `pack_sequences`."""
    return masked_sequence_logprobs(model(batch["input_ids"]), batch["input_ids"], batch["response_mask"])


def masked_sequence_logprobs(
    logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """sum_t mask[t] * log p(input_ids[t] | input_ids[:t]) per sequence, from logits (B, T, V): the
    logits at t - 1 predict token t, so a token outside the mask sends no gradient to any logit."""
    lp = token_logprobs(logits[:, :-1], input_ids[:, 1:])
    return (lp * mask[:, 1:]).sum(-1)


def masked_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy averaged over the tokens where mask (B, T) is true (the PTX / SFT loss:
    only assistant tokens are targets)."""
    target_mask = mask[:, 1:].bool()
    if not bool(target_mask.any()):
        raise ValueError("masked_lm_loss: the mask selects no target tokens")
    return causal_lm_loss(logits[:, :-1], input_ids[:, 1:], target_mask)


def pack_sequences(
    prompts: list[list[int]],
    responses: list[list[int]],
    pad_id: int = 0,
    loss_masks: list[list[int]] | None = None,
) -> dict:
    """Right-padded (prompt + response) ids and a mask of the positions in the loss: every response
    token, or where `loss_masks` (one per response, 1 = in the loss) says so, which is how the tool
    outputs and user turns of a multi-turn episode stay in the context but out of the log-probs.
    Right padding keeps every real token's position and causal context unchanged, so no attention
    mask is needed."""
    if len(prompts) != len(responses) or not prompts:
        raise ValueError("pack_sequences needs matching, non-empty lists of prompts and responses")
    if loss_masks is not None and (
        len(loss_masks) != len(responses) or any(len(m) != len(r) for m, r in zip(loss_masks, responses))
    ):
        raise ValueError("pack_sequences: loss_masks must give one 0/1 per response token")
    length = max(len(p) + len(r) for p, r in zip(prompts, responses))
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), length)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        if loss_masks is None:
            mask[i, len(p) : len(p) + len(r)] = 1.0
        elif r:
            mask[i, len(p) : len(p) + len(r)] = torch.tensor(loss_masks[i], dtype=torch.float32)
    return {"input_ids": ids, "response_mask": mask}
