"""kwasm_py.retry: the one retry/backoff policy (attempts, pauses, the testing switch)."""

from __future__ import annotations

import pytest

from kwasm_py import retry


class Flaky(Exception):
    pass


@pytest.fixture
def pauses(monkeypatch):
    """Pauses are recorded instead of slept; testing mode is off unless a test turns it on."""
    recorded: list[float] = []
    monkeypatch.setattr(retry.time, "sleep", recorded.append)
    retry.set_testing(False)
    yield recorded
    retry.set_testing(False)


def failing(times: int, exc: type[BaseException] = Flaky):
    calls: list[int] = []

    def action() -> str:
        calls.append(1)
        if len(calls) <= times:
            raise exc(f"attempt {len(calls)}")
        return "done"

    return action, calls


def test_retries_until_success_with_growing_capped_pauses(pauses):
    """Three failures, then success: three pauses, doubling from `initial` but never over `maximum`."""
    action, calls = failing(3)
    policy = retry.Backoff(retries=5, initial=1.0, maximum=3.0, jitter=(1.0, 1.0))
    assert retry.call(action, policy=policy, retry_on=Flaky) == "done"
    assert len(calls) == 4 and pauses == [1.0, 2.0, 3.0]


def test_gives_up_after_the_last_attempt_with_its_exception(pauses):
    """retries=2 means three attempts; the third failure is raised as is, with no pause after it."""
    action, calls = failing(100)
    seen: list[tuple[int, str]] = []
    with pytest.raises(Flaky, match="attempt 3"):
        retry.call(
            action,
            policy=retry.Backoff(retries=2),
            retry_on=Flaky,
            before_retry=lambda n, ex: seen.append((n, str(ex))),
        )
    assert len(calls) == 3 and len(pauses) == 2
    assert seen == [(1, "attempt 1"), (2, "attempt 2")]


def test_other_exceptions_are_not_retried(pauses):
    """An exception outside retry_on escapes from the first attempt."""
    action, calls = failing(1, ValueError)
    with pytest.raises(ValueError, match="attempt 1"):
        retry.call(action, policy=retry.Backoff(retries=4), retry_on=Flaky)
    assert len(calls) == 1 and pauses == []


def test_testing_mode_keeps_attempts_and_skips_pauses(pauses):
    """set_testing(True): every attempt still happens, no pause is taken."""
    retry.set_testing(True)
    assert retry.is_testing()
    action, calls = failing(2)
    assert retry.call(action, policy=retry.Backoff(retries=2), retry_on=Flaky) == "done"
    assert len(calls) == 3 and pauses == []


def test_jitter_stays_in_its_band():
    """The pause is the capped base times a factor inside `jitter`."""
    policy = retry.Backoff(initial=2.0, maximum=5.0, jitter=(0.5, 1.0))
    for _ in range(200):
        assert 1.0 <= policy.delay(1) <= 2.0
        assert 2.5 <= policy.delay(4) <= 5.0
