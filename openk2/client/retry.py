"""The one retry policy: which failures are worth another try, and how long to wait before it."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

TRANSIENT = ("timeout", "connection_error", "http_5", "http_429", "transient")

R = TypeVar("R")


def is_transient(error: str | None) -> bool:
    """Timeouts, dropped connections, rate limits and server errors may pass on a later try; a bad
    request, a context overflow or an answer that is not JSON will not."""
    return error is not None and error.startswith(TRANSIENT)


@dataclass
class RetryPolicy:
    max_retries: int = 2
    backoff_s: float = 0.25  # the first wait; doubles each try, with +-50% jitter
    max_backoff_s: float = 8.0

    def __post_init__(self):
        if self.max_retries < 0 or self.backoff_s < 0:
            raise ValueError(
                f"max_retries and backoff_s must be >= 0, got {self.max_retries}, {self.backoff_s}"
            )

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (0-based)."""
        return min(self.max_backoff_s, self.backoff_s * 2**attempt) * (0.5 + random.random())

    def run(self, attempt: Callable[[], R]) -> R:
        """Call `attempt` (which returns a result with `error`, `latency_s` and `attempts`) until it
        succeeds, fails for good, or the retries are spent; the last result is returned."""
        for i in range(self.max_retries + 1):
            start = time.perf_counter()
            result = attempt()
            result.latency_s = time.perf_counter() - start
            result.attempts = i + 1
            if i < self.max_retries and is_transient(result.error):
                time.sleep(self.delay(i))
                continue
            return result
        raise AssertionError("unreachable")
