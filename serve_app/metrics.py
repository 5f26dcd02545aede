"""Every metric of the system, defined once.

Two backends record the same definitions:
- `ray`: `ray.util.metrics`, used inside Serve replicas. Every replica's series reach the node's
  Ray metrics export port with its deployment/replica tags, so Prometheus sees all replicas (a
  `prometheus_client` registry per replica process would be invisible and would not aggregate).
  Ray prefixes exported names with `ray_`: `moe_requests_total` is scraped as `ray_moe_requests_total`.
- `prometheus`: a `prometheus_client` registry, for the embedded (no Ray) server and tests; its
  names are exactly those below, served at `/metrics`.
Names and meanings are documented in docs/metrics.md.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

# Latency buckets, seconds: fine between 5 ms and 200 ms, where the 50 ms inline-completion target
# lives, coarse outside it.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.02, 0.025, 0.03, 0.035, 0.04,
                   0.045, 0.05, 0.06, 0.07, 0.08, 0.1, 0.125, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass(frozen=True)
class MetricDef:
    name: str
    kind: str                       # "counter" | "gauge" | "histogram"
    description: str
    tags: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()  # histograms only


DEFINITIONS = [
    # Ingress (HTTP) side.
    MetricDef("moe_requests_total", "counter", "HTTP requests by endpoint, status code and tier",
              ("endpoint", "status", "tier")),
    MetricDef("moe_request_latency_seconds", "histogram", "End-to-end HTTP request latency",
              ("endpoint", "tier"), LATENCY_BUCKETS),
    MetricDef("moe_tier_requests_total", "counter", "Requests per complexity tier and precision",
              ("tier", "precision")),
    # Engine (router) side.
    MetricDef("moe_time_to_first_token_seconds", "histogram", "Arrival at the engine to first token",
              ("tier",), LATENCY_BUCKETS),
    MetricDef("moe_inter_token_latency_seconds", "histogram", "Time between a request's tokens",
              ("tier",), LATENCY_BUCKETS),
    MetricDef("moe_engine_latency_seconds", "histogram", "Arrival at the engine to the last token",
              ("tier",), LATENCY_BUCKETS),
    MetricDef("moe_queue_time_seconds", "histogram", "Arrival at the engine to first scheduling",
              ("tier",), LATENCY_BUCKETS),
    MetricDef("moe_prompt_tokens_total", "counter", "Prompt tokens of finished requests", ()),
    MetricDef("moe_generation_tokens_total", "counter", "Generated tokens of finished requests", ()),
    MetricDef("moe_requests_running", "gauge", "Sequences in the running batch", ()),
    MetricDef("moe_requests_waiting", "gauge", "Sequences waiting for admission", ()),
    MetricDef("moe_kv_blocks_used", "gauge", "KV cache blocks in use", ()),
    MetricDef("moe_kv_blocks_total", "gauge", "KV cache blocks in total", ()),
    MetricDef("moe_prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache", ()),
    MetricDef("moe_prefix_cache_hits_total", "counter", "Prompt tokens served from the prefix cache", ()),
    MetricDef("moe_step_seconds", "histogram", "Duration of one engine step (schedule+forward+sample)",
              (), LATENCY_BUCKETS),
    MetricDef("moe_batch_size", "histogram", "Sequences per engine step", (), BATCH_BUCKETS),
    MetricDef("moe_batch_tokens", "histogram", "Tokens per engine step", (), BATCH_BUCKETS),
    MetricDef("moe_expert_tokens_total", "counter", "Tokens routed to each (layer, expert)",
              ("layer", "expert")),
    MetricDef("moe_dispatch_latency_seconds", "histogram", "Router to shard and back, per shard per MoE layer",
              ("shard",), LATENCY_BUCKETS),
    MetricDef("moe_spec_verifications_total", "counter", "Sequences whose drafts one full-precision pass verified",
              ()),
    MetricDef("moe_spec_draft_tokens_total", "counter", "Draft tokens proposed by the quantized experts", ()),
    MetricDef("moe_spec_accepted_tokens_total", "counter", "Draft tokens kept by the verification", ()),
]
BY_NAME = {d.name: d for d in DEFINITIONS}


class _Recorder:
    """Record by name: `metrics.inc("moe_requests_total", endpoint=..., status=..., tier=...)`;
    subclasses say where a record goes (`_record`)."""

    def inc(self, name: str, value: float = 1.0, **tags) -> None:
        if value > 0:
            self._record("inc", name, value, tags)

    def set(self, name: str, value: float, **tags) -> None:
        self._record("set", name, value, tags)

    def observe(self, name: str, value: float, **tags) -> None:
        self._record("observe", name, value, tags)

    def _record(self, op: str, name: str, value: float, tags: dict) -> None:
        raise NotImplementedError


class Metrics(_Recorder):
    """Records into Ray's metrics or a prometheus-client registry."""

    def __init__(self, backend: str = "prometheus", registry=None):
        if backend not in ("ray", "prometheus"):
            raise ValueError(f"metrics backend must be 'ray' or 'prometheus', got {backend!r}")
        self.backend = backend
        self.registry = registry
        self._m = {d.name: self._make(d) for d in DEFINITIONS}

    def _make(self, d: MetricDef):
        if self.backend == "ray":
            from ray.util import metrics as rm
            if d.kind == "counter":
                return rm.Counter(d.name, d.description, tag_keys=d.tags)
            if d.kind == "gauge":
                return rm.Gauge(d.name, d.description, tag_keys=d.tags)
            return rm.Histogram(d.name, d.description, boundaries=list(d.buckets), tag_keys=d.tags)
        import prometheus_client as pc
        if self.registry is None:
            self.registry = pc.CollectorRegistry()
        # prometheus_client appends _total to counters itself.
        name = d.name.removesuffix("_total") if d.kind == "counter" else d.name
        cls = {"counter": pc.Counter, "gauge": pc.Gauge, "histogram": pc.Histogram}[d.kind]
        extra = {"buckets": d.buckets} if d.kind == "histogram" else {}
        return cls(name, d.description, labelnames=d.tags, registry=self.registry, **extra)

    def _target(self, name: str, tags: dict):
        metric = self._m[name]
        expected = BY_NAME[name].tags
        if set(tags) != set(expected):
            raise ValueError(f"{name} takes tags {expected}, got {sorted(tags)}")
        if self.backend == "prometheus":
            return metric.labels(**{k: str(v) for k, v in tags.items()}) if expected else metric
        return metric, ({k: str(v) for k, v in tags.items()} if expected else None)

    def _record(self, op: str, name: str, value: float, tags: dict) -> None:
        # Both libraries name the operations inc/set/observe; Ray takes the tags per call.
        target = self._target(name, tags)
        if self.backend == "prometheus":
            getattr(target, op)(value)
        else:
            getattr(target[0], op)(value, tags=target[1])

    def apply(self, records: list[tuple]) -> None:
        """Record what a `MetricsRelay` in another process collected, in its order."""
        for op, name, value, tags in records:
            self._record(op, name, value, tags)

    def exposition(self) -> bytes:
        """Prometheus text format of this registry (prometheus backend only)."""
        if self.backend != "prometheus":
            raise RuntimeError("the ray backend exports through Ray's metrics port, not here")
        import prometheus_client as pc
        return pc.generate_latest(self.registry)


class MetricsRelay(_Recorder):
    """`Metrics`' recording interface for a process that cannot export (the Router's engine
    process has no Ray worker): calls are kept in order and `drain()`ed to the parent, which
    `Metrics.apply`s them. Names and tags are checked here, where the call was made."""

    def __init__(self):
        self._records: list[tuple] = []
        self._lock = threading.Lock()       # lanes record from their own threads

    def _record(self, op: str, name: str, value: float, tags: dict) -> None:
        expected = BY_NAME[name].tags       # KeyError for an unknown name, as Metrics
        if set(tags) != set(expected):
            raise ValueError(f"{name} takes tags {expected}, got {sorted(tags)}")
        with self._lock:
            self._records.append((op, name, float(value), tags))

    def drain(self) -> list[tuple]:
        with self._lock:
            records, self._records = self._records, []
        return records


class EngineMetricsObserver:
    """Records an engine's StepStats (serve_app.engine.stats) into Metrics; the engine stays unaware
    of metrics libraries. Tier labels come from the request tag ("" → "none")."""

    # Per-expert counters are L×E series: batched and flushed at most this often, not every step.
    EXPERT_FLUSH_S = 1.0

    def __init__(self, metrics: Metrics):
        self.m = metrics
        self._gauges: dict[str, tuple[int, int, int, int]] = {}   # lane → running, waiting, kv used, kv total
        self._expert_pending = None                               # [layers, E] not yet recorded
        self._expert_total: dict[str, "torch.Tensor"] = {}        # lane → [layers, E] since start (expert_load)
        self._expert_flushed = 0.0
        self._lock = threading.Lock()       # lanes (engine threads) share one observer

    def lane(self, name: str) -> "_LaneObserver":
        """An observer for one of several engines in a process (precision lanes): gauges are the
        sum over lanes, everything else is recorded as is."""
        return _LaneObserver(self, name)

    def on_step(self, stats, lane: str = "") -> None:
        m = self.m
        m.observe("moe_step_seconds", stats.duration_s)
        m.observe("moe_batch_size", stats.num_seqs)
        m.observe("moe_batch_tokens", stats.num_tokens)
        # Update and publish under one lock: lanes step in their own threads, and a lane that summed
        # the totals before the other's update must not publish after it (the gauges would stay
        # stale once both go idle).
        with self._lock:
            self._gauges[lane] = (stats.num_running, stats.num_waiting, stats.kv_blocks_used, stats.kv_blocks_total)
            totals = [sum(g[i] for g in self._gauges.values()) for i in range(4)]
            for name, value in zip(("moe_requests_running", "moe_requests_waiting", "moe_kv_blocks_used",
                                    "moe_kv_blocks_total"), totals):
                m.set(name, value)
        m.inc("moe_prefix_cache_queries_total", stats.prefix_queries)
        m.inc("moe_prefix_cache_hits_total", stats.prefix_hits)
        for t in stats.token_timings:
            name = "moe_time_to_first_token_seconds" if t.first else "moe_inter_token_latency_seconds"
            m.observe(name, t.seconds, tier=t.tag or "none")
        for out in stats.finished:
            times, tier = out.times, out.tag or "none"
            if times.first_scheduled is not None:
                m.observe("moe_queue_time_seconds", times.first_scheduled - times.arrival, tier=tier)
            if times.finished is not None:
                m.observe("moe_engine_latency_seconds", times.finished - times.arrival, tier=tier)
            m.inc("moe_prompt_tokens_total", len(out.prompt_token_ids))
            m.inc("moe_generation_tokens_total", sum(len(c.token_ids) for c in out.outputs))
        if (spec := stats.speculative) is not None and spec.sequences:
            m.inc("moe_spec_verifications_total", spec.sequences)
            m.inc("moe_spec_draft_tokens_total", spec.drafted)
            m.inc("moe_spec_accepted_tokens_total", spec.accepted)
        if stats.expert_tokens is not None:
            with self._lock:
                pending, total = self._expert_pending, self._expert_total.get(lane)
                self._expert_pending = stats.expert_tokens if pending is None else pending + stats.expert_tokens
                self._expert_total[lane] = stats.expert_tokens.clone() if total is None else total + stats.expert_tokens
            if time.monotonic() - self._expert_flushed >= self.EXPERT_FLUSH_S or stats.num_running == 0:
                self.flush_expert_tokens()

    def expert_load(self, lane: str = "full") -> "torch.Tensor | None":
        """[layers, E] tokens one lane routed to each (layer, expert) since start, None before any
        (the Router's re-placement: the full lane is the one whose rows cross to the shards; its
        INT8 draft passes count too, routing the same text)."""
        with self._lock:
            total = self._expert_total.get(lane)
            return None if total is None else total.clone()

    def flush_expert_tokens(self) -> None:
        with self._lock:
            pending, self._expert_pending = self._expert_pending, None
            self._expert_flushed = time.monotonic()
        if pending is None:
            return
        for layer, row in enumerate(pending.tolist()):
            for expert, count in enumerate(row):
                self.m.inc("moe_expert_tokens_total", count, layer=layer, expert=expert)

    def on_dispatch(self, record) -> None:
        """ServeTransport callback: one shard round trip (serve_app.parallel.transport.DispatchRecord)."""
        self.m.observe("moe_dispatch_latency_seconds", record.seconds, shard=record.shard)


class _LaneObserver:
    def __init__(self, parent: EngineMetricsObserver, lane: str):
        self.parent, self.name = parent, lane

    def on_step(self, stats) -> None:
        self.parent.on_step(stats, lane=self.name)
