"""Where a load test's time went, from the server's own metrics (scraped before and after the run).

The client sees one number per request; the server's histograms split it: ingress end-to-end,
engine latency (arrival at the engine to last token), queue time, time to first token, time per
decoded token, engine step time and the router→shard dispatch per MoE layer. The difference of two
scrapes covers exactly the run. Works on both exports: the embedded server's `/metrics` (plain
names) and the Ray deployment's (Ray's `ray_` prefix; Ray exports a histogram's `_sum` from
bucket midpoints, so means are approximate there while quantiles are as good as the buckets).
"""
from __future__ import annotations

import math
import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[str, list[tuple[dict, float]]]   # sample name (prefix stripped) → (labels, value)


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            name = s.name.removeprefix("ray_") if s.name.startswith("ray_moe_") else s.name
            out.setdefault(name, []).append((dict(s.labels), s.value))
    return out


def scrape(url: str, headers: dict[str, str] | None = None, timeout_s: float = 10.0) -> Samples:
    req = urllib.request.Request(f"{url.rstrip('/')}/metrics", headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return parse(resp.read().decode("utf-8", "replace"))


def _total(samples: Samples, name: str, match: dict, by: str | None = None) -> dict:
    """Sum of a sample's values over every series whose labels include `match`, grouped by `by`."""
    sums: dict = {}
    for labels, value in samples.get(name, []):
        if all(labels.get(k) == v for k, v in match.items()):
            key = labels.get(by) if by else None
            sums[key] = sums.get(key, 0.0) + value
    return sums


def counter_delta(before: Samples, after: Samples, name: str, **match) -> float:
    return _total(after, name, match).get(None, 0.0) - _total(before, name, match).get(None, 0.0)


@dataclass(frozen=True)
class Histogram:
    """Cumulative bucket counts of one histogram over a time window, all matching series summed."""
    buckets: tuple[tuple[float, float], ...]   # (upper bound, cumulative count), sorted; last is +Inf
    count: float
    total: float                               # sum of observations (approximate under Ray)

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else math.nan

    def quantile(self, q: float) -> float:
        """Prometheus' histogram_quantile: linear interpolation inside the bucket that holds rank q."""
        if not self.count:
            return math.nan
        rank, lower, below = q * self.count, 0.0, 0.0
        for upper, cumulative in self.buckets:
            if cumulative >= rank:
                if math.isinf(upper):
                    return lower                      # beyond the last finite bucket
                inside = cumulative - below
                return lower + (upper - lower) * ((rank - below) / inside if inside else 0.0)
            lower, below = upper, cumulative
        return lower


def histogram_delta(before: Samples, after: Samples, name: str, **match) -> Histogram:
    def by_le(samples: Samples) -> dict:
        return _total(samples, f"{name}_bucket", match, by="le")

    new, old = by_le(after), by_le(before)
    buckets = tuple(sorted((float(le), new[le] - old.get(le, 0.0)) for le in new))
    count = counter_delta(before, after, f"{name}_count", **match)
    return Histogram(buckets, count, counter_delta(before, after, f"{name}_sum", **match))


@dataclass(frozen=True)
class Stage:
    name: str            # what the row measures
    metric: str          # the histogram it comes from
    match: dict          # label filter
    unit_ms: bool = True


STAGES = (
    Stage("ingress e2e (FIM)", "moe_request_latency_seconds", {"endpoint": "/v1/fim/completions"}),
    Stage("ingress e2e (completions)", "moe_request_latency_seconds", {"endpoint": "/v1/completions"}),
    Stage("engine: arrival to last token", "moe_engine_latency_seconds", {}),
    Stage("engine: queue (arrival to first step)", "moe_queue_time_seconds", {}),
    Stage("engine: time to first token", "moe_time_to_first_token_seconds", {}),
    Stage("engine: between tokens (decode)", "moe_inter_token_latency_seconds", {}),
    Stage("engine: one step", "moe_step_seconds", {}),
    Stage("dispatch: one shard, one MoE layer", "moe_dispatch_latency_seconds", {}),
    Stage("batch size (sequences per step)", "moe_batch_size", {}, unit_ms=False),
)


def _label_values(samples: Samples, name: str, label: str) -> list[str]:
    return sorted({labels[label] for labels, _ in samples.get(name, []) if label in labels})


def tier_stages(after: Samples) -> list[Stage]:
    """Completion latency per complexity tier (adaptive precision routes tiers to different lanes)."""
    tiers = _label_values(after, "moe_request_latency_seconds_bucket", "tier")
    return [Stage(f"ingress e2e, tier={t} (all endpoints)", "moe_request_latency_seconds",
                  {"tier": t}) for t in tiers if len(tiers) > 1]


def breakdown(before: Samples, after: Samples) -> list[dict]:
    """One row per stage that saw observations during the window."""
    rows = []
    for stage in (*STAGES, *tier_stages(after)):
        h = histogram_delta(before, after, stage.metric, **stage.match)
        if not h.count:
            continue
        scale = 1000.0 if stage.unit_ms else 1.0
        rows.append({"stage": stage.name, "count": int(h.count), "mean": h.mean * scale,
                     "p50": h.quantile(0.5) * scale, "p80": h.quantile(0.8) * scale,
                     "p99": h.quantile(0.99) * scale, "unit": "ms" if stage.unit_ms else ""})
    gen = counter_delta(before, after, "moe_generation_tokens_total")
    prompt = counter_delta(before, after, "moe_prompt_tokens_total")
    queries = counter_delta(before, after, "moe_prefix_cache_queries_total")
    hits = counter_delta(before, after, "moe_prefix_cache_hits_total")
    finished = histogram_delta(before, after, "moe_engine_latency_seconds").count
    nan = math.nan
    if finished:
        for label, total in (("prompt tokens per request", prompt), ("generated tokens per request", gen)):
            rows.append({"stage": label, "count": int(finished), "mean": total / finished,
                         "p50": nan, "p80": nan, "p99": nan, "unit": "tok"})
    for tier in _label_values(after, "moe_tier_requests_total", "tier"):
        for precision in _label_values(after, "moe_tier_requests_total", "precision"):
            n = counter_delta(before, after, "moe_tier_requests_total", tier=tier, precision=precision)
            if n:
                rows.append({"stage": f"requests tier={tier} precision={precision}", "count": int(n),
                             "mean": nan, "p50": nan, "p80": nan, "p99": nan, "unit": ""})
    if queries:
        rows.append({"stage": "prefix cache hit rate (prompt tokens)", "count": int(queries),
                     "mean": hits / queries, "p50": nan, "p80": nan, "p99": nan, "unit": ""})
    return rows


def format_rows(rows: list[dict]) -> str:
    def num(x: float) -> str:
        return "-" if math.isnan(x) else f"{x:.2f}" if abs(x) < 100 else f"{x:.0f}"

    lines = [f"| {'stage':<42} | {'n':>7} | {'mean':>8} | {'p50':>8} | {'p80':>8} | {'p99':>8} | unit |",
             f"|{'-' * 44}|{'-' * 9}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 10}|------|"]
    for r in rows:
        lines.append(f"| {r['stage']:<42} | {r['count']:>7} | {num(r['mean']):>8} | {num(r['p50']):>8} | "
                     f"{num(r['p80']):>8} | {num(r['p99']):>8} | {r['unit']:<4} |")
    return "\n".join(lines)
