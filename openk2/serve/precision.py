"""How far a lower-precision engine (bf16 weights and cache) is from the fp32 one: the quality side of
serving in bf16, measured on the serving path itself (prefill, then the decode step the engine runs,
compiled or not).

Two views, because they answer different questions:

* **teacher-forced**: both engines are fed the same tokens (the fp32 engine's greedy continuation)
  and their logits compared at every step: max and mean absolute error (against the fp32 logits'
  standard deviation, for scale) and how often the lower-precision argmax is the fp32 token. This
  isolates the per-step error from the divergence it causes.
* **free-running greedy**: each engine decodes on its own; the fraction of tokens before the two
  first differ. One flip near a tie changes everything after it, so this is the stricter and noisier
  figure (on random weights, with their nearly flat distributions, ties are common).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from openk2.serve.engine import Engine
from openk2.serve.sampling import SamplingParams


@dataclass
class PrecisionReport:
    prompts: int
    tokens: int  # new tokens per prompt
    teacher_forced_agreement: float  # share of steps whose argmax is the reference token
    max_logit_error: float
    mean_logit_error: float
    logit_std: float  # of the reference logits, the scale for the two errors above
    greedy_prefix_agreement: float  # share of free-running tokens before the first difference
    greedy_identical: int  # prompts whose whole continuation is identical

    def summary(self) -> str:
        return (
            f"{self.prompts} prompts x {self.tokens} tokens: teacher-forced argmax agreement "
            f"{self.teacher_forced_agreement:.1%}, logit error max {self.max_logit_error:.3g} / mean "
            f"{self.mean_logit_error:.3g} (logit std {self.logit_std:.3g}); free-running greedy: "
            f"{self.greedy_prefix_agreement:.1%} of tokens before the first difference, "
            f"{self.greedy_identical} of {self.prompts} continuations identical"
        )


def forced_logits(engine: Engine, prompts: list[list[int]], forced: list[list[int]]) -> torch.Tensor:
    """Float32 logits (B, M, V) of the engine's prefill and decode steps with the tokens `forced`
    (B, M) fed in: step 0 is the prefill's, step j the decode step after forced[:, j - 1]. Uses cache
    slots 0..B-1 directly: call it only on an engine that is not serving (not started, idle)."""
    b, m = len(prompts), len(forced[0])
    if b > engine.cache.slots:
        raise ValueError(f"{b} prompts but the engine has {engine.cache.slots} cache slots")
    device = engine.device
    lengths = [len(p) for p in prompts]
    ids = torch.zeros(b, max(lengths), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
    out = []
    with torch.inference_mode():
        lengths_t = torch.tensor(lengths, device=device)
        logits = engine.forward.prefill(ids.to(device), lengths_t, torch.arange(b, device=device))
        pos = lengths_t.clone()
        tokens = torch.tensor(forced, device=device)
        for j in range(m):
            out.append(logits.float())
            if j + 1 < m:
                logits = engine.forward.decode(tokens[:, j], pos, int(pos.max()) + 1)
                pos += 1
    return torch.stack(out, dim=1)


def compare_precision(
    reference: Engine, candidate: Engine, prompts: list[list[int]], max_tokens: int
) -> PrecisionReport:
    """`candidate` (bf16, say) against `reference` (fp32) on the same prompts, greedy, `max_tokens`
    new tokens each; both engines idle (not started)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    ref = [o.completions[0].token_ids for o in reference.generate(prompts, params)]
    cand = [o.completions[0].token_ids for o in candidate.generate(prompts, params)]
    same_prefix = []
    for a, b in zip(ref, cand):
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        same_prefix.append(k)
    slots = min(reference.cache.slots, candidate.cache.slots)
    agree, errors_max, errors_sum, count, stds = 0, 0.0, 0.0, 0, []
    for start in range(0, len(prompts), slots):
        chunk, forced = prompts[start : start + slots], ref[start : start + slots]
        want = forced_logits(reference, chunk, forced)
        got = forced_logits(candidate, chunk, forced)
        diff = (got - want).abs()
        errors_max = max(errors_max, float(diff.max()))
        errors_sum += float(diff.sum())
        count += diff.numel()
        stds.append(float(want.std()))
        agree += int((got.argmax(-1) == torch.tensor(forced)).sum())
    total = len(prompts) * max_tokens
    return PrecisionReport(
        prompts=len(prompts),
        tokens=max_tokens,
        teacher_forced_agreement=agree / total,
        max_logit_error=errors_max,
        mean_logit_error=errors_sum / count,
        logit_std=sum(stds) / len(stds),
        greedy_prefix_agreement=sum(same_prefix) / total,
        greedy_identical=sum(k == max_tokens for k in same_prefix),
    )
