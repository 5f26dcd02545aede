"""A real Prometheus scraping the Ray deployment: the PromQL of docs/metrics.md and the Grafana
dashboard works on what the system actually exports.

Prometheus (Debian's `prometheus` binary) runs on loopback with a generated config that scrapes,
every 5 seconds, each Ray node's metrics export port (job "ray") and the Ingress' own /metrics (job
"ingress", which relays its node's export: same series, so queries pick one job). Ray flushes
metrics from workers to the export every few seconds, so every check polls with a bounded wait.
"""
from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from serve_app.config import AppConfig
from tests.helpers.engines import build_model_dir
from tests.helpers.servers import stop_process
from tests.integration.conftest import wait_for_health

PROMETHEUS = shutil.which("prometheus")
pytestmark = [pytest.mark.integration, pytest.mark.skipif(
    PROMETHEUS is None, reason="PROMETHEUS NOT INSTALLED: `apt-get install -y prometheus` (.ci/run does); "
                               "the real-Prometheus checks did not run")]

# This module and test_serve_app.py both deploy "moe-serve" on the session's one direct-ingress
# port, so the port must be free again when this module is done: Ray Serve 2.60 quarantines a
# released port and binds without SO_REUSEADDR; cli.direct_ingress_env and
# deployments/direct_ingress.py undo both (the chaos soak found them), and teardown still waits
# until the port binds.

ENGINE = dict(block_size=4, num_kv_blocks=1024, max_num_batched_tokens=128, long_prefill_chunk=64)
P80_FIM = ('histogram_quantile(0.8, sum(rate(ray_moe_request_latency_seconds_bucket'
           '{job="ray",endpoint="/v1/fim/completions"}[1m])) by (le))')
EXPERT_LOAD = 'sum by (layer, expert) (ray_moe_expert_tokens_total{job="ray"})'
WAIT_S = 120.0       # Ray's export delay plus a loaded 2-core machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen
    log: Path

    def query(self, promql: str) -> list[dict]:
        """Instant query; the `result` list of /api/v1/query (vector samples)."""
        qs = urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{qs}", timeout=10) as resp:
            body = json.loads(resp.read())
        assert body["status"] == "success", body
        return body["data"]["result"]

    def scalar(self, promql: str) -> float | None:
        """The single value of a one-sample query; None while it has no sample."""
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, promql: str, ok, timeout_s: float = WAIT_S):
        """Poll `promql` until ok(result) is true; returns that result."""
        deadline, result = time.monotonic() + timeout_s, None
        while time.monotonic() < deadline:
            result = self.query(promql)
            if ok(result):
                return result
            time.sleep(1.0)
        raise AssertionError(f"after {timeout_s:.0f}s, {promql!r} still gives {result!r}; "
                             f"prometheus log: {self.log.read_text()[-2000:]}")


def _config(ray_targets: list[str], ingress_target: str) -> str:
    jobs = [("ray", ray_targets), ("ingress", [ingress_target])]
    # A scrape may take seconds: on a slow 2-core VM, after the chaos soak, Ray's export (and the
    # Ingress relaying it) missed a 1 s scrape timeout for the module's whole 120 s wait.
    lines = ["global:", "  scrape_interval: 5s", "  scrape_timeout: 5s", "  evaluation_interval: 1s",
             "scrape_configs:"]
    for job, targets in jobs:
        lines += [f"  - job_name: {job}", "    static_configs:", f"      - targets: {json.dumps(targets)}"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def app(ray_cluster, base_url, tmp_path_factory):
    """The whole graph (Ingress → Router → 2 shards) under the session's one public route."""
    from ray import serve

    from serve_app.deployments.app import build_app

    model_dir = build_model_dir(tmp_path_factory.mktemp("prom-model"), "mixtral", num_local_experts=8)
    config = AppConfig(model=str(model_dir), expert_shards=2, engine=ENGINE, served_model_name="tiny")
    serve.run(build_app(config), name="moe-serve", route_prefix="/")
    _wait_healthy_keepalive(base_url)
    yield base_url
    serve.delete("moe-serve")
    port = urllib.parse.urlparse(base_url).port
    if not _wait_bindable(port, timeout_s=90):
        warnings.warn(f"direct-ingress port {port} still taken after deleting the app; "
                      "a later module deploying on it will fail")


def _wait_healthy_keepalive(url: str, timeout_s: float = 120.0) -> None:
    """conftest.wait_for_health over one kept-alive connection: urllib sends `Connection: close`,
    which makes the server close first and leaves the port in TIME_WAIT (see the top of the module)."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=5) as client:
        while time.monotonic() < deadline:
            try:
                if client.get(f"{url}/health").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
    wait_for_health(url, timeout_s=1)          # raises with the last error


def _wait_bindable(port: int, timeout_s: float) -> bool:
    """True once a plain bind (no SO_REUSEADDR, as Ray Serve's) on the port succeeds."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return True
            except OSError:
                pass
        time.sleep(1.0)
    return False


@pytest.fixture(scope="module")
def prometheus(app, ray_cluster, tmp_path_factory):
    ray_targets = [f"{n['NodeManagerAddress']}:{n['MetricsExportPort']}" for n in ray_cluster.nodes() if n["Alive"]]
    work = tmp_path_factory.mktemp("prometheus")
    (work / "prometheus.yml").write_text(_config(ray_targets, urllib.parse.urlparse(app).netloc))
    port = _free_port()
    log = work / "prometheus.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [PROMETHEUS, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=out, stderr=subprocess.STDOUT)
    prom = Prometheus(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"prometheus did not start: {log.read_text()[-2000:]}") from None
            time.sleep(0.25)
        yield prom
    finally:
        stop_process(process)


class Traffic:
    """FIM requests (every fourth streamed) from a background thread until stopped; counts 200s."""

    def __init__(self, url: str):
        self.url, self.ok, self.failed = url, 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=60) as client:
            i = 0
            while not self._stop.is_set():
                body = {"prefix": f"def f{i}(x):\n    ", "suffix": "\n    return y\n", "max_tokens": 6,
                        "temperature": 0, "stream": i % 4 == 3}
                resp = client.post(f"{self.url}/v1/fim/completions", json=body)
                _ = resp.text                       # a streamed body is read to its end
                if resp.status_code == 200:
                    self.ok += 1
                else:
                    self.failed.append((resp.status_code, resp.text[:200]))
                i += 1
                time.sleep(0.05)

    def __enter__(self) -> "Traffic":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=120)


def _sum(prom: Prometheus, promql: str) -> float:
    value = prom.scalar(f"sum({promql}) or vector(0)")
    return 0.0 if value is None else value


def test_both_scrape_targets_are_up(prometheus):
    up = prometheus.wait_for("up", lambda r: len(r) >= 2 and all(s["value"][1] == "1" for s in r))
    assert {s["metric"]["job"] for s in up} == {"ray", "ingress"}


def test_latency_quantile_and_request_count_reach_prometheus(prometheus, app):
    selector = 'ray_moe_requests_total{job="ray",endpoint="/v1/fim/completions",status="200"}'
    before = _sum(prometheus, selector)       # a previous app's series may linger in Ray's export
    with Traffic(app) as traffic:
        # rate() needs two scrapes that differ, so traffic runs until the quantile exists.
        result = prometheus.wait_for(P80_FIM, lambda r: r and math.isfinite(float(r[0]["value"][1])))
    p80 = float(result[0]["value"][1])
    assert not traffic.failed and traffic.ok >= 2
    assert 0 < p80 < 60                       # seconds: a real latency, inside the histogram's range
    prometheus.wait_for(f"sum({selector})", lambda r: r and float(r[0]["value"][1]) - before == traffic.ok)
    # The Ingress relays the same export under its own /metrics.
    relayed = selector.replace('job="ray"', 'job="ingress"')
    prometheus.wait_for(f"sum({relayed})",
                        lambda r: r and float(r[0]["value"][1]) >= traffic.ok)


def test_expert_counters_cover_every_layer_with_equal_token_counts(prometheus, app):
    with Traffic(app) as traffic:
        time.sleep(2.0)
    assert traffic.ok and not traffic.failed
    per = prometheus.wait_for(EXPERT_LOAD, lambda r: {s["metric"]["layer"] for s in r} == {"0", "1"})
    # Settle: Ray exports the last step's counts a flush later; equal sums per layer once it has.
    deadline = time.monotonic() + WAIT_S
    while True:
        per = prometheus.query(EXPERT_LOAD)
        by_layer: dict[str, float] = {}
        for s in per:
            by_layer[s["metric"]["layer"]] = by_layer.get(s["metric"]["layer"], 0.0) + float(s["value"][1])
        if len(set(by_layer.values())) == 1 or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    # Every token passes every MoE layer and goes to top-2 experts: same even total in each layer.
    assert len(set(by_layer.values())) == 1, by_layer
    total = next(iter(by_layer.values()))
    assert total > 0 and total % 2 == 0
    assert {int(s["metric"]["expert"]) for s in per} <= set(range(8))
    # The dashboard's heatmap query: each expert's share of its layer's tokens.
    share = prometheus.query(f"{EXPERT_LOAD} / ignoring(expert) group_left sum by (layer) "
                             f'(ray_moe_expert_tokens_total{{job="ray"}})')
    assert math.isclose(sum(float(s["value"][1]) for s in share), 2.0, rel_tol=1e-6)   # 1.0 per layer


def test_dispatch_latency_per_shard_reaches_prometheus(prometheus, app):
    # Full precision runs the experts on the shards (quantized tiers stay in the router).
    with httpx.Client(timeout=60) as client:
        for i in range(3):
            resp = client.post(f"{app}/v1/fim/completions", json={
                "prefix": f"def g{i}(x):\n    ", "max_tokens": 4, "temperature": 0, "precision": "full"})
            assert resp.status_code == 200 and resp.headers["x-moe-precision"] == "full", resp.text
    per_shard = prometheus.wait_for(
        'sum by (shard) (ray_moe_dispatch_latency_seconds_count{job="ray"})',
        lambda r: {s["metric"]["shard"] for s in r} == {"0", "1"} and all(float(s["value"][1]) > 0 for s in r))
    assert len(per_shard) == 2
    p99 = prometheus.scalar('histogram_quantile(0.99, sum by (le) (ray_moe_dispatch_latency_seconds_bucket{job="ray"}))')
    assert p99 is not None and 0 < p99 < 10            # seconds; the dispatch timeout is 10 s
