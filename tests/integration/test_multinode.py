"""The app on a real multi-node Ray cluster (cluster/local_cluster.py): a head and two workers,
each `ray start`ed on loopback, each worker advertising one fake GPU like a GPU pod under KubeRay.

This module's cluster is separate processes with its own ports and temp dir, so it lives beside
the session's single-node cluster (conftest.py); the one query that needs a Ray driver (shard
placement) runs in a child process, since one process can join only one cluster.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from serve_app import LLM, SamplingParams
from tests.helpers.engines import build_model_dir

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).resolve().parents[2] / "cluster" / "local_cluster.py"
PROMPTS = ["def add(a, b):\n", "class Point:\n    def __init__(self", "import os\n"]
ENGINE = dict(block_size=4, num_kv_blocks=1024, max_num_batched_tokens=128, long_prefill_chunk=64)
WORKERS = 2


def _load_cluster_module():
    spec = importlib.util.spec_from_file_location("local_cluster", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module            # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


local_cluster = _load_cluster_module()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    model_dir = build_model_dir(tmp_path_factory.mktemp("multinode-model"), "mixtral", num_local_experts=8)
    state_dir = tmp_path_factory.mktemp("multinode-cluster")
    try:
        local_cluster.up(state_dir, workers=WORKERS, gpus_per_worker=1)
        state = local_cluster.deploy(state_dir, {"model": str(model_dir), "expert_shards": WORKERS,
                                                 "engine": ENGINE, "served_model_name": "tiny"})
        done = subprocess.run([sys.executable, str(SCRIPT), "placement", "--state-dir", str(state_dir)],
                              capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-3000:]
        report = json.loads(done.stdout.strip().splitlines()[-1])
        yield SimpleNamespace(url=state.serve_url, model_dir=model_dir, report=report, state_dir=state_dir)
    finally:
        local_cluster.down(state_dir)


def test_each_shard_runs_on_a_worker_node_of_its_own(cluster):
    report = cluster.report
    local_cluster.check_spread(report)
    nodes = [s["node_id"] for s in report["shards"]]
    assert len(nodes) == WORKERS and len(set(nodes)) == WORKERS
    assert {report["nodes"][n] for n in nodes} == {"worker"}
    # Serve's own record agrees with what the shards report about themselves.
    assert sorted(nodes) == sorted(report["replicas"][f"ExpertShard{i}"][0] for i in range(WORKERS))


def test_ingress_and_router_stay_on_the_head(cluster):
    for name in ("Ingress", "Router"):
        assert [cluster.report["nodes"][n] for n in cluster.report["replicas"][name]] == ["head"]


def test_greedy_output_across_nodes_equals_single_process_output(cluster):
    expected = LLM(cluster.model_dir, **ENGINE).generate(PROMPTS, SamplingParams(max_tokens=16, temperature=0))
    for prompt, ref in zip(PROMPTS, expected):
        # Full precision: the classifier would send these short completions to the router's
        # INT8 lane, which never leaves the head node, and compare INT8 with full precision.
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 16, "temperature": 0, "precision": "full"}
        resp = httpx.post(f"{cluster.url}/v1/completions", json=body, timeout=60)
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-moe-precision"] == "full"
        assert resp.json()["choices"][0]["text"] == ref.outputs[0].text
        assert resp.json()["usage"]["completion_tokens"] == len(ref.outputs[0].token_ids)


def test_every_transport_across_nodes_equals_local_experts_in_float32(cluster):
    """The socket data plane and Serve handles, driver on the head, shards on the workers."""
    done = subprocess.run([sys.executable, "-m", "tests.helpers.cluster_transports", str(cluster.state_dir),
                           str(cluster.model_dir), str(WORKERS)], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"socket": True, "serve": True}


def _report(shard_nodes: list[str]) -> dict:
    roles = {"h": "head", "w1": "worker", "w2": "worker"}
    return {"nodes": roles, "shards": [{"shard": i, "node_id": n} for i, n in enumerate(shard_nodes)]}


@pytest.mark.parametrize("shard_nodes, problem", [
    (["w1", "w1"], "share a node"),
    (["w1", "h"], "not on worker nodes"),
    ([], "no expert shards"),
])
def test_spread_check_fails_when_shards_are_not_one_per_worker(shard_nodes, problem):
    with pytest.raises(local_cluster.ClusterError, match=problem):
        local_cluster.check_spread(_report(shard_nodes))
    local_cluster.check_spread(_report(["w1", "w2"]))
