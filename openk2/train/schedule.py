"""Learning-rate schedules as pure functions of the step: a multiplier on the peak learning rate.

A pure function means the schedule's whole state is the step counter already in the checkpoint, so
resuming cannot drift. Both schedules start with a linear warm-up from 0.

* WSD (warm-up, stable, decay), K2's choice: hold the peak for most of training, then decay over the
  last `decay_fraction` of the steps (cosine-shaped, as K2's 2e-4 -> 2e-5 phase) to min_ratio.
* cosine: decay from the peak right after warm-up to min_ratio at the last step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("wsd", "cosine", "constant")


@dataclass
class Schedule:
    kind: str = "wsd"
    total_steps: int = 1000
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # WSD only
    min_ratio: float = 0.1  # final lr / peak lr

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.kind!r}; choose one of {', '.join(SCHEDULES)}")
        if self.total_steps < 1 or not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError("need total_steps >= 1 and 0 <= warmup_steps <= total_steps")
        if not 0 <= self.decay_fraction <= 1 or not 0 <= self.min_ratio <= 1:
            raise ValueError("decay_fraction and min_ratio must be in [0, 1]")

    def __call__(self, step: int) -> float:
        """Multiplier for the update that `step` (0-based) applies."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        if self.kind == "cosine":
            start, length = self.warmup_steps, self.total_steps - self.warmup_steps
        else:
            length = round(self.decay_fraction * self.total_steps)
            start = max(self.total_steps - length, self.warmup_steps)
            length = self.total_steps - start
        if step < start or length <= 0:
            return 1.0
        progress = min((step - start) / max(length - 1, 1), 1.0)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
