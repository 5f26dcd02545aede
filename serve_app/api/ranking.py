"""Ranking a tier's candidates: which of the n completions the client gets first.

Why not the raw mean token logprob alone: a candidate that repeats a line is confident about the
repeat (the model copies what it just wrote), so a loop lifts its mean — the ranking rewarded
exactly the degenerate candidate. Rankers here see only the candidates (text, token count,
cumulative logprob), never the prompt, and are language-agnostic. Which one the complex tier uses
was measured on held-out holes (`bench/rank_candidates.py`, docs/benchmarks.md).
"""
from __future__ import annotations

from typing import Callable, Sequence

from serve_app.engine import CompletionOutput

Ranker = Callable[[Sequence[CompletionOutput]], list[CompletionOutput]]


def mean_logprob(c: CompletionOutput) -> float:
    return (c.cumulative_logprob or 0.0) / max(1, len(c.token_ids))


def repeated_line_share(text: str) -> float:
    """Share of the non-blank lines that repeat an earlier line of the same text (0 = none)."""
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    seen: set[str] = set()
    repeats = 0
    for line in lines:
        repeats += line in seen
        seen.add(line)
    return repeats / len(lines) if lines else 0.0


def by_mean_logprob(cands: Sequence[CompletionOutput]) -> list[CompletionOutput]:
    return sorted(cands, key=mean_logprob, reverse=True)


def by_cumulative_logprob(cands: Sequence[CompletionOutput]) -> list[CompletionOutput]:
    """OpenAI's and vLLM's best_of rule."""
    return sorted(cands, key=lambda c: c.cumulative_logprob or 0.0, reverse=True)


def repeat_free_first(cands: Sequence[CompletionOutput]) -> list[CompletionOutput]:
    """Candidates that repeat no line first, then by mean logprob (no parameter to tune)."""
    return sorted(cands, key=lambda c: (repeated_line_share(c.text) > 0, -mean_logprob(c)))


def mean_logprob_minus_repeats(cands: Sequence[CompletionOutput]) -> list[CompletionOutput]:
    """Mean logprob less one nat per unit of repeated-line share."""
    return sorted(cands, key=lambda c: mean_logprob(c) - repeated_line_share(c.text), reverse=True)


RANKERS: dict[str, Ranker] = {
    "mean logprob": by_mean_logprob,
    "cumulative logprob": by_cumulative_logprob,
    "repeat-free first, then mean logprob": repeat_free_first,
    "mean logprob minus repeated lines": mean_logprob_minus_repeats,
}
