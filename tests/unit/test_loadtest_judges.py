"""The SLO runner's reading of the raw request log: requests Locust cut when it stopped are neither
latency samples nor failures, unless one had waited longer than every answer (it was stuck)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "loadtests"))

import run_slo  # noqa: E402


def _row(ms: float, status: str = "200", error: str = "") -> dict:
    return {"name": "fim", "start": 0.0, "ms": ms, "ok": status == "200", "status": status, "error": error}


def test_a_request_cut_by_locust_stopping_is_not_a_failure_unless_it_was_stuck():
    answered = [_row(120.0), _row(480.0)]
    cut_young = _row(3.0, "open", "cut by Locust stopping")
    cut_old = _row(9000.0, "open", "cut by Locust stopping")       # waited longer than any answer
    never = _row(2.0, "open", "no answer yet")                     # not cut by Locust: still open at quit
    kept, cut = run_slo.without_stop_cuts([*answered, cut_young, cut_old, never])
    assert cut == 1 and cut_young not in kept
    assert cut_old in kept and never in kept
    assert sum(not r["ok"] for r in kept) == 2
