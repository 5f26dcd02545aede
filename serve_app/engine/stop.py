"""Stop strings over streamed text deltas.

Contract (tested with hypothesis): for a generated text T and any split of T into deltas, the
concatenation of everything emitted equals `T[:i]`, where i is the earliest position at which any
stop string starts in T (or all of T when none occurs). The stop string itself is never emitted
(OpenAI's behaviour), and no emitted piece is ever retracted, so a streaming client never sees a
prefix of a stop string that later turns out to be one.

How:
- After each delta we hold back the longest tail of the unemitted text that is a proper prefix of
  some stop string; it may still grow into a stop string. Everything before it is final.
  The held tail is shorter than the longest stop string, so each feed costs
  O((len(delta) + max_len) * num_stops).
- A stop is declared at the earliest complete match i only when no held tail starts before i: with
  stops "abcd" and "bc", the text "abc" completes "bc" at 1, but "abcd" could still start at 0,
  so we wait for more text. This keeps the result independent of how the text was split. With a
  single stop string (or stops that cannot overlap like this) it never waits; when it does, the
  engine generates at most max_len - 1 extra characters, and `flush()` settles the pending match.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class StopCheckerError(ValueError):
    """Bad stop strings, or text fed after a stop was already reported."""


@dataclass(frozen=True)
class StopResult:
    text: str                   # safe to emit now (never part of a stop string)
    stopped: bool               # a stop string was hit; generation should end
    stop_string: str | None     # which stop string ended it (None when not stopped)


class StopChecker:
    """Feed text deltas with `feed`; call `flush` when generation ends for another reason."""

    def __init__(self, stop: Sequence[str]) -> None:
        if any(not isinstance(s, str) or not s for s in stop):
            raise StopCheckerError(f"stop strings must be non-empty strings, got {list(stop)!r}")
        self._stops = tuple(stop)
        self._max_len = max((len(s) for s in self._stops), default=0)
        self._held = ""  # received but not yet emitted; may contain a pending complete match
        self._stopped = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    def feed(self, delta: str) -> StopResult:
        """Take the next piece of generated text; return what may be emitted now."""
        if self._stopped:
            raise StopCheckerError(f"feed({delta!r}) after a stop string was already hit")
        if not self._stops:
            return StopResult(delta, False, None)
        buf = self._held + delta
        match_at, match = self._earliest_match(buf)
        hold_from = self._hold_start(buf)
        if match is not None and hold_from >= match_at:
            # No stop string can start before match_at any more: the cut is final.
            self._held, self._stopped = "", True
            return StopResult(buf[:match_at], True, match)
        self._held = buf[hold_from:]
        return StopResult(buf[:hold_from], False, None)

    def flush(self) -> StopResult:
        """Generation ended (EOS, max_tokens): emit the held tail, cut at a pending match if any."""
        if self._stopped:
            return StopResult("", True, None)
        buf, self._held = self._held, ""
        match_at, match = self._earliest_match(buf)
        if match is not None:
            self._stopped = True
            return StopResult(buf[:match_at], True, match)
        return StopResult(buf, False, None)

    def _earliest_match(self, buf: str) -> tuple[int, str | None]:
        best_at, best = len(buf), None
        for s in self._stops:
            at = buf.find(s, 0, best_at + len(s) - 1)  # only matches starting before best_at
            if at != -1 and at < best_at:
                best_at, best = at, s
        return best_at, best

    def _hold_start(self, buf: str) -> int:
        """Start of the longest tail of buf that is a proper prefix of some stop string."""
        for start in range(max(0, len(buf) - self._max_len + 1), len(buf)):
            tail = buf[start:]
            if any(len(tail) < len(s) and s.startswith(tail) for s in self._stops):
                return start
        return len(buf)
