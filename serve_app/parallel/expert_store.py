"""A shard's experts: those of its placement, read at start; any other it is asked for, read from
the checkpoint when first asked; the ones it no longer holds, dropped when told.

Why load on demand: a re-placement (the Router's `apply_placement`, parallel/eplb.py) moves
experts between running shards. The Router first asks each shard to `prefetch` what it will hold,
then routes by the new placement, then lets each shard `release` the rest, so no layer waits on a
read. But a shard replica that Serve restarts comes back with its deployment's original experts,
and the Router may route it others: those are read on their first request (milliseconds a few MB,
inside the layer's deadline), so a restart never turns into failed layers.

Thread safety: one data-plane thread per connected Router (and Serve's `run` calls) share a store;
lookups, inserts and releases take one lock, held for dict operations only: checkpoint reads and
the FFNs run outside it (a prefetch never stalls the layers being served).
"""
from __future__ import annotations

import threading
from typing import Iterable

import torch

from serve_app.model import load_expert_weights
from serve_app.model.moe import ExpertKey
from serve_app.parallel.transport import ShardRequest, run_ffns


class ExpertStore:
    def __init__(self, model_dir: str, experts: Iterable[ExpertKey], dtype, device):
        self.model_dir, self.dtype, self.device = model_dir, dtype, device
        self.backend = load_expert_weights(model_dir, list(experts), dtype=dtype, device=device)
        self.loaded_on_demand = 0                 # experts read because a request named them
        self._lock = threading.Lock()

    def holds(self) -> frozenset[ExpertKey]:
        with self._lock:
            return self.backend.holds()

    def compute(self, req: ShardRequest) -> torch.Tensor:
        """The FFN of each expert on its rows, concatenated in request order → [R, D]."""
        return run_ffns(self._ffns([(req.layer, e) for e in req.experts]), req)

    def prefetch(self, keys: Iterable[ExpertKey]) -> int:
        """Read the experts of `keys` not held yet; how many were read."""
        return self._load([tuple(k) for k in keys])

    def release(self, keep: Iterable[ExpertKey]) -> int:
        """Drop every expert not in `keep`; how many were dropped."""
        keep_names = {_name(tuple(k)) for k in keep}
        with self._lock:
            gone = [name for name in self.backend.ffn if name not in keep_names]
            for name in gone:
                del self.backend.ffn[name]
            return len(gone)

    def _ffns(self, keys: list[ExpertKey]) -> list[torch.nn.Module]:
        with self._lock:
            found = [self.backend.ffn[_name(k)] if _name(k) in self.backend.ffn else None for k in keys]
        if None in found:                         # a request for experts this shard does not hold
            read = self._load(keys)
            with self._lock:
                self.loaded_on_demand += read
            return self._ffns(keys)
        return found

    def _load(self, keys: list[ExpertKey]) -> int:
        """Read the missing ones of `keys` (outside the lock) and insert them; how many were new
        (an unknown expert raises ModelLoadError). Two threads reading the same expert at once
        both insert the same weights: harmless."""
        with self._lock:
            missing = sorted({k for k in keys if _name(k) not in self.backend.ffn})
        if not missing:
            return 0
        read = load_expert_weights(self.model_dir, missing, dtype=self.dtype, device=self.device)
        with self._lock:
            new = [name for name in read.ffn if name not in self.backend.ffn]
            for name in new:
                self.backend.ffn[name] = read.ffn[name]
        return len(new)


def _name(key: ExpertKey) -> str:
    return f"{key[0]}_{key[1]}"
