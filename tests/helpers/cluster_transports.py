"""`compare_transports`: every transport against the local experts (tests/integration/test_transports.py).

Run as a child process by tests/integration/test_multinode.py (one process joins one Ray cluster):
joins the multi-node cluster in STATE_DIR as a driver, reaches its ExpertShard replicas on the
worker nodes through each transport, and prints, as JSON, whether every transport's float32
output equals the local experts' for a few layers' plans.

    python -m tests.helpers.cluster_transports STATE_DIR MODEL_DIR NUM_SHARDS
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "cluster" / "local_cluster.py"


def compare_transports(whole, handles: list, plan, seed: int, rows=(1, 9, 40)) -> dict[str, bool]:
    """{transport: every layer's output for random rows equals `whole`'s local experts, bit for bit},
    for the socket data plane and Serve handles over the shard `handles`."""
    from serve_app.parallel.socket_plane import SocketTransport
    from serve_app.parallel.transport import ServeTransport

    transports = {"socket": SocketTransport(handles, plan, timeout_s=60),
                  "serve": ServeTransport(handles, plan, timeout_s=60)}
    equal = {name: True for name in transports}
    gen = torch.Generator().manual_seed(seed)
    for n in rows:
        x = torch.randn(n, whole.config.hidden_size, generator=gen)
        for layer in (l for l in whole.layers if hasattr(l.mlp, "plan")):
            dispatch = layer.mlp.plan(x)
            want = whole.local_experts.run_experts(x, dispatch)
            for name, transport in transports.items():
                got = transport.run_experts(x, dispatch)
                equal[name] &= got.keys() == want.keys() and all(torch.equal(got[e], want[e]) for e in want)
    transports["socket"].close()
    return equal


def main(state_dir: str, model_dir: str, num_shards: int) -> dict:
    spec = importlib.util.spec_from_file_location("local_cluster", SCRIPT)
    local_cluster = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = local_cluster
    spec.loader.exec_module(local_cluster)
    state = local_cluster.ClusterState.load(state_dir)
    os.environ.update(state.auth_env())
    import ray
    from ray import serve

    from serve_app.config import AppConfig
    from serve_app.model import load_model
    from serve_app.parallel.placement import PlacementPlan

    torch.set_num_threads(AppConfig().torch_threads)     # as the shards compute (bit-exact sums)
    whole = load_model(model_dir)
    plan = PlacementPlan.round_robin(whole.config, num_shards)
    ray.init(address=state.gcs_address, log_to_driver=False, logging_level="ERROR")
    try:
        handles = [serve.get_deployment_handle(f"ExpertShard{i}", app_name=local_cluster.APP_NAME)
                   for i in range(num_shards)]
        equal = compare_transports(whole, handles, plan, seed=0)
    finally:
        ray.shutdown()
    return equal


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
