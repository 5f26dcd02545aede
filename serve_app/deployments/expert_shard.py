"""ExpertShard deployment: holds one slice of the experts (only their tensors are read from disk)
and computes their FFNs on the rows the router sends, one request per MoE layer per step.

The rows arrive over the data plane (`parallel/socket_plane.py`: the replica listens on a port
of its node and tells the router where through `data_plane`), or as Serve calls of `run` (the
`serve` transport, kept as the measured baseline). What it holds can change while it serves
(`prefetch`, `release`: the Router's re-placement; parallel/expert_store.py)."""
from __future__ import annotations

import asyncio
import os

import ray
import torch
from ray import serve

from serve_app.config import AppConfig, ProcessSettings
from serve_app.model.loader import resolve_dtype
from serve_app.model.moe import ExpertKey
from serve_app.parallel.expert_store import ExpertStore
from serve_app.parallel.placement import ShardSpec
from serve_app.parallel.socket_plane import PlaneAddress, ShardServer
from serve_app.parallel.transport import ShardRequest


@serve.deployment(name="ExpertShard", max_ongoing_requests=64, health_check_period_s=2,
                  health_check_timeout_s=10)
class ExpertShard:
    def __init__(self, model_dir: str, shard: ShardSpec, dtype: str = "float32",
                 process: ProcessSettings | None = None):
        (process or AppConfig().process_settings()).apply()
        # A shard given a GPU by Ray uses it; otherwise CPU.
        device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
        self.shard = shard
        self.store = ExpertStore(model_dir, shard.experts, dtype, device)
        self.device = device
        self.dtype = resolve_dtype(dtype, model_dir, device)          # what this shard computes in
        self.plane = ShardServer(self._compute, ray.util.get_node_ip_address(), os.getpid())

    def _compute(self, req: ShardRequest) -> torch.Tensor:
        # Rows come back in the dtype they came in, whatever this shard computes in.
        x = req.x.to(self.device, self.dtype)
        out = self.store.compute(ShardRequest(req.layer, req.experts, req.counts, x))
        return out.to("cpu", req.x.dtype)

    @torch.inference_mode()
    def run(self, req: ShardRequest) -> torch.Tensor:
        return self._compute(req)

    def data_plane(self) -> PlaneAddress:
        """Where this replica's data plane listens, and the token a connection must present."""
        return self.plane.address

    async def prefetch(self, experts: list[ExpertKey]) -> int:
        """Read the experts a new placement gives this shard (before the Router routes by it); off
        the replica's event loop, which answers health checks and `run` calls meanwhile."""
        return await asyncio.to_thread(self.store.prefetch, experts)

    def release(self, keep: list[ExpertKey]) -> int:
        """Drop the experts a new placement took away (after no layer routes by the old one)."""
        return self.store.release(keep)

    def info(self) -> dict:
        """Where this shard runs and what it holds (placement checks, /health); what it read at start."""
        report = self.store.backend.load_report
        return {"shard": self.shard.index, "node_id": ray.get_runtime_context().get_node_id(),
                "pid": os.getpid(), "device": self.device, "experts": sorted(self.store.holds()),
                "keys_read": len(report.keys_read), "bytes_read": report.bytes_read,
                "loaded_on_demand": self.store.loaded_on_demand}
