"""The chaos soak (loadtests/chaos.py): its judge, and a short soak on a real Ray app in CI.

The short soak runs the editor workload (4 Locust users, a tiny model, half the requests full
precision so they cross the shards) for 45 s and kills an ExpertShard, the Router and the
Ingress replica in turn, through the front (serve_app/front) as `moe-serve` serves; every request
must be answered (200; 429/503 with Retry-After; a stream's in-band error; no connection lost, not
even while no Ingress process exists), every fault must recover, Serve must have replaced each killed replica, and the KV cache must drain when idle.
The longer run on the bundled model is in docs/benchmarks.md.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

from serve_app.cli import free_port
from serve_app.config import AppConfig
from serve_app.front.server import FrontConfig, FrontServer
from tests.helpers.engines import build_model_dir
from tests.integration.conftest import wait_for_health

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "loadtests"))

import chaos  # noqa: E402
import workloads as wl  # noqa: E402

TIMEOUT_S = 30.0


def _row(start: float, ms: float, status: str, ok: str = "1", retry_after: str = "", error: str = "",
         name: str = wl.FIM) -> dict:
    return {"name": name, "start": start, "ms": ms, "end": start + ms / 1000, "status": status, "ok": ok,
            "retry_after": retry_after, "error": error}


def test_judge_accepts_answers_and_names_every_other_outcome():
    faults = [chaos.Fault("Router", "r", at=100.0), chaos.Fault("Ingress", "i", at=200.0)]
    rows = [_row(90, 50, "200"),
            _row(99.5, 900, "503", "0", retry_after="1"),              # in flight at the Router kill
            _row(101, 20, "429", "0", retry_after="1"),
            _row(102, 30, "200", "0", error="backend unavailable", name=wl.FIM_STREAM),   # in-band
            _row(104, 50, "200"),                                        # Router back
            _row(199.9, 200, "0", "0"),                                  # cut with the Ingress process
            _row(201, 1, "0", "0"),                                      # no listener while it restarts
            _row(205, 40, "200"),                                        # Ingress back
            _row(206, 1, "0", "0"),                                      # refused after it was back
            _row(207, 10, "503", "0"),                                   # no Retry-After
            _row(208, 10, "500", "0"),
            _row(209, 10, "200", "0", error="stream broken: reset", name=wl.FIM_STREAM),
            _row(210, 45_000, "200"),                                    # longer than the timeout
            _row(211, 50_000, "open", "0"),                              # never answered
            _row(250, 5_000, "open", "0"),                               # cut by the end of the run
            _row(212, 5, "200", name=wl.TTFT_FIM_STREAM)]                # a statistic: not judged
    verdict = chaos.judge(rows, faults, TIMEOUT_S)
    # A connection lost with the Ingress is a violation: the front answers 503 + Retry-After instead.
    assert verdict.outcomes == {"ok": 3, "refused": 2, "in-band": 1, "transport": 4,
                                "no-retry-after": 1, "http-500": 1, "slow": 1, "hang": 1, "cut": 1}
    kinds = sorted(v.split(":")[0] for v in verdict.violations)
    assert kinds == ["hang", "http-500", "no-retry-after", "slow"] + ["transport"] * 4
    router, ingress = verdict.faults
    assert (router.failed, router.recovered) == (3, True) and router.recover_s == pytest.approx(2.03, abs=0.01)
    assert ingress.recovered is False          # nothing after its last failure (the 500 at 208) got a 200
    verdict.kv_after = {"used_blocks": 0}
    assert not verdict.ok


def test_judge_passes_a_clean_run():
    faults = [chaos.Fault("ExpertShard0", "s", at=10.0)]
    verdict = chaos.judge([_row(9.9, 300, "503", "0", retry_after="1"), _row(11, 50, "200")], faults, TIMEOUT_S)
    verdict.kv_after = {"used_blocks": 0}
    assert verdict.ok and verdict.faults[0].recover_s == pytest.approx(0.2)
    verdict.kv_after = {"used_blocks": 3}
    assert not verdict.ok                      # blocks held after the run: a leak


@pytest.fixture(scope="module")
def app(ray_cluster, base_url, tmp_path_factory):
    from ray import serve

    from serve_app.deployments.app import build_app

    model_dir = build_model_dir(tmp_path_factory.mktemp("chaos"), "mixtral", num_local_experts=4)
    engine = dict(block_size=4, num_kv_blocks=1024, max_num_batched_tokens=128, long_prefill_chunk=64)
    config = AppConfig(model=str(model_dir), expert_shards=2, engine=engine, request_timeout_s=TIMEOUT_S - 10)
    serve.run(build_app(config), name=chaos.APP_NAME, route_prefix="/")
    wait_for_health(base_url)
    # The session's Ingress listens on base_url's port (the shared cluster's direct-ingress range);
    # the front takes a public port of its own in front of it, as `moe-serve` does.
    relay = FrontConfig.from_app(config).relay
    relay = dataclasses.replace(relay, upstream_ports=(int(base_url.rsplit(":", 1)[1]),))
    with FrontServer(FrontConfig("127.0.0.1", free_port(), relay)) as front:
        wait_for_health(front.url)
        yield front.url
    serve.delete(chaos.APP_NAME)


@pytest.mark.integration
def test_short_chaos_soak_answers_every_request_and_recovers(app, tmp_path):
    workload = wl.WorkloadConfig(max_prefix_chars=200, max_suffix_chars=80, min_tokens=4, max_tokens=12,
                                 min_session_requests=4, max_session_requests=8, full_precision_share=0.5,
                                 timeout_s=TIMEOUT_S)
    verdict = chaos.run_soak(app, tmp_path / "soak", users=4, run_time_s=60, faults=chaos.DEPLOYMENTS,
                             workload=workload)
    print(chaos.report(verdict))
    assert verdict.ok, chaos.report(verdict)
    assert verdict.outcomes["ok"] > 50
    assert [f.deployment for f in verdict.faults] == list(chaos.DEPLOYMENTS)
    for fault in verdict.faults:                # Serve replaced each killed replica
        live = chaos.replica_actors(fault.deployment)
        assert live and all(chaos.actor_id(*a) != fault.actor_id for a in live)
        assert fault.recover_s < 30
    assert (tmp_path / "soak" / "summary.json").is_file()
