"""Re-placing experts on running shards without failing a request in flight.

The order is what makes it safe (the Router's `apply_placement`; parallel/expert_store.py is the
shard side): (1) every shard reads the experts the new placement gives it, while the old placement
still routes; (2) the transports route the next layers by the new one (a layer reads the placement
once, so it sees the old map or the new one, never a mix), and the socket plane waits for a layer
already on the wire to finish; (3) every shard drops what it no longer holds. With the socket plane
every shard a layer is routed to holds that layer's experts at each moment; a Serve handle call
still in flight at (3), or a shard restarted meanwhile, finds an expert missing and reads it on
demand (parallel/expert_store.py): slower, never wrong. Replicated experts (several holders) have
their rows split between the holders. One Router replica and one replica of each shard: the Router
refuses otherwise (the others would keep routing by the old placement).
"""
from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Sequence

from serve_app.model.moe import ExpertKey
from serve_app.parallel.placement import PlacementPlan
from serve_app.parallel.transport import ShardTransport

# (shard index, its experts under the new placement) → how many experts it read / dropped
ShardCall = Callable[[int, list[ExpertKey]], Awaitable[int]]


async def apply_placement(transports: Sequence[ShardTransport], new: PlacementPlan, prefetch: ShardCall,
                          release: ShardCall) -> dict:
    """Move to `new` (same remote experts, same shards) under traffic; what each shard read and dropped."""
    for transport in transports:
        transport.check_placement(new)           # before any shard reads a thing
    read = await asyncio.gather(*(prefetch(s.index, list(s.experts)) for s in new.shards))
    for transport in transports:
        transport.set_placement(new)
        await asyncio.to_thread(transport.quiesce)
    dropped = await asyncio.gather(*(release(s.index, list(s.experts)) for s in new.shards))
    return {"read": list(read), "dropped": list(dropped)}
