"""A real multi-node Ray cluster on one machine: a head and N workers started with `ray start` on
loopback, the app deployed onto it the way KubeRay deploys it, and a teardown that ends only what
it started.

Why: on Kubernetes the expert shards must run on different GPU workers (helm/moe-serve). Placement
bugs — every shard on one node, a shard on the head — only show on a cluster with several nodes,
so this builds one locally whose nodes look like the chart's pods: the head advertises `moe_head`
(Ingress and Router ask for it), each worker advertises fake GPUs (Ray schedules on the count;
nothing touches CUDA) and optionally a custom resource such as `{"moe_expert_slot": 1}`.

Living beside other Ray clusters on the same machine:
- every port is picked free and the temp dir is our own, so nothing under /tmp/ray is touched and
  `ray.init(address="auto")` elsewhere never finds this cluster;
- `ray stop` cannot be scoped to one cluster (it ends every Ray process of the user), so it is
  never called: each `ray start --block` runs in a session of its own, Ray's children keep that
  session id, and `down` ends exactly the processes of those sessions;
- direct-ingress variables inherited from the caller (the test session sets them) are dropped:
  clients reach Serve's proxy on the head, as under KubeRay;
- token auth is on, with this cluster's own token: otherwise `ray start` turns it on or off by
  whether ~/.ray/auth_token (another cluster's) exists, and REST calls would pass here, fail there.

Deployment goes through the dashboard's REST API (`PUT /api/serve/applications/`), the call both
`serve deploy` and the KubeRay operator make, with cluster/serve_config.yaml as the document.

    python cluster/local_cluster.py up --state-dir DIR --workers 2
    python cluster/local_cluster.py deploy --state-dir DIR --set model=/ckpt --set expert_shards=2
    python cluster/local_cluster.py placement --state-dir DIR     # JSON: which node holds each shard
    python cluster/local_cluster.py down --state-dir DIR
    python cluster/local_cluster.py demo --workers 2 --set model=/ckpt   # up, deploy, check, down
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

DEFAULT_CONFIG = Path(__file__).resolve().parent / "serve_config.yaml"
APP_NAME = "moe-serve"
# Ingress and Router ask for one unit each; room for more replicas later.
HEAD_RESOURCES = {"moe_head": 100}
# Variables of the caller that must not reach this cluster's processes.
_DROPPED_ENV_PREFIXES = ("RAY_SERVE_ENABLE_DIRECT_INGRESS", "RAY_SERVE_DIRECT_INGRESS_", "RAY_ADDRESS")
# Each node's object store: the app moves a few KB per step, and three default-sized stores
# (30% of RAM each) would be pointless on a laptop.
OBJECT_STORE_BYTES = 128 * 1024 * 1024


# `ray start` processes this process started: polled for liveness (a dead child stays a zombie,
# which a signal-0 probe would take for alive) and reaped on teardown.
_CHILDREN: dict[int, subprocess.Popen] = {}


class ClusterError(RuntimeError):
    """The cluster did not come up, the app did not deploy, or shards are not where they belong."""


@dataclass
class Node:
    role: str            # "head" or "worker"
    pid: int             # the `ray start --block` process; its session holds every process of the node
    log: str             # that process's output, for errors
    node_manager_port: int  # identifies the node in ray.nodes() (all nodes share 127.0.0.1)


@dataclass
class ClusterState:
    """What `up` leaves in STATE_DIR/cluster.json for deploy / placement / down."""
    state_dir: str
    temp_dir: str        # Ray's temp/session dir for this cluster only
    gcs_port: int        # ray.init(address=f"127.0.0.1:{gcs_port}")
    dashboard_port: int  # REST API: deploy, status
    serve_port: int      # Serve's HTTP proxy on the head
    auth_token: str      # Ray token auth (dashboard REST and drivers); the file is private to its user
    nodes: list[Node] = field(default_factory=list)

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def serve_url(self) -> str:
        return f"http://127.0.0.1:{self.serve_port}"

    def save(self) -> None:
        path = Path(self.state_dir, "cluster.json")
        path.touch(mode=0o600)
        path.write_text(json.dumps(asdict(self), indent=2))

    def auth_env(self) -> dict[str, str]:
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.auth_token}

    def api(self, path: str, method: str = "GET", body: dict | None = None, timeout: float = 10.0):
        """Call the dashboard's REST API; the JSON answer, or None for an empty one."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {self.auth_token}"}
        req = urllib.request.Request(self.dashboard_url + path, data=data, method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    @classmethod
    def load(cls, state_dir: str | Path) -> "ClusterState":
        data = json.loads(Path(state_dir, "cluster.json").read_text())
        data["nodes"] = [Node(**n) for n in data["nodes"]]
        return cls(**data)


def free_ports(n: int) -> list[int]:
    """n distinct free ports (all sockets held open until every port is chosen)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _ray_env(state: ClusterState) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_DROPPED_ENV_PREFIXES)}
    return {**env, **state.auth_env(), "RAY_USAGE_STATS_ENABLED": "0"}


def _start_node(state: ClusterState, role: str, args: list[str]) -> Node:
    mgr, obj, agent, agent_grpc, runtime_env, metrics = free_ports(6)
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--disable-usage-stats",
           "--node-ip-address=127.0.0.1", f"--node-manager-port={mgr}", f"--object-manager-port={obj}",
           f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
           # 0/0: each worker process binds a port the OS picks (as ray.cluster_utils does), so
           # several raylets on one host never race for the same fixed range.
           "--min-worker-port=0", "--max-worker-port=0",
           f"--object-store-memory={OBJECT_STORE_BYTES}", *args]
    log = Path(state.state_dir, f"{role}-{mgr}.log")
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=_ray_env(state), start_new_session=True)
    _CHILDREN[proc.pid] = proc
    node = Node(role=role, pid=proc.pid, log=str(log), node_manager_port=mgr)
    state.nodes.append(node)
    state.save()                 # saved at once: `down` must find every node even if `up` fails
    return node


def _wait(what: str, probe, timeout_s: float, state: ClusterState, interval_s: float = 0.5):
    """Poll probe() until it returns a truthy value; on timeout, raise with the nodes' log tails."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        for node in state.nodes:
            if not _alive(node.pid):
                raise ClusterError(f"{what}: the {node.role} node's `ray start` exited\n{_tail(node.log)}")
        try:
            result = probe()
            if result:
                return result
        except (OSError, ValueError) as exc:   # not listening yet, or a half-written answer
            last = exc
        time.sleep(interval_s)
    logs = "\n".join(_tail(n.log) for n in state.nodes)
    raise ClusterError(f"{what}: not done after {timeout_s:.0f}s (last: {last})\n{logs}")


def _tail(path: str, lines: int = 15) -> str:
    try:
        return f"--- {path}\n" + "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"--- {path} (unreadable)"


def _alive(pid: int) -> bool:
    if pid in _CHILDREN:
        return _CHILDREN[pid].poll() is None
    return bool(_session_pids({pid}))      # started by an earlier `up` process: its session lives on


def up(state_dir: str | Path, workers: int = 2, gpus_per_worker: int = 1, cpus_per_worker: int = 1,
       worker_resources: dict[str, float] | None = None, head_cpus: int = 2,
       timeout_s: float = 120.0) -> ClusterState:
    """Start a head and `workers` worker nodes; return once all are alive in the cluster."""
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    # Short temp dir: Ray puts Unix sockets under it, and their paths are limited to ~107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="moe-rc-", dir="/tmp")
    state = ClusterState(str(state_dir), temp_dir, 0, 0, 0, secrets.token_hex(32))

    def head_args() -> list[str]:           # fresh ports on every attempt
        state.gcs_port, state.dashboard_port, state.serve_port, client = free_ports(4)
        return ["--head", f"--port={state.gcs_port}", f"--temp-dir={temp_dir}", f"--ray-client-server-port={client}",
                "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={state.dashboard_port}",
                f"--num-cpus={head_cpus}", "--num-gpus=0", f"--resources={json.dumps(HEAD_RESOURCES)}"]

    def worker_args() -> list[str]:
        return [f"--address={state.gcs_address}", f"--num-cpus={cpus_per_worker}", f"--num-gpus={gpus_per_worker}",
                f"--resources={json.dumps(worker_resources or {})}",
                "--include-log-monitor=false"]   # one process fewer per node; logs stay in files

    try:
        # The dashboard answers before the head's raylet has registered, so wait for both.
        _start_node_retrying(state, "head", head_args,
                             lambda: state.api("/api/ray/version") and _alive_nodes(state), timeout_s)
        # One at a time: starting Ray processes is CPU-heavy, and on a loaded 2-core machine several
        # raylets starting together miss Ray's fixed 30 s registration deadline.
        for _ in range(workers):
            _start_node_retrying(state, "worker", worker_args,
                                 lambda: len(_alive_nodes(state)) >= len(state.nodes), timeout_s)
    except BaseException:
        down(state_dir)
        raise
    return state


def _start_node_retrying(state: ClusterState, role: str, make_args, ready, timeout_s: float,
                         attempts: int = 3) -> Node:
    """Start a node and wait until ready(); a `ray start` that gives up (its raylet missed the
    registration deadline under load) is cleaned up and started again on fresh ports."""
    for attempt in range(1, attempts + 1):
        node = _start_node(state, role, make_args())
        try:
            _wait(f"{role} node (attempt {attempt}/{attempts})", ready, timeout_s, state)
            return node
        except ClusterError:
            if attempt == attempts or _alive(node.pid):
                raise
            _end_sessions({node.pid}, grace_s=5.0)
            state.nodes.remove(node)
            state.save()
    raise AssertionError("unreachable")


def _alive_nodes(state: ClusterState) -> list[dict]:
    answer = state.api("/api/v0/nodes?limit=100")
    return [n for n in answer["data"]["result"]["result"] if n["state"] == "ALIVE"]


def serve_config(config_path: str | Path, overrides: dict, serve_port: int) -> dict:
    """The Serve config document with `overrides` merged into the app's args and the proxy moved to
    this cluster's free port (the file says 8000, which another process may hold)."""
    config = yaml.safe_load(Path(config_path).read_text())
    config["http_options"] = {**config.get("http_options", {}), "host": "127.0.0.1", "port": serve_port}
    (app,) = [a for a in config["applications"] if a["name"] == APP_NAME]
    app["args"] = {**app.get("args", {}), **overrides}
    return config


def deploy(state_dir: str | Path, overrides: dict | None = None, config_path: str | Path = DEFAULT_CONFIG,
           timeout_s: float = 180.0) -> ClusterState:
    """PUT the Serve config to the dashboard, wait for RUNNING and for /health to answer 200."""
    state = ClusterState.load(state_dir)
    config = serve_config(config_path, overrides or {}, state.serve_port)
    state.api("/api/serve/applications/", "PUT", config, timeout=60)

    def running() -> bool:
        apps = (state.api("/api/serve/applications/") or {}).get("applications", {})
        app = apps.get(APP_NAME)
        if app and app["status"] == "DEPLOY_FAILED":
            raise ClusterError(f"deploy failed: {app.get('message')}")
        return bool(app) and app["status"] == "RUNNING"

    _wait(f"app {APP_NAME} RUNNING", running, timeout_s, state, interval_s=1.0)
    _wait("/health 200", lambda: urllib.request.urlopen(f"{state.serve_url}/health", timeout=5).status == 200,
          60, state)
    return state


def placement(state_dir: str | Path, timeout_s: float = 60.0) -> dict:
    """Which node holds each shard, as the shards report it (Router.health()), each node's role,
    and where Serve placed every replica (its REST API).

    Runs a Ray driver, so call it in a process of its own (`placement` on the command line) when the
    calling process is already a driver of another cluster: one process joins one cluster."""
    state = ClusterState.load(state_dir)
    os.environ.update(state.auth_env())   # read once, when Ray's core library loads
    import ray
    from ray import serve

    roles = {n.node_manager_port: n.role for n in state.nodes}
    ray.init(address=state.gcs_address, log_to_driver=False, logging_level="ERROR")
    try:
        nodes = {n["NodeID"]: roles.get(n["NodeManagerPort"], "unknown") for n in ray.nodes() if n["Alive"]}
        router = serve.get_deployment_handle("Router", app_name=APP_NAME)
        shards = router.health.remote(timeout_s=timeout_s).result(timeout_s=timeout_s + 5)
    finally:
        ray.shutdown()
    app = state.api("/api/serve/applications/")["applications"][APP_NAME]
    replicas = {name: [r["node_id"] for r in dep["replicas"]] for name, dep in app["deployments"].items()}
    return {"nodes": nodes, "replicas": replicas,
            "shards": [{**s, "experts": [list(e) for e in s["experts"]]} for s in shards]}


def check_spread(report: dict) -> None:
    """Raise ClusterError unless every shard runs on a worker node of its own."""
    where = {s["shard"]: s["node_id"] for s in report["shards"]}
    if not where:
        raise ClusterError("no expert shards in the report")
    on_head = sorted(i for i, node in where.items() if report["nodes"].get(node) != "worker")
    if on_head:
        raise ClusterError(f"shards {on_head} are not on worker nodes: {where}")
    if len(set(where.values())) != len(where):
        raise ClusterError(f"shards share a node: {where}")


def _session_pids(sids: set[int]) -> list[int]:
    """Every live (not zombie) process whose session is one of ours (Linux /proc)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            stat = Path("/proc", entry, "stat").read_text()
            # Fields after the parenthesised command: state, ppid, pgrp, session, ...
            proc_state, _, _, session = stat.rsplit(")", 1)[1].split()[:4]
        except (OSError, ValueError, IndexError):   # gone meanwhile
            continue
        if int(session) in sids and proc_state != "Z":
            pids.append(int(entry))
    return pids


def _end_sessions(sids: set[int], grace_s: float) -> int:
    """SIGTERM every process of these sessions, SIGKILL what is left after grace_s; reap our own."""
    pids = _session_pids(sids)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _session_pids(sids):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and _session_pids(sids):
            for proc in list(_CHILDREN.values()):
                proc.poll()                  # reap, so a dead child stops counting
            time.sleep(0.2)
    for sid in sids:
        if sid in _CHILDREN:
            _CHILDREN.pop(sid).wait(timeout=5)
    return len(pids)


def down(state_dir: str | Path, grace_s: float = 10.0) -> int:
    """End every process of this cluster (SIGTERM, then SIGKILL after grace_s); return how many."""
    try:
        state = ClusterState.load(state_dir)
    except FileNotFoundError:
        return 0
    # start_new_session: each node's session id is its `ray start` pid, and Ray's processes keep it.
    stopped = _end_sessions({n.pid for n in state.nodes}, grace_s)
    shutil.rmtree(state.temp_dir, ignore_errors=True)
    return stopped


def _parse_sets(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["up", "deploy", "placement", "down", "demo"])
    p.add_argument("--state-dir", help="where cluster.json and node logs live (demo: a temp dir)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--gpus-per-worker", type=int, default=1, help="fake GPUs each worker advertises")
    p.add_argument("--worker-resources", type=json.loads, default=None, help='e.g. \'{"moe_expert_slot": 1}\'')
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="Serve config YAML")
    p.add_argument("--set", action="append", default=[], help="app arg override, key=YAML value")
    args = p.parse_args(argv)
    if args.command != "demo" and not args.state_dir:
        p.error("--state-dir is required")
    if args.command == "up":
        state = up(args.state_dir, args.workers, args.gpus_per_worker, worker_resources=args.worker_resources)
        print(json.dumps({"gcs": state.gcs_address, "dashboard": state.dashboard_url}))
    elif args.command == "deploy":
        state = deploy(args.state_dir, _parse_sets(args.set), args.config)
        print(json.dumps({"url": state.serve_url}))
    elif args.command == "placement":
        print(json.dumps(placement(args.state_dir)))
    elif args.command == "down":
        print(json.dumps({"stopped_processes": down(args.state_dir)}))
    else:
        state_dir = args.state_dir or tempfile.mkdtemp(prefix="moe-cluster-")
        try:
            up(state_dir, args.workers, args.gpus_per_worker, worker_resources=args.worker_resources)
            state = deploy(state_dir, {"expert_shards": args.workers, **_parse_sets(args.set)}, args.config)
            report = placement(state_dir)
            check_spread(report)
            print(json.dumps({"url": state.serve_url, **report}, indent=2))
        finally:
            down(state_dir)
            if not args.state_dir:
                shutil.rmtree(state_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
