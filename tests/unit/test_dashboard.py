"""The Grafana dashboard and the PromQL in docs/metrics.md ask only for metrics that exist.

A dashboard panel over a misspelt or renamed metric shows "No data" forever and nobody notices;
here every expression is parsed for the metric names it selects, and each must be a definition of
serve_app.metrics (with Ray's `ray_` prefix in the dashboard; docs may show either form), with a
suffix its kind has (`_bucket` only on histograms). Where `promtool` is installed (CI installs
Debian's prometheus package) every expression is also checked as PromQL syntax.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from serve_app.metrics import BY_NAME, DEFINITIONS

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "cluster" / "grafana-dashboard.json"
METRICS_DOC = ROOT / "docs" / "metrics.md"
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
            "offset", "inf", "nan"}
SUFFIXES = {"counter": ("",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}


def _panels(node: dict) -> list[dict]:
    out = []
    for panel in node.get("panels", []):
        out.append(panel)
        out.extend(_panels(panel))            # collapsed rows nest their panels
    return out


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in _panels(dash) for t in p.get("targets", []) if t.get("expr")]


def doc_exprs() -> list[str]:
    blocks = re.findall(r"```promql\n(.*?)```", METRICS_DOC.read_text(), flags=re.S)
    return [line.strip() for block in blocks for line in block.strip().split("\n\n") if line.strip()]


def metric_names(expr: str) -> set[str]:
    """Identifiers of an expression that select series (not functions, labels or keywords)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)                 # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)                            # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)                           # range selectors
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\$\w+", " ", text)                                # Grafana variables
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][\w:]*)(\s*\()?", text):
        if m.group(2) or m.group(1).lower() in KEYWORDS:
            continue
        names.add(m.group(1))
    return names


def resolve(name: str, prefix: str | None) -> str | None:
    """The definition a selected name refers to (None if none): strips the prefix and the suffix."""
    if prefix is not None:
        if not name.startswith(prefix):
            return None
        name = name[len(prefix):]
    for d in DEFINITIONS:
        for suffix in SUFFIXES[d.kind]:
            if name == d.name + suffix:
                return d.name
    return None


def test_dashboard_is_valid_grafana_json_with_unique_panel_ids():
    dash = json.loads(DASHBOARD.read_text())
    panels = _panels(dash)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)) and panels
    for p in panels:
        assert {"x", "y", "w", "h"} <= set(p["gridPos"]) and p["title"]
        assert p["datasource"]["uid"] == "${datasource}"          # picked on import, not hard-wired
    assert any(p["type"] == "heatmap" for p in panels)


def test_every_dashboard_expression_selects_only_defined_metrics_with_ray_prefix():
    exprs = dashboard_exprs()
    assert exprs
    for expr in exprs:
        names = metric_names(expr)
        assert names, f"selects no metric: {expr}"
        unknown = sorted(n for n in names if resolve(n, "ray_") is None)
        assert not unknown, f"{unknown} in {expr!r} are not ray_-prefixed serve_app.metrics definitions"


def test_dashboard_shows_every_defined_metric():
    shown = {resolve(n, "ray_") for e in dashboard_exprs() for n in metric_names(e)}
    assert set(BY_NAME) - shown == set()


def test_latency_panel_marks_the_50ms_target():
    dash = json.loads(DASHBOARD.read_text())
    panel = next(p for p in _panels(dash) if "50 ms" in p["title"])
    steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert any(s["value"] == 0.05 for s in steps)
    assert any("histogram_quantile(0.8," in t["expr"] for t in panel["targets"])


def test_docs_promql_selects_only_defined_metrics_and_documents_each():
    exprs = doc_exprs()
    assert len(exprs) >= 3
    for expr in exprs:
        names = metric_names(expr)
        assert names and all(resolve(n, "ray_") or resolve(n, None) for n in names), expr
    doc = METRICS_DOC.read_text()
    for d in DEFINITIONS:
        assert f"`{d.name}`" in doc, f"{d.name} is not documented in docs/metrics.md"


def test_metric_name_extraction_skips_functions_labels_and_variables():
    expr = ('histogram_quantile(0.8, sum by (le) (rate(ray_moe_request_latency_seconds_bucket'
            '{endpoint="/v1/x", job=~"a|b"}[$__rate_interval]))) / ignoring(expert) group_left ray_moe_x')
    assert metric_names(expr) == {"ray_moe_request_latency_seconds_bucket", "ray_moe_x"}
    assert resolve("ray_moe_request_latency_seconds_bucket", "ray_") == "moe_request_latency_seconds"
    assert resolve("ray_moe_requests_total_bucket", "ray_") is None            # counters have no buckets


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (apt-get install prometheus)")
def test_every_expression_is_valid_promql(tmp_path):
    exprs = dashboard_exprs() + doc_exprs()
    grafana = {"$__rate_interval": "1m", "$__range": "1h", "$__interval": "15s"}
    rules = []
    for i, expr in enumerate(exprs):
        for var, value in grafana.items():
            expr = expr.replace(var, value)
        rules.append({"record": f"check:expr_{i}", "expr": expr})
    path = tmp_path / "rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))   # JSON is YAML
    proc = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
