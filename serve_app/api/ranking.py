"""Ranking a tier's candidates: which of the n completions the client gets first.

Why not the mean token logprob (the old rule): a candidate that repeats a line is confident about
the repeat (the model copies what it just wrote), so a loop lifts its mean — the ranking rewarded
exactly the degenerate candidate. Measured on 200 held-out FIM holes, 3 candidates at the complex
tier's temperature, 2 seeds (`bench/rank_candidates.py`, docs/benchmarks.md, 2026-12-03): with no
penalty the mean picks a parsing middle 25–28% of the time, worse than taking the first candidate
(21–39%); the cumulative logprob 42–46%, repeat-aware variants of the mean 31–36%. With the
bundled model's frequency penalty 0.7 the cumulative logprob wins too (58–62% vs 55–59%, edit
similarity 0.44–0.47 vs 0.41–0.44). It prefers the shorter of two equally likely middles, which
is what a hole usually wants. So the tier ranks by cumulative logprob, as OpenAI's best_of does;
the other rankers stay here as the measured alternatives.

Rankers see only the candidates (text, token count, cumulative logprob), never the prompt, and are
language-agnostic.
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


TIER_RANKER: Ranker = by_cumulative_logprob

RANKERS: dict[str, Ranker] = {
    "mean logprob": by_mean_logprob,
    "cumulative logprob": by_cumulative_logprob,
    "repeat-free first, then mean logprob": repeat_free_first,
    "mean logprob minus repeated lines": mean_logprob_minus_repeats,
}
