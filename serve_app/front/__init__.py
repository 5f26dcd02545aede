"""The front: the public port of `moe-serve`, in front of the Ingress replicas.

With Serve's direct ingress the Ingress replica itself listens for clients. A replica is a Ray
actor: when it crashes or Ray kills it, its listener and every open connection go with it, and for
the seconds Serve takes to start a replacement (the chaos soak measured 8 s) clients get resets and
"connection refused", which no HTTP client reads as "retry later". The front is a small relay in
the `moe-serve` process, which no replica restart touches: it owns the public port, sends each
request to a live Ingress replica's own port, and when none can answer, answers itself: 503 with
Retry-After before a response began, an in-band error event in a stream that had begun.

- relay.py: the request handler (body limits, upstream choice, failure policy, streaming);
- server.py: its configuration and the thread that runs it beside the Ray driver.
"""
