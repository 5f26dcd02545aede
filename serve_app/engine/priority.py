"""Strict priority between engine loops that share one device, with a starvation bound.

The router runs two engine loops over one model (DESIGN.md §3): the *fast* lane (quantized, inline
completions under a 50 ms budget) and the *full* lane (full precision, expert parallelism). Separate
batches keep simple requests out of complex requests' shard round trips, but on a CPU both loops —
and the shard processes a full-precision step drives — compete for the same cores, so a simple
request's latency still grew with complex traffic (2.08× p80 with two complex users, see
docs/benchmarks.md). The gate makes the full lane *yield*: it starts a step only when the fast lane
has no work, or when it has waited ``max_defer_s`` (so complex requests always progress, at the
worst one step per ``max_defer_s``). A full step already running is never interrupted; a simple
request that arrives during one waits for it to end, which bounds its extra latency by one step.

Why "has work" and not "is mid-step": the fast lane's loop spends a little time between steps
(delivering outputs, taking the lock); a full step started in that gap would hold the CPU for a
whole step anyway.
"""
from __future__ import annotations

import threading
import time


class LaneGate:
    def __init__(self, max_defer_s: float):
        if max_defer_s < 0:
            raise ValueError(f"max_defer_s must be >= 0, got {max_defer_s}")
        self.max_defer_s = max_defer_s
        self._cond = threading.Condition()
        self._busy: set[int] = set()          # id() of priority lanes that have unfinished work
        self.deferred_s = 0.0                 # total time low-priority steps waited (for metrics/tests)
        self.forced_steps = 0                 # low-priority steps started by the starvation bound

    def set_busy(self, lane: object, busy: bool) -> None:
        """A priority lane reports whether it has unfinished work (idempotent)."""
        with self._cond:
            if busy:
                self._busy.add(id(lane))
            elif id(lane) in self._busy:
                self._busy.discard(id(lane))
                self._cond.notify_all()

    @property
    def priority_busy(self) -> bool:
        with self._cond:
            return bool(self._busy)

    def wait_turn(self) -> float:
        """Called by a low-priority lane before each step: returns once no priority lane has work,
        or after max_defer_s. Returns the seconds waited."""
        start = time.monotonic()
        deadline = start + self.max_defer_s
        with self._cond:
            while self._busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.forced_steps += 1
                    break
                self._cond.wait(remaining)
            waited = time.monotonic() - start
            self.deferred_s += waited
        return waited
