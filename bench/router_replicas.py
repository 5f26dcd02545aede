"""Router replicas under the editor workload: one replica, two with prefix-affine routing, two with
Serve's power-of-two routing — same model, same Locust workload, one Ray cluster, the same run.

Each layout is deployed in turn (`--rounds` times, in the same order each round, so drift hits all
alike) and `loadtests/run_slo.py` runs against it; the table gives the inline latency (every FIM
request) and the prefix cache's share of the prompt tokens (the Routers' own counters, summed over
replicas, from /metrics before and after). Issue 18's targets: the share with two replicas and
prefix routing as with one (>= 90%), against power of two; p80 at 16 users against one replica.

`--fim-order spm` serves a copy of the model whose tokenizer config declares SPM (suffix first), so
a keystroke's prompt keeps everything but its last characters; the bundled model was trained PSM
only, so its completions there are worse (and its lengths differ), which this bench does not judge.

    python bench/router_replicas.py [--users 16] [--run-time 2m] [--rounds 1] [--fim-order psm|spm]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serve_app.cli import direct_ingress_env, free_port, start_serve, wait_healthy  # noqa: E402

PORT = free_port()
os.environ.update(direct_ingress_env(PORT))     # read when Ray's modules are imported

LAYOUTS = {"1-router": dict(num_routers=1), "2-routers-prefix": dict(num_routers=2, router_routing="prefix"),
           "2-routers-power-of-two": dict(num_routers=2, router_routing="power_of_two")}


def model_copy(order: str) -> str:
    """The bundled model's directory, or a copy of it that declares `order` for FIM prompts."""
    from serve_app.config import default_model_dir

    source = Path(default_model_dir())
    if order == "psm":
        return str(source)
    target = Path(tempfile.mkdtemp(prefix="moe-spm-")) / source.name
    shutil.copytree(source, target)
    config = json.loads((target / "tokenizer_config.json").read_text())
    (target / "tokenizer_config.json").write_text(json.dumps({**config, "fim_order": order}, indent=2))
    return str(target)


def run_layout(name: str, fields: dict, args, model: str, out: Path) -> dict:
    from ray import serve

    from serve_app.config import AppConfig
    from serve_app.deployments.app import build_app

    config = AppConfig(model=model, expert_shards=args.expert_shards, port=PORT, **fields)
    serve.run(build_app(config), name="moe-serve", route_prefix="/")
    url = f"http://127.0.0.1:{PORT}"
    try:
        wait_healthy(url, 300)
        cmd = [sys.executable, str(ROOT / "loadtests" / "run_slo.py"), "--host", url, "--users", str(args.users),
               "--run-time", args.run_time, "--out", str(out), "--label", name, "--metrics-settle-s", "6"]
        subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL)
        summary = json.loads((out / "summary.json").read_text())
    finally:
        serve.delete("moe-serve")
        time.sleep(2)
    inline = summary["stats"].get("inline (all FIM)", {})
    share = next((r["mean"] for r in summary["server_breakdown"] if r["stage"].startswith("prefix cache hit")), None)
    after_first = summary["cached_share"]["after_first"]["share"]
    failed = sum(s.get("failures", 0) for name, s in summary["stats"].items() if name != "inline (all FIM)")
    return {"layout": name, "n": inline.get("count"), "p50": inline.get("p50"), "p80": inline.get("p80"),
            "p99": inline.get("p99"), "share": share, "after_first": after_first, "failures": failed, "started": summary["started"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=16)
    p.add_argument("--run-time", default="2m")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--expert-shards", type=int, default=0,
                   help="0: inline requests run on the Routers' fast lane, which never crosses the shards")
    p.add_argument("--fim-order", choices=["psm", "spm"], default="psm")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated names from: " + ", ".join(LAYOUTS))
    p.add_argument("--out", type=Path, default=Path("/tmp/router-replicas"))
    args = p.parse_args()
    import ray

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    start_serve("127.0.0.1")
    model = model_copy(args.fim_order)
    print(f"load average {os.getloadavg()[0]:.2f} at start; {args.users} users, {args.run_time}, "
          f"FIM order {args.fim_order}, expert shards {args.expert_shards}")
    rows = []
    for r in range(args.rounds):
        for name in args.layouts.split(","):
            rows.append(run_layout(name, LAYOUTS[name], args, model, args.out / f"r{r}-{name}"))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n| layout | inline n | p50 ms | p80 ms | p99 ms | cached share of prompt tokens (server) | "
          f"after each session's first (answers' usage) | failures |\n|---|---|---|---|---|---|---|---|")
    for row in rows:
        share, after = (f"{row[k]:.1%}" if row[k] is not None else "-" for k in ("share", "after_first"))
        print(f"| {row['layout']} | {row['n']} | {row['p50']:.0f} | {row['p80']:.0f} | {row['p99']:.0f} | {share} | "
              f"{after} | {row['failures']} |")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
