"""Let a restarted Ingress replica take its port back at once (direct ingress, Ray Serve 2.60).

Found by the chaos soak (loadtests/chaos.py): after the Ingress replica was killed under load,
`moe-serve` never served again. Two things in Ray Serve keep the one public port from the
replacement replica:

1. A released direct-ingress port is quarantined for RAY_SERVE_PORT_QUARANTINE_S (150 s by
   default, meant for HAProxy workers still routing to it; there is none here). `moe-serve` pins
   the port range to exactly the public port, so the new replica has no port for 150 s and Serve
   keeps failing to start it. cli.direct_ingress_env sets the quarantine to 0.
2. The replica binds its HTTP socket without SO_REUSEADDR, so any connection of the dead
   replica's left in TIME_WAIT (60 s on Linux: every keep-alive connection the dead process
   closed first) makes the bind fail with EADDRINUSE, and Serve then *blocks* that port for
   good: the app never listens again. `allow_rebind()` makes the replica bind with
   SO_REUSEADDR (Ray's own `enable_so_reuseport` switch, which sets SO_REUSEADDR and
   SO_REUSEPORT together, as its HTTP proxy does). Ray's port allocator still hands the port to
   one replica at a time, so two live replicas never share it.

Ray exposes no option for (2), so the replica module's reference to its server starter is
wrapped; if a Ray upgrade moves it, a warning says so and the replica starts as before.
"""
from __future__ import annotations

import functools
import logging

logger = logging.getLogger(__name__)


def allow_rebind() -> bool:
    """Called in the Ingress replica's constructor (Ray starts the server after it). Returns
    whether the wrapper is in place."""
    try:
        from ray.serve._private import replica
        start = replica.start_asgi_http_server
    except (ImportError, AttributeError):
        logger.warning("ray.serve._private.replica.start_asgi_http_server not found: a restarted Ingress "
                       "replica may not get its port back while old connections are in TIME_WAIT")
        return False
    if getattr(start, "_moe_rebind", False):
        return True

    @functools.wraps(start)
    async def start_with_rebind(*args, **kwargs):
        kwargs["enable_so_reuseport"] = True
        return await start(*args, **kwargs)

    start_with_rebind._moe_rebind = True
    replica.start_asgi_http_server = start_with_rebind
    return True
