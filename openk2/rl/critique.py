"""Self-Critique Rubric Reward: a critic ranks a prompt's K responses pairwise against rubrics, and
the pairwise preferences become per-sample rewards (K2, section 3.2).

The critic is a causal LM (the policy itself, or a separate checkpoint). It reads one judge prompt
per ordered pair (rubrics as the system message, then the question and responses A and B) and its
next-token distribution restricted to the two tokens "A" and "B" gives P(A is better). No decoding is
needed, so judging a group costs one batched forward. Each pair is judged in both orders and
averaged, which cancels the critic's position bias; a sample's reward is its mean win probability
against the other K-1 samples (a round robin, in [0, 1], summing to K/2 over the group).

Refresh: on groups of a verifiable environment, pairs whose verifier rewards differ are labelled by
the verifier, and the critic is trained with cross-entropy on the A/B logits. That is how K2 grounds
its subjective judge in on-policy, objectively scored rollouts.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from openk2.tokenizer.chat import encode_chat

CORE_RUBRICS = [
    "Correctness: the response answers exactly what was asked, and its claims are true.",
    "Clarity: the response is direct and easy to follow.",
    "Objectivity: the response sticks to the question without opinions or filler.",
]
PRESCRIPTIVE_RUBRICS = [
    "No initial praise: the response does not start by complimenting the question.",
    "No needless justification: the response does not explain what nobody asked about.",
]


@dataclass
class CritiqueConfig:
    core: list[str] = field(default_factory=lambda: list(CORE_RUBRICS))
    prescriptive: list[str] = field(default_factory=lambda: list(PRESCRIPTIVE_RUBRICS))
    max_pairs_per_group: int = 16  # refresh: labelled pairs drawn per group
    max_response_tokens: int = 256  # responses are cut to this many tokens in the judge prompt


class SelfCritic:
    """Pairwise judge and its refresh loss. `model` is any module mapping ids (B, T) -> logits."""

    def __init__(self, model: nn.Module, tokenizer, config: CritiqueConfig | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.config = config or CritiqueConfig()
        ids = [tokenizer.encode("A"), tokenizer.encode("B")]
        if any(len(i) != 1 for i in ids):
            raise ValueError("the critic needs 'A' and 'B' to be single tokens in its tokenizer")
        self.choice_ids = torch.tensor([ids[0][0], ids[1][0]])
        rubric = "\n".join(f"- {r}" for r in self.config.core + self.config.prescriptive)
        self.system = f"Compare two responses to the question against these rubrics:\n{rubric}\n"

    def _clip(self, text: str) -> str:
        ids = self.tokenizer.encode(text)
        return (
            text
            if len(ids) <= self.config.max_response_tokens
            else self.tokenizer.decode(ids[: self.config.max_response_tokens])
        )

    def judge_prompt(self, question: str, a: str, b: str) -> list[int]:
        user = (
            f"Question:\n{question}\n\nResponse A:\n{self._clip(a)}\n\nResponse B:\n{self._clip(b)}\n\n"
            "Which response is better? Answer A or B."
        )
        messages = [{"role": "system", "content": self.system}, {"role": "user", "content": user}]
        return encode_chat(self.tokenizer, messages, add_generation_prompt=True).ids

    def choice_logits(self, prompts: list[list[int]]) -> torch.Tensor:
        """(P, 2) logits of "A" and "B" at each prompt's last position (right-padded batch)."""
        length = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), length, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p)
        last = torch.tensor([len(p) - 1 for p in prompts])
        logits = self.model(ids)[torch.arange(len(prompts)), last]
        return logits[:, self.choice_ids].float()

    @torch.no_grad()
    def rewards(self, question: str, responses: list[str]) -> list[float]:
        """Round-robin win probability of each response (0.5 for a group of one)."""
        k = len(responses)
        if k < 2:
            return [0.5] * k
        pairs = list(itertools.permutations(range(k), 2))
        prompts = [self.judge_prompt(question, responses[i], responses[j]) for i, j in pairs]
        p_first = self.choice_logits(prompts).softmax(-1)[:, 0]  # P(response in slot A is better)
        win = torch.zeros(k, k)
        for (i, j), p in zip(pairs, p_first.tolist()):
            win[i, j] += 0.5 * p  # i in slot A
            win[j, i] += 0.5 * (1 - p)  # j in slot B won when A lost
        return (win.sum(1) / (k - 1)).tolist()

    def refresh_pairs(self, question: str, responses: list[str], rewards: list[float], rng: random.Random):
        """Verifier-labelled ordered pairs (prompt ids, label 0 = A better / 1 = B better)."""
        pairs = [
            (i, j) for i, j in itertools.permutations(range(len(responses)), 2) if rewards[i] != rewards[j]
        ]
        rng.shuffle(pairs)
        return [
            (self.judge_prompt(question, responses[i], responses[j]), 0 if rewards[i] > rewards[j] else 1)
            for i, j in pairs[: self.config.max_pairs_per_group]
        ]

    def refresh_loss(self, pairs: list[tuple[list[int], int]]) -> tuple[torch.Tensor, float]:
        """Cross-entropy of the verifier labels under the critic, and its accuracy on them."""
        if not pairs:
            raise ValueError("refresh_loss needs at least one labelled pair")
        logits = self.choice_logits([p for p, _ in pairs])
        labels = torch.tensor([y for _, y in pairs])
        accuracy = float((logits.argmax(-1) == labels).float().mean())
        return F.cross_entropy(logits, labels), accuracy


def question_text(messages: list[dict]) -> str:
    """The last user turn of a task's prompt: what the critic is shown as the question."""
    users = [m for m in messages if m.get("role") == "user"]
    content = users[-1].get("content") if users else ""
    return content if isinstance(content, str) else str(content)
