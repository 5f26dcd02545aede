"""Chaos soak: the editor workload while replicas are killed, and what every request got.

    python loadtests/chaos.py --users 8 --run-time 180 --out /tmp/chaos

Starts a private local Ray cluster, deploys the app as `moe-serve` does (the front on --port, the
Ingress replica on the port above it, direct ingress; `--no-front`: the Ingress on --port), runs headless Locust (loadtests/locustfile.py; MOE_LT_FULL_PRECISION_SHARE of the editor
requests ask for full precision, so some cross the expert shards), and at evenly spaced times
kills one replica of each deployment in --faults (default: an ExpertShard, the Router, the
Ingress), by actor id through Ray's API (`ray.kill`: no graceful shutdown, as a crashed process
or a lost node). Serve restarts each. Then it judges every request Locust logged
(requests.csv, written by the locustfile with status, Retry-After and error):

- answered: 200; 429 or 503 with Retry-After; or a stream whose 200 was already sent and that
  reports its failure in-band (an error event, then [DONE]);
- violations: any other status, a 503 without Retry-After, a transport error (no HTTP answer: what
  a killed Ingress replica leaves its clients without the front),
  a request that took longer than the request timeout, a request still open at the end that
  had been open longer than that;
- per fault: the requests it failed and the time to recover (from the kill to the end of the last
  request that did not get a 200, among those that ended after it and before the next kill), and
  whether a request sent after that got a 200;
- when idle at the end, every KV block of the Router is free.

Writes summary.json and requests.csv into --out, prints a table, exits 0 when there is no
violation, every fault recovered and the KV cache drained; 1 otherwise; 2 when it could not run.
`run_soak` does the same against an app already deployed (the CI test's short version).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import workloads as wl  # noqa: E402

APP_NAME = "moe-serve"
DEPLOYMENTS = ("ExpertShard0", "Router", "Ingress")


@dataclass
class Fault:
    """One replica killed during the soak."""
    deployment: str          # Serve deployment name (ExpertShard0, Router, Ingress)
    actor_id: str            # the Ray actor killed (hex)
    at: float                # wall-clock time of the kill (time.time(), as Locust's start times)
    failed: int = 0          # requests near it that did not get a 200
    recover_s: float = 0.0   # kill → end of the last such request
    recovered: bool = False  # a request started after recover_s succeeded


@dataclass
class Verdict:
    """What the soak found: counts per outcome, the faults, and every broken condition."""
    outcomes: dict[str, int]
    faults: list[Fault]
    violations: list[str] = field(default_factory=list)   # one line per offending request (first 50)
    kv_after: dict | None = None                          # Router.kv_usage() once idle

    @property
    def ok(self) -> bool:
        kv_free = self.kv_after is not None and self.kv_after.get("used_blocks") == 0
        return not self.violations and all(f.recovered for f in self.faults) and kv_free


def replica_actors(deployment: str, app_name: str = APP_NAME) -> list[tuple[str, str]]:
    """(name, namespace) of the live replica actors of one deployment. Serve names a replica's
    actor SERVE_REPLICA::<app>#<deployment>#<replica id>."""
    import ray

    prefix = f"SERVE_REPLICA::{app_name}#{deployment}#"
    return [(a["name"], a["namespace"]) for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(prefix)]


def actor_id(name: str, namespace: str) -> str:
    import ray

    return ray.get_actor(name, namespace=namespace)._actor_id.hex()


def kill_one(deployment: str, app_name: str = APP_NAME) -> Fault:
    import ray

    actors = replica_actors(deployment, app_name)
    if not actors:
        raise RuntimeError(f"no running replica of {deployment} to kill")
    handle = ray.get_actor(*actors[0])
    actor_id = handle._actor_id.hex()
    at = time.time()
    ray.kill(handle, no_restart=True)          # Serve, not Ray, replaces the replica
    return Fault(deployment, actor_id, at)


def read_requests(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["start"], r["ms"] = float(r["start_s"]), float(r["ms"])
        r["end"] = r["start"] + r["ms"] / 1000
    return rows


def outcome(r: dict, timeout_s: float) -> str:
    """One request's class: ok, refused (429/503 + Retry-After), in-band (a streamed failure
    after the 200), cut (still open at the end, younger than the timeout), or a violation kind."""
    status = r["status"]
    if status == "open":
        return "hang" if r["ms"] > timeout_s * 1000 else "cut"
    if r["ms"] > timeout_s * 1000:
        return "slow"
    if status == "200":
        if r["ok"] == "1":
            return "ok"
        broken = r["error"].startswith(("stream broken", "stream ended without"))
        return "transport" if broken else "in-band"
    if status in ("429", "503"):
        return "refused" if r["retry_after"] else "no-retry-after"
    return "transport" if status == "0" else f"http-{status}"


ANSWERED = ("ok", "refused", "in-band", "cut")


def judge(rows: list[dict], faults: list[Fault], timeout_s: float) -> Verdict:
    rows = [r for r in rows if r["name"] != wl.TTFT_FIM_STREAM]       # a statistic, not a request
    outcomes: dict[str, int] = {}
    violations = []
    for r in rows:
        kind = outcome(r, timeout_s)
        outcomes[kind] = outcomes.get(kind, 0) + 1
        if kind not in ANSWERED:
            violations.append(f"{kind}: {r['name']} at {r['start']:.1f} ({r['ms']:.0f} ms, status {r['status']}, "
                              f"{r['error'][:100]})")
    for i, fault in enumerate(faults):
        until = faults[i + 1].at if i + 1 < len(faults) else math.inf
        # A request belongs to the last fault before its end: one in flight at the next kill is
        # that kill's.
        near = [r for r in rows if r["status"] != "open" and fault.at <= r["end"] < until]
        bad = [r for r in near if outcome(r, timeout_s) != "ok"]
        fault.failed = len(bad)
        fault.recover_s = max((r["end"] - fault.at for r in bad), default=0.0)
        back = fault.at + fault.recover_s
        fault.recovered = any(outcome(r, timeout_s) == "ok" and r["start"] >= back for r in near)
    more = [f"... {len(violations) - 50} more"] if len(violations) > 50 else []
    return Verdict(outcomes, faults, violations[:50] + more)


def router_kv(app_name: str = APP_NAME, idle_timeout_s: float = 60.0) -> dict:
    """The Router's KV usage once no request is live (polled: aborts of cut requests land late)."""
    from ray import serve

    router = serve.get_deployment_handle("Router", app_name=app_name)
    deadline = time.monotonic() + idle_timeout_s
    while True:
        usage = router.kv_usage.remote().result(timeout_s=30)
        if usage["requests"] == 0 or time.monotonic() > deadline:
            return usage
        time.sleep(0.5)


def run_soak(url: str, out: Path, users: int, run_time_s: float, faults: tuple[str, ...],
             workload: wl.WorkloadConfig, app_name: str = APP_NAME, spawn_rate: float = 4.0) -> Verdict:
    """Locust against `url` for run_time_s while the faults are injected at evenly spaced times
    (the first after a warm-up, the last leaving time to recover); the app must be deployed and
    healthy, and this process connected to its Ray cluster."""
    import run_slo
    from serve_app.cli import wait_healthy

    out.mkdir(parents=True, exist_ok=True)
    args = argparse.Namespace(host=url, users=users, spawn_rate=spawn_rate, run_time=f"{int(run_time_s)}s", out=out)
    locust = threading.Thread(target=run_slo.run_locust, args=(args, workload), daemon=True)
    locust.start()
    started, injected = time.monotonic(), []
    for i, deployment in enumerate(faults):
        time.sleep(max(0.0, started + run_time_s * (i + 1) / (len(faults) + 1) - time.monotonic()))
        injected.append(kill_one(deployment, app_name))
        print(f"chaos: killed {deployment} replica {injected[-1].actor_id[:12]} at "
              f"t={time.monotonic() - started:.1f}s", flush=True)
    locust.join()
    wait_healthy(url, timeout_s=120)
    verdict = judge(read_requests(out / "requests.csv"), injected, workload.timeout_s)
    verdict.kv_after = router_kv(app_name)
    (out / "summary.json").write_text(json.dumps({**asdict(verdict), "ok": verdict.ok, "users": users,
                                                  "run_time_s": run_time_s}, indent=2))
    return verdict


def report(verdict: Verdict) -> str:
    lines = ["outcome counts: " + ", ".join(f"{k} {v}" for k, v in sorted(verdict.outcomes.items())),
             f"{'fault':<14}{'failed':>8}{'recover s':>11}  recovered"]
    for f in verdict.faults:
        lines.append(f"{f.deployment:<14}{f.failed:>8}{f.recover_s:>11.2f}  {f.recovered}")
    lines.append(f"KV after, idle: {verdict.kv_after}")
    lines += [f"VIOLATION {v}" for v in verdict.violations]
    lines.append("chaos soak: " + ("passed" if verdict.ok else "FAILED"))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint directory (default: the bundled model)")
    p.add_argument("--expert-shards", type=int, default=2)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--run-time", type=float, default=180.0, help="seconds of load")
    p.add_argument("--faults", default=",".join(DEPLOYMENTS), help="deployments to kill, in order")
    p.add_argument("--request-timeout-s", type=float, default=30.0, help="the server's; the client's is 10 s more")
    p.add_argument("--full-precision-share", type=float, default=0.3)
    p.add_argument("--no-front", action="store_true", help="the Ingress replica listens on --port itself")
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from serve_app.cli import direct_ingress_env, start_serve, wait_healthy
    from serve_app.config import AppConfig

    fields = {"expert_shards": args.expert_shards, "request_timeout_s": args.request_timeout_s, "port": args.port,
              "front": not args.no_front}
    config = AppConfig(**fields, **({"model": args.model} if args.model else {}))
    os.environ.update(direct_ingress_env(config.ingress_ports()))      # before Ray is imported
    import ray
    from ray import serve

    from serve_app.deployments.app import build_app
    from serve_app.front.server import FrontConfig, FrontServer

    workload = wl.WorkloadConfig(full_precision_share=args.full_precision_share,
                                 timeout_s=args.request_timeout_s + 10)
    url = f"http://127.0.0.1:{args.port}"
    ray.init(log_to_driver=False)
    front = None
    try:
        start_serve("127.0.0.1")
        serve.run(build_app(config), name=APP_NAME, route_prefix="/", blocking=False)
        if config.front:
            front = FrontServer(FrontConfig.from_app(config)).start()
        wait_healthy(url)
        verdict = run_soak(url, args.out, args.users, args.run_time, tuple(args.faults.split(",")), workload)
    except (RuntimeError, TimeoutError) as exc:
        print(f"chaos: could not run: {exc}", file=sys.stderr)
        return 2
    finally:
        if front is not None:
            front.stop()
        serve.shutdown()
        ray.shutdown()
    print(report(verdict))
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    sys.exit(main())
