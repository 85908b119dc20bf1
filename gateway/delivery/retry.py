"""Backoff with jitter and the per-connector circuit breaker. Pure: no IO, the clock is injected."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from enum import Enum

from gateway.config.models import RetryPolicy

#: 2**64 × any sane initial delay is far past every ``max``; it also keeps floats finite.
_MAX_EXPONENT = 64


def backoff(policy: RetryPolicy, attempts: int, rng: random.Random) -> float:
    """Delay before attempt ``attempts + 1`` (``attempts`` ≥ 1 already failed).

    Exponential — ``initial × 2^(attempts-1)`` capped at ``max`` — or fixed at ``initial``, then
    "equal jitter": a uniform draw in [50 %, 100 %] of that, so a burst of failures spreads out
    while the delay never falls below half the schedule.
    """
    if policy.backoff == "fixed":
        base = policy.initial
    else:
        base = min(policy.max, policy.initial * 2.0 ** min(_MAX_EXPONENT, max(0, attempts - 1)))
    return float(base * (0.5 + rng.random() * 0.5))


class CircuitState(Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class Admit(Enum):
    SEND = "send"  # closed: send as much as the concurrency allows
    PROBE = "probe"  # half-open: exactly one send; its result decides
    WAIT = "wait"  # open, or half-open with the probe still out


class CircuitBreaker:
    """Stop hammering a dead peer; probe it now and then.

    *Closed*: every send goes; ``threshold`` consecutive transient failures open the circuit.
    *Open*: nothing is sent for a cool-down that starts at ``base_open`` seconds and doubles
    each time a probe fails, up to ``max_open``. Failures of sends that were already out when it
    opened do not lengthen it. *Half-open* (cool-down over): one probe; success closes the
    circuit, failure opens it again. Any success closes it: the peer answered.
    """

    def __init__(self, threshold: int = 5, base_open: float = 1.0, max_open: float = 60.0,
                 clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[CircuitState], None] | None = None):
        self.threshold = threshold
        self.base_open = base_open
        self.max_open = max_open
        self._clock = clock
        self._on_change = on_change
        self._state = CircuitState.CLOSED
        self.failures = 0
        self.trips = 0  # consecutive openings without a success in between
        self.open_until = 0.0
        self.probing = False

    @property
    def state(self) -> CircuitState:
        if self._state is CircuitState.OPEN and self._clock() >= self.open_until:
            self._set(CircuitState.HALF_OPEN)
        return self._state

    def admit(self) -> Admit:
        state = self.state
        if state is CircuitState.CLOSED:
            return Admit.SEND
        if state is CircuitState.HALF_OPEN and not self.probing:
            self.probing = True
            return Admit.PROBE
        return Admit.WAIT

    def cancel_probe(self) -> None:
        """The probe slot was granted but nothing was due to send."""
        self.probing = False

    def wait_time(self) -> float:
        return max(0.0, self.open_until - self._clock())

    def success(self) -> None:
        self.failures = 0
        self.trips = 0
        self.probing = False
        self.open_until = 0.0
        self._set(CircuitState.CLOSED)

    def failure(self, *, probe: bool = False) -> None:
        state = self.state
        if state is CircuitState.CLOSED:
            self.failures += 1
            if self.failures >= self.threshold:
                self._open()
        elif state is CircuitState.HALF_OPEN and probe:
            self.probing = False
            self._open()
        # OPEN, or a straggler while half-open: the circuit already knows.

    def _open(self) -> None:
        self.open_until = self._clock() + min(self.max_open, self.base_open * 2.0 ** min(self.trips, _MAX_EXPONENT))
        self.trips += 1
        self.failures = 0
        self._set(CircuitState.OPEN)

    def _set(self, state: CircuitState) -> None:
        if state is not self._state:
            self._state = state
            if self._on_change is not None:
                self._on_change(state)
