"""Prefix-affine routing of the Ingress's calls over Router replicas (a Serve `RequestRouter`).

Why: each Router replica has its own prefix cache. An editor sends a request per keystroke whose
prompt shares all but its last few tokens with the one before (the PSM prefix up to the cursor, or
an SPM suffix and prefix); Serve's default power-of-two routing picks a replica at random between
two and so, with two replicas, recomputes the whole prompt on every other keystroke. This router
sends a prompt to the replica that last received its longest cached prefix.

How it decides, per `generate` call (Ray Serve LLM's PrefixCacheAffinityRouter is the model, at the
level of token blocks rather than text, since our prompts reach the Router as token ids):
- The prompt's full blocks of `block_size` tokens are hashed in a chain (engine/kv_hash.py), so a
  block's hash names everything before it, as in the engine's own prefix cache.
- `AffinityIndex` remembers which replica last got each block hash (bounded, least recently used
  out). The longest hash whose replica is still a candidate names the replica holding most of the
  prompt.
- No block seen before (a new editor session, a new file): rendezvous hashing of the first block
  over the candidates' ids, so every Ingress replica sends the same new prefix to the same Router
  without sharing any state.
- Load before affinity: when the preferred replica has `imbalance_threshold` more requests in flight
  than the least loaded (Serve's queue-length cache), the call goes by power of two choices.
- `abort(request_id)` goes to the replica that got that request's `generate` (any other replica
  would ignore it); other methods (health, kv_usage) by power of two choices.

The index lives in this process (one per Ingress replica and deployment handle): it only steers.
A wrong guess costs a cache miss, never a wrong answer.
"""
from __future__ import annotations

import hashlib
import random
from collections import OrderedDict
from typing import List, Optional

from ray.serve.request_router import PendingRequest, ReplicaID, ReplicaResult, RequestRouter, RunningReplica

from serve_app.engine.kv_hash import BlockHash, hash_full_blocks, root_hash


class AffinityIndex:
    """Which replica last received each prompt block (chained hash), least recently used out."""

    def __init__(self, block_size: int, max_blocks: int = 1 << 16, max_prompt_blocks: int = 256):
        self.block_size, self.max_blocks, self.max_prompt_blocks = block_size, max_blocks, max_prompt_blocks
        self.owner: OrderedDict[BlockHash, str] = OrderedDict()
        self._root = root_hash("router-affinity")

    def hashes(self, token_ids: list[int]) -> list[BlockHash]:
        """The chained hashes of the prompt's full blocks (the first max_prompt_blocks); a prompt
        shorter than one block is hashed whole, so it still has a key."""
        hashes = hash_full_blocks(token_ids, self.block_size, self._root, max_blocks=self.max_prompt_blocks)
        if not hashes and token_ids:
            hashes = hash_full_blocks(token_ids, len(token_ids), self._root)
        return hashes

    def match(self, hashes: list[BlockHash], candidates: set[str]) -> tuple[str | None, int]:
        """(the candidate that last got the longest of these prefixes, how many blocks), or
        (None, 0) when no candidate got any."""
        for k in range(len(hashes) - 1, -1, -1):
            owner = self.owner.get(hashes[k])
            if owner in candidates:
                return owner, k + 1
        return None, 0

    def record(self, hashes: list[BlockHash], replica: str) -> None:
        for h in hashes:
            self.owner[h] = replica
            self.owner.move_to_end(h)
        while len(self.owner) > self.max_blocks:
            self.owner.popitem(last=False)

    def forget(self, replica: str) -> None:
        """A replica is gone: its blocks belong to nobody (rare; a scan is fine)."""
        for h in [h for h, r in self.owner.items() if r == replica]:
            del self.owner[h]


def rendezvous(key: BlockHash, candidates: list[str]) -> str:
    """Highest-random-weight choice: the same key picks the same candidate in every process, and a
    candidate leaving moves only its own keys."""
    return max(candidates, key=lambda c: hashlib.sha256(key + c.encode()).digest())


class PrefixAffinityRouter(RequestRouter):
    """`RequestRouterConfig(request_router_class=PrefixAffinityRouter, request_router_kwargs=...)` on
    the Router deployment; the kwargs reach `initialize_state`."""

    def initialize_state(self, block_size: int = 16, imbalance_threshold: int = 8, max_blocks: int = 1 << 16,
                         max_tracked_requests: int = 8192) -> None:
        self.index = AffinityIndex(block_size, max_blocks)
        self.imbalance_threshold = imbalance_threshold
        self.max_tracked_requests = max_tracked_requests
        self._request_owner: OrderedDict[str, str] = OrderedDict()          # our request id -> replica id

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is not None:
            # No locality tiers to try first: when no choice could take the request (a queue-length
            # probe missed its deadline), Serve must back off before asking again. Without it the
            # retries spin, and their probes swamp the very replica they wait on.
            pending_request.routing_context.should_backoff = True
        by_id = {r.replica_id.to_full_id_str(): r for r in candidate_replicas}
        method = pending_request.metadata.call_method if pending_request is not None else ""
        if method == "abort" and (owner := by_id.get(self._request_owner.get(_arg(pending_request, 0, "request_id")))):
            return [[owner]]
        if method != "generate":
            return [self._two_choices(candidate_replicas)]
        prompt = _arg(pending_request, 1, "prompt_token_ids") or []
        hashes = self.index.hashes(list(prompt))
        preferred, _ = self.index.match(hashes, set(by_id))
        if preferred is None and hashes:
            preferred = rendezvous(hashes[0], sorted(by_id))
        if preferred is None or self._overloaded(by_id[preferred], candidate_replicas):
            return [self._two_choices(candidate_replicas)]
        rest = [r for rid, r in by_id.items() if rid != preferred]
        # Ranked: the preferred replica, and only if it refuses (its queue full) the others.
        return [[by_id[preferred]], rest] if rest else [[by_id[preferred]]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: ReplicaResult) -> None:
        if pending_request.metadata.call_method != "generate":
            return
        replica = replica_id.to_full_id_str()
        # Hashed again rather than kept from choose_replicas: a request cancelled before it is
        # routed would leave its hashes behind.
        if hashes := self.index.hashes(list(_arg(pending_request, 1, "prompt_token_ids") or [])):
            self.index.record(hashes, replica)
        if (request_id := _arg(pending_request, 0, "request_id")) is not None:
            self._track(self._request_owner, request_id, replica)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.index.forget(replica_id.to_full_id_str())

    def _overloaded(self, replica: RunningReplica, candidates: List[RunningReplica]) -> bool:
        """The preferred replica has imbalance_threshold more in flight than the least loaded one
        (by Serve's queue-length cache; unknown lengths count as balanced)."""
        lengths = {r.replica_id: self._replica_queue_len_cache.get(r.replica_id) for r in candidates}
        known = [n for n in lengths.values() if n is not None]
        mine = lengths.get(replica.replica_id)
        return mine is not None and bool(known) and mine - min(known) > self.imbalance_threshold

    @staticmethod
    def _two_choices(candidates: List[RunningReplica]) -> List[RunningReplica]:
        """Power of two choices: two at random; Serve takes the one with the shorter queue."""
        return random.sample(candidates, min(2, len(candidates)))

    def _track(self, table: OrderedDict, key, value) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > self.max_tracked_requests:
            table.popitem(last=False)


def _arg(pending_request: PendingRequest, position: int, name: str):
    """A call's argument by position or keyword (RouterClient passes them by position)."""
    if name in pending_request.kwargs:
        return pending_request.kwargs[name]
    return pending_request.args[position] if len(pending_request.args) > position else None
