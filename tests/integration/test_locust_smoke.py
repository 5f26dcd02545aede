"""The load test itself is tested: its workloads cut sensible requests, its server-side breakdown
computes quantiles like Prometheus, and a short headless run against the embedded server writes
every output with no failed request.

The smoke does not check the 50 ms target: CI machines vary. It runs the SLO runner the way a
person would (a subprocess, against a server in another process) for ~20 s.
"""
from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import servers
from tests.helpers.engines import build_model_dir

ROOT = Path(__file__).resolve().parents[2]
LOADTESTS = ROOT / "loadtests"
sys.path.insert(0, str(LOADTESTS))

import breakdown  # noqa: E402
import workloads as wl  # noqa: E402

# The tiny test tokenizer is byte-level (~1 token per character) and the tiny model has 512
# positions: small windows keep prompt + completion inside them.
SMALL = wl.WorkloadConfig(max_prefix_chars=200, max_suffix_chars=80, min_tokens=4, max_tokens=8,
                          chat_max_tokens=8, min_session_requests=2, max_session_requests=3, chat_users=1)


def test_fim_cuts_are_windows_around_a_cursor_in_real_source():
    rng, pool = random.Random(0), wl.SourcePool(max_files=50)
    for _ in range(20):
        text = pool.text(rng)
        cut = wl.fim_cut(text, rng, SMALL)
        assert 0 < len(cut.prefix) <= SMALL.max_prefix_chars and len(cut.suffix) <= SMALL.max_suffix_chars
        assert cut.prefix + cut.suffix in text                     # contiguous: the cursor sits between them


def test_hole_sessions_grow_the_prefix_over_a_fixed_suffix():
    rng, pool = random.Random(1), wl.SourcePool(max_files=50)
    cfg = wl.WorkloadConfig()
    for _ in range(10):
        text = pool.text(rng)
        session = wl.hole_session(text, rng, cfg)
        assert 1 <= len(session) <= cfg.max_session_requests
        assert len({cut.suffix for cut in session}) == 1            # typing never moves the text after the hole
        for before, after in zip(session, session[1:]):
            assert after.prefix.startswith(before.prefix)           # same window start: prefix-cache reuse
            assert 1 <= len(after.prefix) - len(before.prefix) <= cfg.max_chars_per_keystroke
        last = session[-1]
        assert text.find(last.prefix) >= 0 and last.suffix in text  # typed what the file says there
        assert text.index(last.suffix, text.find(last.prefix)) >= text.find(last.prefix) + len(last.prefix)
    sizes = [len(wl.hole_session(pool.text(rng), rng, cfg)) for _ in range(30)]
    assert max(sizes) >= cfg.min_session_requests


def test_prompt_windows_fit_the_token_budget_with_a_tokenizer():
    from tokenizers import Tokenizer

    from serve_app.config import default_model_dir

    path = str(Path(default_model_dir()) / "tokenizer.json")
    tok, rng, pool = Tokenizer.from_file(path), random.Random(2), wl.SourcePool(max_files=200)
    cfg = wl.WorkloadConfig(tokenizer=path, max_prompt_tokens=120, max_prefix_chars=2000)
    for _ in range(20):
        for cut in [wl.fim_cut(pool.text(rng), rng, cfg)]:
            assert len(tok.encode(cut.prefix + cut.suffix).ids) <= cfg.max_prompt_tokens or not cut.prefix.strip()


def test_workload_config_round_trips_through_the_environment():
    assert wl.WorkloadConfig.from_env(SMALL.to_env()) == SMALL
    with pytest.raises(ValueError, match="MOE_LT_MAX_TOKENS"):
        wl.WorkloadConfig.from_env({"MOE_LT_MAX_TOKENS": "many"})


def test_breakdown_quantiles_interpolate_like_histogram_quantile():
    text = ("# TYPE ray_moe_step_seconds histogram\n"
            'ray_moe_step_seconds_bucket{le="0.01"} 10\nray_moe_step_seconds_bucket{le="0.02"} 30\n'
            'ray_moe_step_seconds_bucket{le="+Inf"} 40\nray_moe_step_seconds_count 40\n'
            "ray_moe_step_seconds_sum 0.6\n")
    h = breakdown.histogram_delta({}, breakdown.parse(text), "moe_step_seconds")     # ray_ prefix stripped
    assert h.count == 40 and math.isclose(h.mean, 0.015)
    assert math.isclose(h.quantile(0.25), 0.01)                    # rank 10: top of the first bucket
    assert math.isclose(h.quantile(0.5), 0.015)                    # rank 20: halfway through the second
    assert h.quantile(0.99) == 0.02                                # in +Inf: the last finite bound


@pytest.fixture(scope="module")
def embedded_server(tmp_path_factory):
    model_dir = build_model_dir(tmp_path_factory.mktemp("smoke-model"), "mixtral", num_local_experts=8)
    with servers.embedded_server(tmp_path_factory.mktemp("smoke-server") / "server.log", "--model", str(model_dir),
                                 timeout_s=120) as url:
        yield url


@pytest.mark.integration
def test_slo_runner_smoke_writes_every_output_without_failures(embedded_server, tmp_path):
    out = tmp_path / "run"
    workload = [f"--{k.removeprefix('MOE_LT_').lower().replace('_', '-')}={v}" for k, v in SMALL.to_env().items()]
    cmd = [sys.executable, str(LOADTESTS / "run_slo.py"), "--host", embedded_server, "--users", "4",
           "--spawn-rate", "4", "--run-time", "20s", "--out", str(out), "--failures-only",
           "--label", "smoke", *workload]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=150,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("locust_stats.csv", "locust_stats_history.csv", "locust_failures.csv", "report.html",
                 "requests.csv", "latency.png", "summary.json", "breakdown.md"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    inline = summary["stats"]["inline (all FIM)"]
    assert inline["count"] > 0 and inline["failures"] == 0
    assert all(s["failures"] == 0 for s in summary["stats"].values())
    assert set(summary["stats"]) - {"inline (all FIM)"} <= {*wl.INLINE, wl.TTFT_FIM_STREAM, wl.CHAT}
    assert summary["slo_met"] and summary["plot"]
    assert "SLO met" in proc.stdout
    # Answered inline requests logged their usage; keystrokes after a session's first hit the cache.
    cached = summary["cached_share"]
    assert cached["all"]["requests"] >= inline["count"] // 2 and 0 < cached["after_first"]["share"] <= 1, cached
    stages = {row["stage"] for row in summary["server_breakdown"]}
    assert "engine: time to first token" in stages                   # the server's /metrics was read
