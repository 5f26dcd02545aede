"""Data-plane candidates that bench/dispatch_cost.py measures beside Serve handles and our socket plane.

Each is the ExpertBackend protocol (`run_experts(x, plan)`) over plain Ray actors that hold the
same experts as the ExpertShard replicas, so the only difference between rows of the table is
how a layer's rows get to the shards and back:

- plain actor calls: `.remote()` per shard, `ray.get` all (the object store and Ray's RPC);
- Ray Compiled Graph: one compiled DAG over the shard actors, executed once per layer
  (Ray's shared-memory channels on one node);
- torch.distributed (gloo): a process group of the driver and the shard actors; per layer a
  fixed-size header and the rows `isend` to each shard, the answers `irecv`'d.

Only the socket plane went into the product (docs/architecture.md says why); these stay here,
runnable, so the choice can be re-measured on other hardware.

Legend: R=rows for one shard, D=hidden, E=experts per layer.
"""
from __future__ import annotations

import ray
import torch

from serve_app.model import load_expert_weights
from serve_app.model.moe import DispatchPlan
from serve_app.parallel.placement import PlacementPlan, ShardSpec
from serve_app.parallel.transport import Replies, ShardRequest, build_requests, run_shard_request

FRACTION = {"num_cpus": 0.1}


@ray.remote(**FRACTION)
class ShardActor:
    """A shard as a plain actor: the same experts and the same `run_shard_request` as ExpertShard."""

    def __init__(self, model_dir: str, spec: ShardSpec):
        torch.set_num_threads(1)
        self.backend = load_expert_weights(model_dir, spec.experts)

    def run(self, req: ShardRequest) -> torch.Tensor:
        with torch.inference_mode():
            return run_shard_request(self.backend, req)

    # ---- gloo ----
    def join_group(self, address: str, rank: int, world: int) -> None:
        import torch.distributed as dist
        dist.init_process_group("gloo", init_method=address, rank=rank, world_size=world)

    def serve_gloo(self, header_len: int, hidden: int) -> None:
        """Serve layers from rank 0 until a header with layer -1 arrives."""
        import torch.distributed as dist
        header = torch.empty(header_len, dtype=torch.int64)
        with torch.inference_mode():
            while True:
                dist.recv(header, src=0)
                layer, n, rows = (int(v) for v in header[:3])
                if layer < 0:
                    return
                x = torch.empty(rows, hidden)
                dist.recv(x, src=0)
                ids = header[3:3 + 2 * n].tolist()
                y = run_shard_request(self.backend, ShardRequest(layer, ids[:n], ids[n:], x))
                dist.send(y.contiguous(), dst=0)


class ActorTransport:
    """Plain actor calls: one `.remote()` per shard, all in flight, then `ray.get`."""

    def __init__(self, actors: list, placement: PlacementPlan):
        self.actors, self.owner = actors, placement.holders()

    def run_experts(self, x: torch.Tensor, plan: DispatchPlan) -> dict[int, torch.Tensor]:
        requests = build_requests(x, plan, self.owner)
        refs = [self.actors[shard].run.remote(req) for shard, (req, _) in requests.items()]
        out = Replies()
        for (_, assigns), y in zip(requests.values(), ray.get(refs)):
            out.add(y, assigns)
        return out.outputs()


class CompiledGraphTransport:
    """One Ray Compiled Graph over all shard actors; a layer that skips a shard sends it no rows.

    Compiled only while it is measured (`open` ... `close`): an actor of a compiled graph
    busy-waits on its input channel, ~0.5 core each even when idle (measured: 2-3 CPU s per 5 s
    per actor), which on 2 cores would slow every other method measured beside it."""

    def __init__(self, actors: list, placement: PlacementPlan, hidden: int):
        self.actors, self.owner, self.hidden, self.n = actors, placement.holders(), hidden, len(actors)
        self.dag = None

    def open(self) -> None:
        from ray.dag import InputNode, MultiOutputNode
        with InputNode() as inp:
            dag = MultiOutputNode([actor.run.bind(inp[i]) for i, actor in enumerate(self.actors)])
        self.dag = dag.experimental_compile()

    def run_experts(self, x: torch.Tensor, plan: DispatchPlan) -> dict[int, torch.Tensor]:
        requests = build_requests(x, plan, self.owner)
        empty = ShardRequest(plan.layer, [], [], x.new_zeros(0, self.hidden))
        answers = ray.get(self.dag.execute(*(requests[s][0] if s in requests else empty for s in range(self.n))))
        out = Replies()
        for shard, (_, assigns) in requests.items():
            out.add(answers[shard], assigns)
        return out.outputs()

    def close(self) -> None:
        if self.dag is not None:
            self.dag.teardown()
            self.dag = None


class GlooTransport:
    """torch.distributed over gloo: the caller is rank 0, shard i is rank i + 1."""

    def __init__(self, actors: list, placement: PlacementPlan, hidden: int, num_experts: int, port: int):
        import torch.distributed as dist
        self.dist, self.owner, self.hidden, self.actors = dist, placement.holders(), hidden, actors
        self.header_len = 3 + 2 * num_experts                      # layer, N, R, experts [N], counts [N]
        address, world = f"tcp://127.0.0.1:{port}", len(actors) + 1
        joined = [a.join_group.remote(address, i + 1, world) for i, a in enumerate(actors)]
        dist.init_process_group("gloo", init_method=address, rank=0, world_size=world)
        ray.get(joined)
        self.loops = [a.serve_gloo.remote(self.header_len, hidden) for a in actors]

    def run_experts(self, x: torch.Tensor, plan: DispatchPlan) -> dict[int, torch.Tensor]:
        requests = build_requests(x, plan, self.owner)
        sends, recvs = [], []
        for shard, (req, _) in requests.items():
            header = torch.zeros(self.header_len, dtype=torch.int64)
            n = len(req.experts)
            header[:3] = torch.tensor([req.layer, n, req.x.shape[0]])
            header[3:3 + 2 * n] = torch.tensor(req.experts + req.counts)
            sends += [self.dist.isend(header, dst=shard + 1), self.dist.isend(req.x.contiguous(), dst=shard + 1)]
            y = torch.empty(req.x.shape[0], self.hidden)
            recvs.append((shard, y, self.dist.irecv(y, src=shard + 1)))
        for work in sends:
            work.wait()
        out = Replies()
        for shard, y, work in recvs:
            work.wait()
            out.add(y, requests[shard][1])
        return out.outputs()

    def close(self) -> None:
        stop = torch.zeros(self.header_len, dtype=torch.int64)
        stop[0] = -1
        for i in range(len(self.actors)):
            self.dist.send(stop, dst=i + 1)
        ray.get(self.loops)
        self.dist.destroy_process_group()
