"""`moe-serve`: start (or join) a local Ray cluster, deploy the app, serve until Ctrl-C.

Serve's direct ingress is on: each Ingress replica listens on a port of its own (~1.2 ms per
request on the 2-core machine, against ~9 ms through Serve's HTTP proxy). By default the public
--port belongs to the front (serve_app/front), a relay in this process that outlives every replica:
it sends each request to an Ingress replica on port+1 .. port+N and answers 503 with Retry-After
while none is up, instead of the refused connections a restarting replica leaves on its port.
`--no-front` lets the one Ingress replica listen on --port itself. Direct ingress picks replica
ports from a range; these variables are read when Ray's modules are imported, so they are set
before any import.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
import time
import urllib.request


APP_NAME = "moe-serve"


def direct_ingress_env(ports: int | tuple[int, ...]) -> dict[str, str]:
    """Pin direct ingress to `ports` (consecutive; one int = that port alone): Serve gives each
    Ingress replica a free port of [MIN, MAX)."""
    ports = (ports,) if isinstance(ports, int) else tuple(ports)
    return {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(ports[0]),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(ports[-1] + 1),
        # No external load balancer locally: nothing to wait for when draining on shutdown.
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
        # Nor HAProxy workers still routing to a released port: a restarted Ingress replica takes
        # the one public port back at once (deployments/direct_ingress.py; 150 s by default).
        "RAY_SERVE_PORT_QUARANTINE_S": "0",
    }


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_serve(host: str) -> None:
    """Start Serve for direct ingress. With direct ingress on, Ray still runs a fallback HTTP proxy
    on the head node at http_options.port; it gets a free port of its own so that the public port
    (the direct-ingress range, see direct_ingress_env) stays the Ingress replica's."""
    from ray import serve

    serve.start(http_options={"host": host, "port": free_port(host)})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="moe-serve", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML/JSON file of AppConfig fields (serve_app/config.py); flags override it")
    p.add_argument("--model", help="checkpoint directory (default: the bundled default model)")
    p.add_argument("--expert-shards", type=int, default=None, help="ExpertShard deployments (0 = all local)")
    p.add_argument("--num-routers", type=int, default=None,
                   help="Router replicas, each with its own engines and prefix cache (default 1)")
    p.add_argument("--host", help="bind address (default: MOE_SERVE_HOST, the config file, 127.0.0.1)")
    p.add_argument("--port", type=int, help="public port (default: MOE_SERVE_PORT, the config file, 8000)")
    p.add_argument("--api-key", action="append", default=[], help="accepted Bearer key (repeatable); "
                   "also MOE_SERVE_API_KEYS (comma-separated) and --api-key-file")
    p.add_argument("--api-key-file", help="file with one key per line")
    p.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS", "auto"),
                   help="'auto' joins a Ray cluster running on this machine or starts one; 'local' always "
                        "starts a private one (its direct-ingress settings then apply for sure); or an address")
    p.add_argument("--no-front", action="store_true",
                   help="no relay on --port: the one Ingress replica listens there itself (AppConfig.front)")
    p.add_argument("--embedded", action="store_true",
                   help="no Ray: engine and HTTP in this process, all experts local (serve_app/embedded.py)")
    return p.parse_args(argv)


def _config_file(path: str) -> dict:
    import yaml  # JSON is YAML too

    with open(path) as f:
        fields = yaml.safe_load(f) or {}
    if not isinstance(fields, dict):
        raise SystemExit(f"--config {path}: expected a mapping of AppConfig fields, got {type(fields).__name__}")
    return fields


def app_config_from_args(args: argparse.Namespace):
    from serve_app.config import AppConfig

    keys = list(args.api_key)
    if args.api_key_file:
        with open(args.api_key_file) as f:
            keys += [line.strip() for line in f if line.strip()]
    fields = dict(_config_file(args.config)) if args.config else {}
    fields["host"] = args.host or os.environ.get("MOE_SERVE_HOST") or fields.get("host", "127.0.0.1")
    fields["port"] = args.port or int(os.environ.get("MOE_SERVE_PORT") or fields.get("port", 8000))
    fields["api_keys"] = (*fields.get("api_keys", ()), *(k.strip() for k in keys))
    if getattr(args, "no_front", False):
        fields["front"] = False
    for name, value in (("model", args.model), ("expert_shards", args.expert_shards),
                        ("num_routers", args.num_routers), ("dtype", args.dtype)):
        if value is not None:
            fields[name] = value
    return AppConfig(**fields)


def wait_healthy(url: str, timeout_s: float = 300.0, poll_s: float = 0.25) -> None:
    """Poll {url}/health until it answers 200 (used by the CLI, the load-test runner and the tests)."""
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError as exc:
            last = exc
        time.sleep(poll_s)
    raise TimeoutError(f"{url}/health did not answer 200 within {timeout_s:.0f}s: {last}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = app_config_from_args(args)
    if args.embedded:
        from serve_app.embedded import serve_embedded

        if config.num_routers > 1:
            print("moe-serve: --embedded runs one engine in this process; num_routers > 1 needs Ray", file=sys.stderr)
            return 2

        serve_embedded(config)
        return 0
    ingress = config.autoscaling.get("ingress")
    if not config.front and ingress is not None and ingress.max_replicas > 1:
        # Without the front the public port is the one Ingress replica's own (direct_ingress_env
        # pins the range to it): a second replica would have no port to take.
        print("moe-serve: autoscaling.ingress.max_replicas > 1 needs the front (drop --no-front / "
              "front: false); without it one Ingress replica serves the one port", file=sys.stderr)
        return 2
    os.environ.update(direct_ingress_env(config.ingress_ports()))

    import ray
    from ray import serve

    from serve_app.deployments.app import build_app
    from serve_app.front.server import FrontConfig, FrontServer

    joined = False
    if args.ray_address == "local":
        ray.init(log_to_driver=False)
    else:
        try:
            ray.init(address=args.ray_address, log_to_driver=False)
            # A cluster started elsewhere keeps its own environment: the direct-ingress port pinning
            # above applies only if that cluster was started with the same variables.
            print(f"moe-serve: joined the Ray cluster at {args.ray_address}", flush=True)
            joined = True
        except ConnectionError:
            ray.init(log_to_driver=False)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    front = None
    try:
        # Behind the front the replicas listen on loopback only: the front is the public address.
        start_serve("127.0.0.1" if config.front else config.host)
        serve.run(build_app(config), name=APP_NAME, route_prefix="/", blocking=False)
        if config.front:
            front = FrontServer(FrontConfig.from_app(config)).start()
        url = f"http://{config.host}:{config.port}"
        wait_healthy(url)
        print(f"moe-serve: serving {config.model_name} at {url}/v1 (Ctrl-C to stop)", flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        print("moe-serve: shutting down", flush=True)
        if front is not None:
            front.stop()
        if joined:
            serve.delete(APP_NAME)      # a cluster we joined keeps its Serve and its other apps
        else:
            serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
