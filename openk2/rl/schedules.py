"""Schedules for RL: the rollout temperature decays from high (explore while the policy is uncertain)
to low (exploit once it is good), as in K2's post-training."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class TemperatureSchedule:
    """start -> end over `steps` iterations, then constant. kind: "linear", "cosine" or "exponential"."""

    start: float = 1.0
    end: float = 0.6
    steps: int = 100
    kind: str = "cosine"

    def __post_init__(self):
        if not (0 < self.end <= 2 and 0 < self.start <= 2):
            raise ValueError(f"temperatures must be in (0, 2], got start={self.start} end={self.end}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.kind not in ("linear", "cosine", "exponential"):
            raise ValueError(f"kind must be linear, cosine or exponential, got {self.kind!r}")

    def __call__(self, step: int) -> float:
        t = min(max(step, 0), self.steps) / self.steps
        if self.kind == "linear":
            return self.start + (self.end - self.start) * t
        if self.kind == "cosine":
            return self.end + (self.start - self.end) * 0.5 * (1 + math.cos(math.pi * t))
        return self.start * (self.end / self.start) ** t
