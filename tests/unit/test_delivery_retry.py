"""Backoff bounds and the circuit breaker's state machine (pure, with a fake clock)."""

from __future__ import annotations

import math
import random

import pytest

from gateway.config.models import RetryPolicy
from gateway.delivery.retry import Admit, CircuitBreaker, CircuitState, backoff


@pytest.mark.parametrize("attempts", range(1, 15))
def test_exponential_backoff_stays_within_half_to_full_schedule(attempts: int) -> None:
    policy = RetryPolicy(initial=0.5, max=60)
    schedule = min(60.0, 0.5 * 2 ** (attempts - 1))
    rng = random.Random(attempts)
    delays = [backoff(policy, attempts, rng) for _ in range(500)]
    assert all(schedule / 2 <= d <= schedule for d in delays)
    # jitter really spreads: not all the same, and both halves of the band are used
    assert max(delays) - min(delays) > schedule * 0.3


def test_fixed_backoff_ignores_the_attempt_number() -> None:
    policy = RetryPolicy(backoff="fixed", initial=2, max=600)
    rng = random.Random(1)
    assert all(1.0 <= backoff(policy, n, rng) <= 2.0 for n in (1, 5, 50, 1000))


def test_huge_attempt_counts_stay_finite_and_capped() -> None:
    policy = RetryPolicy(attempts=1000, initial=1, max=600)
    d = backoff(policy, 1000, random.Random(0))
    assert math.isfinite(d) and 300 <= d <= 600


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def breaker(**kw: float) -> tuple[CircuitBreaker, Clock, list[CircuitState]]:
    clock = Clock()
    changes: list[CircuitState] = []
    b = CircuitBreaker(threshold=int(kw.pop("threshold", 3)), clock=clock, on_change=changes.append, **kw)
    return b, clock, changes


def test_opens_after_threshold_consecutive_failures_only() -> None:
    b, _, changes = breaker()
    b.failure()
    b.failure()
    b.success()  # resets the count
    b.failure()
    b.failure()
    assert b.state is CircuitState.CLOSED and b.admit() is Admit.SEND
    b.failure()
    assert b.state is CircuitState.OPEN
    assert b.admit() is Admit.WAIT
    assert changes == [CircuitState.OPEN]


def test_stragglers_do_not_lengthen_an_open_circuit() -> None:
    b, clock, _ = breaker(base_open=1.0)
    for _ in range(3):
        b.failure()
    until = b.open_until
    for _ in range(20):  # the other sends that were out when it opened
        b.failure()
    assert b.open_until == until
    clock.now += 1.0
    assert b.state is CircuitState.HALF_OPEN


def test_half_open_lets_exactly_one_probe_through() -> None:
    b, clock, _ = breaker(base_open=1.0)
    for _ in range(3):
        b.failure()
    clock.now += 1.0
    assert b.admit() is Admit.PROBE
    assert b.admit() is Admit.WAIT
    assert b.admit() is Admit.WAIT
    b.failure()  # a straggler, not the probe: the probe's answer decides
    assert b.state is CircuitState.HALF_OPEN
    b.cancel_probe()  # nothing was due after all
    assert b.admit() is Admit.PROBE


def test_failed_probes_double_the_cool_down_up_to_the_cap() -> None:
    b, clock, _ = breaker(base_open=1.0, max_open=5.0)
    for _ in range(3):
        b.failure()
    waits = []
    for _ in range(5):
        waits.append(b.wait_time())
        clock.now = b.open_until
        assert b.admit() is Admit.PROBE
        b.failure(probe=True)
        assert b.state is CircuitState.OPEN
    assert waits == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_probe_success_closes_and_resets() -> None:
    b, clock, changes = breaker(base_open=1.0)
    for _ in range(3):
        b.failure()
    clock.now += 1.0
    assert b.admit() is Admit.PROBE
    b.success()
    assert b.state is CircuitState.CLOSED and b.admit() is Admit.SEND
    assert changes == [CircuitState.OPEN, CircuitState.HALF_OPEN, CircuitState.CLOSED]
    for _ in range(3):  # the cool-down starts over from the base
        b.failure()
    assert b.wait_time() == 1.0
