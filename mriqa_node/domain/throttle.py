"""Sign-in throttling: failed sign-ins are slowed, then refused for a while, both per user name
and per client address, so that a password cannot be guessed at the speed of the network and
one address cannot try a password against every user.

The state is in memory, per console process: a restart forgets it, which costs an attacker a
restart of the node, not a way round the limit.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

MAX_KEYS = 10_000  # tracked names and addresses; the oldest are forgotten beyond this


@dataclass(frozen=True)
class ThrottlePolicy:
    slow_after: int = 3  # failures before each further attempt is delayed
    max_delay_seconds: float = 8.0  # the delay doubles from 1 s up to this
    lock_after: int = 10  # failures for one user name before it is refused for a while
    lock_after_per_address: int = 30  # failures from one address before it is refused
    lockout_seconds: float = 900.0
    window_seconds: float = 900.0  # failures older than this no longer count


@dataclass(frozen=True)
class Decision:
    """What to do with a sign-in attempt before the password is checked."""

    refused_for: float = 0.0  # seconds until attempts are taken again; 0: take this one
    delay: float = 0.0  # seconds to wait before checking the password
    reason: str = ""

    @property
    def refused(self) -> bool:
        return self.refused_for > 0


class LoginThrottle:
    def __init__(
        self, policy: ThrottlePolicy | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.policy = policy or ThrottlePolicy()
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._locked_until: dict[str, float] = {}
        self._lock = threading.Lock()

    def check(self, user: str, address: str) -> Decision:
        now = self._clock()
        with self._lock:
            for key, what in ((_user(user), "user name"), (_address(address), "address")):
                until = self._locked_until.get(key, 0.0)
                if until > now:
                    reason = f"too many failures for this {what}"
                    return Decision(refused_for=until - now, reason=reason)
            failures = max(self._recent(_user(user), now), self._recent(_address(address), now))
        if failures < self.policy.slow_after:
            return Decision()
        delay = min(2.0 ** (failures - self.policy.slow_after), self.policy.max_delay_seconds)
        return Decision(delay=delay, reason=f"{failures} recent failures")

    def failed(self, user: str, address: str) -> list[str]:
        """Count a failed attempt; returns what it locked ("user name", "address"), if any."""
        now = self._clock()
        locked = []
        with self._lock:
            if len(self._failures) >= MAX_KEYS:
                self._forget_expired(now)
            limits = (
                (_user(user), self.policy.lock_after, "user name"),
                (_address(address), self.policy.lock_after_per_address, "address"),
            )
            for key, limit, what in limits:
                self._failures.setdefault(key, deque()).append(now)
                if self._recent(key, now) >= limit:
                    self._locked_until[key] = now + self.policy.lockout_seconds
                    del self._failures[key]  # counted afresh once the lockout ends
                    locked.append(what)
        return locked

    def succeeded(self, user: str) -> None:
        """A right password clears the user name's failures (not the address's: an attacker
        who knows one password must not reset the count of an address trying others)."""
        with self._lock:
            self._failures.pop(_user(user), None)

    def _recent(self, key: str, now: float) -> int:
        times = self._failures.get(key)
        if not times:
            return 0
        while times and times[0] <= now - self.policy.window_seconds:
            times.popleft()
        return len(times)

    def _forget_expired(self, now: float) -> None:
        """Bound the memory that random user names could fill: drop what no longer counts,
        then, if still too many, the names and addresses seen first."""
        old = now - self.policy.window_seconds
        for key in [k for k, t in self._failures.items() if not t or t[-1] <= old]:
            del self._failures[key]
        for key in [k for k, until in self._locked_until.items() if until <= now]:
            del self._locked_until[key]
        while len(self._failures) >= MAX_KEYS:
            del self._failures[next(iter(self._failures))]


def _user(name: str) -> str:
    return "user:" + name.strip().casefold()


def _address(address: str) -> str:
    return "addr:" + address
