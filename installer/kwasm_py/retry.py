"""The one retry/backoff policy: bounded attempts, capped exponential pauses with jitter.

Shaped after ``stamina`` (which this project does not depend on): the caller names the
exceptions worth another attempt, the policy is a frozen value, and ``set_testing(True)`` keeps
every attempt but skips the pauses, so tests exercise the retries without sleeping. Pauses go
through ``time.sleep`` looked up at call time, so a test can also record them.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

_testing = False


def set_testing(testing: bool) -> None:
    """Switch the pauses off (True) or back on (False); attempts still happen and are counted."""
    global _testing  # noqa: PLW0603 - one process-wide switch, like stamina.set_testing
    _testing = testing


def is_testing() -> bool:
    """Whether ``set_testing(True)`` is in force."""
    return _testing


@dataclass(frozen=True)
class Backoff:
    """How often to try and how long to wait between tries.

    ``retries`` extra attempts follow the first; the pause after failed attempt N is
    ``min(maximum, initial * factor ** (N - 1))`` times ``scale``, by a random factor in ``jitter``.
    """

    retries: int = 4
    initial: float = 0.5
    factor: float = 2.0
    maximum: float = 8.0
    jitter: tuple[float, float] = (0.5, 1.0)
    scale: float = 1.0  # multiplies every pause (0: none at all, as the agent's tests use)

    @property
    def attempts(self) -> int:
        """Total attempts: the first one plus the retries."""
        return self.retries + 1

    def delay(self, attempt: int) -> float:
        """The pause (seconds) after failed attempt ``attempt`` (1-based), jitter included."""
        base = min(self.maximum, self.initial * self.factor ** max(0, attempt - 1))
        return base * self.scale * random.uniform(*self.jitter)  # noqa: S311 - jitter, not cryptography


def call(
    action: Callable[[], T],
    *,
    policy: Backoff,
    retry_on: type[BaseException] | tuple[type[BaseException], ...],
    before_retry: Callable[[int, BaseException], None] | None = None,
) -> T:
    """Run ``action`` until it returns, at most ``policy.attempts`` times.

    Takes the action, the policy, the exception type(s) another attempt may fix, and an optional
    hook called with (failed attempt number, its exception) before each retry.
    Returns what ``action`` returns. Raises whatever ``action`` raises that is not ``retry_on``
    at once, and the last ``retry_on`` exception when every attempt failed (the caller turns it
    into its own error, ``raise ... from`` it).
    """
    attempt = 1
    while True:
        try:
            return action()
        except retry_on as ex:
            if attempt >= policy.attempts:
                raise
            if before_retry is not None:
                before_retry(attempt, ex)
        if not _testing:
            time.sleep(policy.delay(attempt))
        attempt += 1
