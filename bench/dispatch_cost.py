"""Per-MoE-layer dispatch cost: router → expert shards → router, for each way of reaching a shard.

What is measured: the wall time of one `run_experts(x, plan)` call — build one request per shard,
send them all, wait for all, split the answers per expert — for a fixed DispatchPlan over x of
8×256 and 32×256 float32 token rows (top-2, so 16 and 64 expert rows leave the router), with the
experts placed round-robin on 1, 2 and 4 shards. `combine` (the weighted sum back in token order)
is the same for every transport and is left out. Ways of reaching the shards:

- in-process: `PartitionedBackend` over one `LocalExpertBackend` per shard (no hop; the FFN cost);
- socket / serve, inside a replica: a bench deployment holds a `SocketTransport` (the data plane,
  parallel/socket_plane.py) and a `ServeTransport` over the ExpertShard handles and times them on
  a plain thread, as the Router's engine loop calls them (DESIGN.md §2);
- socket / serve, from the driver: the same transports over handles the driver got from Serve;
- ray actor, compiled graph, gloo (from the driver): plain actors holding the same experts,
  reached by `.remote()` + `ray.get`, by a Ray Compiled Graph, or by torch.distributed over gloo
  (bench/dataplane_candidates.py).

"hop" = a method's median minus in-process's, same shape and shard count: what the transport
adds to the layer (with 2 and 4 shards the FFNs also run in parallel processes, so on more cores
than this machine's 2 it can come out below zero).

Why: expert parallelism puts this hop in every MoE layer of every decode step, and DESIGN.md §3
builds the placement strategy on these numbers; they must be reproducible on this machine.
Methods are measured in interleaved rounds (each round runs every method once per shape), so a
burst of load from other work on the machine hits all of them alike. Every remote method's
output is checked bit-identical to the in-process one.
"""
from __future__ import annotations

import os
import socket

# Serve reads these when its modules are imported, so they are set before `import ray`.
os.environ.setdefault("RAY_SERVE_ENABLE_DIRECT_INGRESS", "1")
os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "0")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from ray import serve  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from serve_app.deployments.expert_shard import ExpertShard  # noqa: E402
from serve_app.model import ModelConfig, PartitionedBackend, load_expert_weights  # noqa: E402
from serve_app.model.moe import DispatchPlan, route  # noqa: E402
from serve_app.parallel.placement import PlacementPlan, ShardSpec  # noqa: E402
from serve_app.parallel.socket_plane import SocketTransport  # noqa: E402
from serve_app.parallel.transport import ServeTransport  # noqa: E402
from bench.dataplane_candidates import (ActorTransport, CompiledGraphTransport, GlooTransport,  # noqa: E402
                                        ShardActor)

SHARD_COUNTS = (1, 2, 4)
ROW_COUNTS = (8, 32)
# The shape of bench/engine_throughput.py; one layer is enough, the hop does not see the others.
MODEL_SHAPE = dict(vocab_size=8192, hidden_size=256, num_hidden_layers=1, num_attention_heads=8,
                   num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                   intermediate_size=512, max_position_embeddings=2048)
# Every Serve replica and actor asks for a tenth of a CPU, as build_app does, so a 4-shard graph
# (and each candidate's own actors) fits on ray.init(num_cpus=8) whatever else this machine runs.
FRACTION = {"num_cpus": 0.1}
METHODS = ("in-process", "socket, inside a replica", "socket, from driver", "serve, inside a replica",
           "serve, from driver", "ray actor, from driver", "compiled graph, from driver", "gloo, from driver")


@dataclass(frozen=True)
class Case:
    rows: int                    # token rows entering the MoE layer (T)
    x: torch.Tensor              # [T, D]
    plan: DispatchPlan


def time_calls(fn, iters: int) -> list[float]:
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


# ---- the serve path from inside a replica -------------------------------------------------------

@serve.deployment(name="DispatchBench", max_ongoing_requests=4)
class DispatchBench:
    """Stands in for the Router: holds both product transports over the shard handles it was bound to."""

    def __init__(self, shards: list, placement: PlacementPlan):
        self.transports = {"serve": ServeTransport(shards, placement), "socket": SocketTransport(shards, placement)}

    async def measure(self, kind: str, x: torch.Tensor, plan: DispatchPlan, iters: int) -> tuple[list[float], dict]:
        # The transports block; like AsyncEngine, run them off the replica's event loop.
        transport = self.transports[kind]

        def loop():
            out = transport.run_experts(x, plan)
            return time_calls(lambda: transport.run_experts(x, plan), iters), out
        return await asyncio.to_thread(loop)


# ---- driver -------------------------------------------------------------------------------------

def build_cases(cfg: ModelConfig, seed: int = 0) -> list[Case]:
    gen = torch.Generator().manual_seed(seed)
    gate = torch.randn(cfg.num_experts, cfg.hidden_size, generator=gen)               # [E, D]
    cases = []
    for rows in ROW_COUNTS:
        x = torch.randn(rows, cfg.hidden_size, generator=gen)                          # [T, D]
        cases.append(Case(rows, x, route(x, gate, cfg.top_k, True, layer=cfg.moe_layers[0])))
    return cases


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def same(a: dict[int, torch.Tensor], b: dict[int, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[e], b[e]) for e in a)


def measure_shards(model_dir: str, cfg: ModelConfig, n: int, cases: list[Case], rounds: int,
                   iters: int) -> dict[tuple[str, int], list[float]]:
    """All methods for one shard count, in interleaved rounds; samples by (method, rows)."""
    placement = PlacementPlan.round_robin(cfg, n)
    local = PartitionedBackend([load_expert_weights(model_dir, spec.experts) for spec in placement.shards])
    shards = [ExpertShard.options(name=f"ExpertShard{s.index}", ray_actor_options=FRACTION)
              .bind(model_dir, s, "float32") for s in placement.shards]
    app = f"dispatch-{n}"
    bench = serve.run(DispatchBench.options(ray_actor_options=FRACTION).bind(shards, placement),
                      name=app, route_prefix=None)
    handles = [serve.get_deployment_handle(f"ExpertShard{i}", app) for i in range(n)]
    # Each candidate gets actors of its own: a compiled graph or a gloo loop owns its actors' threads.
    remote = {"socket, from driver": SocketTransport(handles, placement),
              "serve, from driver": ServeTransport(handles, placement),
              "ray actor, from driver": ActorTransport(_actors(model_dir, placement), placement),
              "compiled graph, from driver": CompiledGraphTransport(_actors(model_dir, placement), placement,
                                                                    cfg.hidden_size),
              "gloo, from driver": GlooTransport(_actors(model_dir, placement), placement, cfg.hidden_size,
                                                 cfg.num_experts, free_port())}
    samples: dict[tuple[str, int], list[float]] = {}
    try:
        for case in cases:
            want = local.run_experts(case.x, case.plan)
            for name, transport in remote.items():
                with opened(transport):
                    if not same(transport.run_experts(case.x, case.plan), want):
                        raise RuntimeError(f"{name}, {n} shards: outputs differ from in-process")
        for _ in range(rounds):
            for case in cases:
                with torch.inference_mode():
                    got = {"in-process": time_calls(lambda: local.run_experts(case.x, case.plan), iters)}
                for kind in ("socket", "serve"):
                    got[f"{kind}, inside a replica"], out = bench.measure.remote(
                        kind, case.x, case.plan, iters).result(timeout_s=300)
                    if not same(out, local.run_experts(case.x, case.plan)):
                        raise RuntimeError(f"{kind} inside a replica, {n} shards: outputs differ from in-process")
                for name, transport in remote.items():
                    with opened(transport):
                        got[name] = time_calls(lambda: transport.run_experts(case.x, case.plan), iters)
                for name, values in got.items():
                    samples.setdefault((name, case.rows), []).extend(values)
    finally:
        remote["gloo, from driver"].close()
        serve.delete(app)
        for transport in remote.values():
            for actor in getattr(transport, "actors", ()):
                ray.kill(actor)
    return samples


@contextlib.contextmanager
def opened(transport):
    """A candidate that must exist only while measured (a compiled graph) is opened around its use."""
    if hasattr(transport, "open"):
        transport.open()
    try:
        yield transport
    finally:
        if hasattr(transport, "open"):
            transport.close()


def _actors(model_dir: str, placement: PlacementPlan) -> list:
    return [ShardActor.remote(model_dir, s) for s in placement.shards]


def print_table(results: dict[int, dict[tuple[str, int], list[float]]], cases: list[Case]) -> None:
    print("\nexperts hit per plan (expert e lives on shard e % n): " + "; ".join(
        f"{c.rows} rows -> experts {c.plan.experts}" for c in cases))
    print("\nper MoE layer, router -> shards -> router: median / p90 ms")
    head = f"{'method':<26}{'rows':>5}" + "".join(f"{f'{n} shard' + ('s' if n > 1 else ''):>16}" for n in results)
    print(head)
    print("-" * len(head))
    for method in METHODS:
        for rows in ROW_COUNTS:
            cells = []
            for n, samples in results.items():
                s = np.array(samples[(method, rows)]) * 1e3
                cells.append(f"{np.median(s):.2f} / {np.percentile(s, 90):.2f}")
            print(f"{method:<26}{rows:>5}" + "".join(f"{c:>16}" for c in cells))
    print("\nhop: median minus in-process median, ms")
    print(head)
    print("-" * len(head))
    for method in METHODS[1:]:
        for rows in ROW_COUNTS:
            cells = [np.median(samples[(method, rows)]) - np.median(samples[("in-process", rows)])
                     for samples in results.values()]
            print(f"{method:<28}{rows:>3}" + "".join(f"{c * 1e3:>16.2f}" for c in cells))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 1 round of 20 calls per method")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per shard count")
    p.add_argument("--iters", type=int, default=100, help="timed calls per method per round")
    args = p.parse_args(argv)
    rounds, iters = (1, 20) if args.quick else (args.rounds, args.iters)
    torch.set_num_threads(1)        # as Ray gives a fractional-CPU worker; see docs/benchmarks.md

    from tests.helpers.checkpoints import build_checkpoint
    with tempfile.TemporaryDirectory(prefix="bench-dispatch-") as tmp:
        build_checkpoint(tmp, "mixtral", seed=0, **MODEL_SHAPE)
        cfg = ModelConfig.from_dir(tmp)
        cases = build_cases(cfg)
        # Workers import bench.dataplane_candidates' actor classes: they need the repository on their path.
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        results = {}
        try:
            for n in SHARD_COUNTS:
                start = time.monotonic()
                results[n] = measure_shards(tmp, cfg, n, cases, rounds, iters)
                print(f"{n} shard(s): {rounds} rounds x {iters} calls per method and shape in "
                      f"{time.monotonic() - start:.0f} s; load average {os.getloadavg()[0]:.1f}", flush=True)
        finally:
            serve.shutdown()
            ray.shutdown()
    print(f"\nRay {ray.__version__}, direct ingress {os.environ['RAY_SERVE_ENABLE_DIRECT_INGRESS']}, "
          f"{os.cpu_count()} cores, outputs of every transport bit-identical to in-process")
    print_table(results, cases)
    return 0


if __name__ == "__main__":
    sys.exit(main())
