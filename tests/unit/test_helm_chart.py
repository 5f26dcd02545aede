"""The Helm chart (helm/moe-serve), rendered offline with Helm's own library (helm-python-sdk).

What a chart can get wrong without any cluster to tell: a RayService that KubeRay's CRD rejects
(validated against the CRD's v1 schema, unknown fields included, as `kubectl apply` does), a
serveConfigV2 the app rejects (parsed with Ray's ServeDeploySchema and our AppConfig), GPUs that
are not requested, shards that could share a worker, API keys in plain config, and an example
that drifted from the chart. UPDATE_HELM_EXAMPLES=1 rewrites helm/examples/*.yaml from the chart.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import helm_python as helm
import pytest
import yaml

from serve_app.config import AppConfig, EngineConfig

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "moe-serve"
EXAMPLES = REPO / "helm" / "examples"
# KubeRay's CRD is test data beside the checkout (shared/), not part of the project.
CRD = REPO.parent / "shared" / "kuberay" / "ray.io_rayservices.yaml"

VALUE_SETS = {
    "defaults": {},
    "gpu-cluster": yaml.safe_load((EXAMPLES / "gpu-cluster-values.yaml").read_text()),
    "multi-gpu-pods": {"shards": {"count": 8, "gpusPerShard": 1, "onePerWorker": False},
                       "workers": {"replicas": 2, "gpus": 4}, "head": {"gpus": 1}},
    "explicit-placement": {"shards": {"count": 2, "placement": {"0": [0, 1, 2], "1": [[0, 3], [1, 4]],
                                                                "local": [5, 6, 7]}},
                           "engine": {"max_model_len": None, "scheduling": "static"}},
    "cpu-shards": {"shards": {"count": 2, "gpusPerShard": 0}, "workers": {"gpus": 0},
                   "env": [{"name": "OMP_NUM_THREADS", "value": "4"}]},
    "all-local": {"shards": {"count": 0}, "workers": {"replicas": 0}},
    "int8-only": {"precision": {"quantized": ["int8"], "fastLaneKvFraction": 0.25, "fullLaneMaxDeferS": 0}},
    "router-on-gpu": {"router": {"placement": "gpuWorker", "gpuWorker": {"gpus": 2}}},
    "two-routers": {"app": {"num_routers": 2, "router_routing": "power_of_two"}},
    "autoscaling": {"app": {"expert_transport": "serve", "autoscaling": {
        "ingress": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 64},
        "router": {"min_replicas": 1, "max_replicas": 3, "upscale_delay_s": 10},
        "expert_shard": {"min_replicas": 2, "max_replicas": 2}}}},
}


def render(values: dict, name: str = "moe") -> dict[str, list[dict]]:
    """{template path: [objects]} for the templates that render to something."""
    with helm.Chart.load(CHART) as chart:
        out = chart.render(values=values, name=name, namespace="serving")
    docs = {path: [d for d in yaml.safe_load_all(text) if d] for path, text in out.items()
            if not path.endswith("NOTES.txt")}
    return {path: objs for path, objs in docs.items() if objs}


def objects(values: dict) -> dict[str, dict]:
    by_kind = {}
    for objs in render(values).values():
        for obj in objs:
            assert obj["kind"] not in by_kind, f"two {obj['kind']} objects"
            by_kind[obj["kind"]] = obj
    return by_kind


def serve_config(rayservice: dict) -> dict:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


def ray_resources(start_params: dict) -> dict:
    """rayStartParams.resources is JSON inside a quoted string (KubeRay passes it to a shell)."""
    return json.loads(json.loads(start_params["resources"]))


def pods(rayservice: dict) -> dict[str, dict]:
    """The head group and each worker group, by name."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    return {"head": cluster["headGroupSpec"], **{g["groupName"]: g for g in cluster["workerGroupSpecs"]}}


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def rendered(request) -> tuple[dict, dict]:
    return VALUE_SETS[request.param], objects(VALUE_SETS[request.param])


def _strict(schema):
    """OpenAPI v3 → JSON Schema as the API server applies it: unknown fields are errors (kubectl's
    strict field validation), `nullable` allows null."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


@pytest.fixture(scope="module")
def crd_validator():
    if not CRD.exists():
        pytest.skip(f"KubeRay CRD not found at {CRD} (shared/ beside the checkout): "
                    "RayService schema validation NOT RUN; every other chart check still runs")
    import jsonschema

    crd = yaml.load(CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft4Validator(_strict(v1["schema"]["openAPIV3Schema"]))


def test_rayservice_satisfies_kuberay_v1_crd(rendered, crd_validator):
    _, objs = rendered
    errors = sorted(crd_validator.iter_errors(objs["RayService"]), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors[:10])


def test_crd_check_catches_unknown_and_mistyped_fields(crd_validator):
    rs = objects({})["RayService"]
    rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["rayStartParam"] = {}
    rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "2"
    messages = [e.message for e in crd_validator.iter_errors(rs)]
    assert any("rayStartParam" in m for m in messages) and any("'2'" in m for m in messages)


def test_serve_config_parses_as_ray_and_app_config(rendered):
    from ray.serve.schema import ServeDeploySchema

    values, objs = rendered
    config = serve_config(objs["RayService"])
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert app["import_path"] == "serve_app.deployments.app:build_app"
    parsed = AppConfig(**app["args"])
    parsed.engine_config()                   # batching limits reach EngineConfig intact (ints stay ints)
    assert parsed.expert_shards == values.get("shards", {}).get("count", 2)
    assert parsed.api_keys == ()             # keys come from the Secret, never from the config
    shards = {f"ExpertShard{i}" for i in range(parsed.expert_shards)}
    assert {d["name"] for d in app["deployments"]} <= {"Ingress", "Router"} | shards


def test_engine_limits_and_model_location_reach_the_app(rendered):
    values, objs = rendered
    args = serve_config(objs["RayService"])["applications"][0]["args"]
    assert args.get("engine", {}) == values.get("engine", {})
    assert args.get("model") == (values.get("model", {}).get("path") or None)
    assert args.get("served_model_name") == (values.get("model", {}).get("servedName") or None)
    assert args.get("placement") == (values.get("shards", {}).get("placement") or None)


def test_autoscaling_values_reach_the_app_config(rendered):
    values, objs = rendered
    parsed = AppConfig(**serve_config(objs["RayService"])["applications"][0]["args"])
    wanted = values.get("app", {}).get("autoscaling", {})
    assert {kind: scale.model_dump(exclude_unset=True) for kind, scale in parsed.autoscaling.items()} == wanted


def test_precision_values_reach_the_app_config(rendered):
    values, objs = rendered
    parsed = AppConfig(**serve_config(objs["RayService"])["applications"][0]["args"])
    chart = yaml.safe_load((CHART / "values.yaml").read_text())["precision"]
    precision = {**chart, **values.get("precision", {})}
    assert parsed.quantized_precisions == tuple(precision["quantized"])
    assert parsed.int4_group_size == precision["int4GroupSize"]
    assert parsed.fast_lane_kv_fraction == precision["fastLaneKvFraction"]
    assert parsed.full_lane_max_defer_s == precision["fullLaneMaxDeferS"]


def test_gpu_workers_request_and_limit_their_gpus(rendered):
    values, objs = rendered
    groups = pods(objs["RayService"])
    gpus = values.get("workers", {}).get("gpus", 1)
    worker = groups["gpu-workers"]["template"]["spec"]["containers"][0]["resources"]
    assert worker["requests"].get("nvidia.com/gpu", 0) == worker["limits"].get("nvidia.com/gpu", 0) == gpus
    head = groups["head"]["template"]["spec"]["containers"][0]["resources"]
    assert head["limits"].get("nvidia.com/gpu", 0) == values.get("head", {}).get("gpus", 0)


def test_ingress_and_router_are_pinned_to_the_head_or_the_router_to_its_gpu_group(rendered):
    values, objs = rendered
    config = serve_config(objs["RayService"])
    groups = pods(objs["RayService"])
    head_resources = ray_resources(groups["head"]["rayStartParams"])
    deployments = {d["name"]: d["ray_actor_options"] for d in config["applications"][0]["deployments"]}
    args = config["applications"][0]["args"]
    assert deployments["Ingress"]["resources"] == {"moe_head": 1} and head_resources["moe_head"] >= 1
    if values.get("router", {}).get("placement", "head") == "head":
        assert deployments["Router"]["resources"] == {"moe_head": 1} and "router-gpu" not in groups
        assert args["router_num_gpus"] == values.get("head", {}).get("gpus", 0)
        return
    gpus = values["router"]["gpuWorker"]["gpus"]
    group = groups["router-gpu"]
    container = group["template"]["spec"]["containers"][0]["resources"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 1
    assert ray_resources(group["rayStartParams"]) == {"moe_router": 1}
    assert container["requests"]["nvidia.com/gpu"] == container["limits"]["nvidia.com/gpu"] == gpus
    assert deployments["Router"]["resources"] == {"moe_router": 1} and deployments["Router"]["num_gpus"] == gpus
    assert args["router_num_gpus"] == gpus


def test_one_shard_per_worker_pod_through_a_slot_resource(rendered):
    values, objs = rendered
    args = serve_config(objs["RayService"])["applications"][0]["args"]
    worker = pods(objs["RayService"])["gpu-workers"]
    if values.get("shards", {}).get("onePerWorker", True):
        assert ray_resources(worker["rayStartParams"]) == {"moe_expert_slot": 1}
        assert args["shard_resources"] == {"moe_expert_slot": 1}
    else:
        assert "resources" not in worker["rayStartParams"] and "shard_resources" not in args


def test_api_keys_come_from_the_secret_on_every_ray_container():
    values = VALUE_SETS["gpu-cluster"]
    text = json.dumps(render(values))
    assert "api_keys" not in text
    for group in pods(objects(values)["RayService"]).values():
        env = {e["name"]: e for e in group["template"]["spec"]["containers"][0]["env"]}
        assert env["MOE_SERVE_API_KEYS"]["valueFrom"] == {
            "secretKeyRef": {"name": "moe-serve-api-keys", "key": "api-keys"}}
    for group in pods(objects({})["RayService"]).values():
        assert "env" not in group["template"]["spec"]["containers"][0]


def test_service_ingress_and_monitor_reach_the_right_ports():
    objs = objects(VALUE_SETS["gpu-cluster"])
    svc = objs["RayService"]["spec"]["serveService"]
    assert svc["spec"]["ports"] == [{"name": "serve", "port": 8000, "targetPort": 8000, "protocol": "TCP"}]
    rule = objs["Ingress"]["spec"]["rules"][0]
    assert rule["http"]["paths"][0]["backend"]["service"] == {"name": svc["metadata"]["name"],
                                                              "port": {"number": 8000}}
    assert objs["Ingress"]["spec"]["tls"] == [{"secretName": "moe-serve-tls", "hosts": ["moe.example.com"]}]
    monitor = objs["PodMonitor"]["spec"]
    assert monitor["podMetricsEndpoints"][0]["port"] == "metrics"
    for group in pods(objs["RayService"]).values():
        pod = group["template"]
        assert monitor["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        assert {"name": "metrics", "containerPort": 8080} in pod["spec"]["containers"][0]["ports"]
        assert group["rayStartParams"]["metrics-export-port"] == "8080"
    assert set(objects({})) == {"RayService"}          # monitor and ingress are opt-in


def test_model_volume_is_mounted_read_only_on_every_pod():
    for group in pods(objects(VALUE_SETS["gpu-cluster"])["RayService"]).values():
        spec = group["template"]["spec"]
        assert {"name": "model", "persistentVolumeClaim": {"claimName": "moe-models", "readOnly": True}} in spec["volumes"]
        assert {"name": "model", "mountPath": "/models", "readOnly": True} in spec["containers"][0]["volumeMounts"]


@pytest.mark.parametrize("values, message", [
    ({"shards": {"count": 3}}, "needs a worker pod of its own"),
    ({"shards": {"gpusPerShard": 2}}, "exceeds workers.gpus"),
    ({"shards": {"count": 9, "onePerWorker": False}, "workers": {"replicas": 2, "gpus": 4}}, "needs more GPUs"),
    ({"app": {"api_keys": ["plain-text-key"]}}, "api_keys"),
    ({"env": [{"name": "MOE_SERVE_API_KEYS", "value": "plain-text-key"}]}, "env/0/name"),
    ({"precisionPolicy": {"simple": "int4"}}, "precisionPolicy"),
    ({"precision": {"quantized": ["fp8"]}}, "precision/quantized/0"),
    ({"precision": {"fastLaneKvFraction": 1}}, "precision/fastLaneKvFraction"),
    ({"app": {"full_lane_max_defer_s": 2}}, "full_lane_max_defer_s"),
    ({"engine": {"max_num_seq": 8}}, "max_num_seq"),
    ({"workers": {"gpus": 0.5}}, "workers/gpus"),
])
def test_chart_refuses_values_that_cannot_work(values, message):
    with pytest.raises(helm.HelmError, match=re.escape(message)):
        render(values)


@pytest.mark.parametrize("values", [{}, VALUE_SETS["gpu-cluster"]], ids=["defaults", "gpu-cluster"])
def test_lint_is_clean(values):
    report = helm.lint(CHART, values, strict=True)
    assert report["errors"] == [] and report["messages"] == [], report


def test_values_schema_tracks_the_app_config():
    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]
    assert set(schema["engine"]["properties"]) == {f.name for f in dataclasses.fields(EngineConfig)}
    assert set(schema["app"]["properties"]) <= set(AppConfig.model_fields) - {"api_keys"}


def test_cluster_serve_config_deploys_the_same_graph_as_the_chart():
    """cluster/serve_config.yaml is what the multi-node test deploys; the chart must not drift from it."""
    from ray.serve.schema import ServeDeploySchema

    local = yaml.safe_load((REPO / "cluster" / "serve_config.yaml").read_text())
    ServeDeploySchema.model_validate(local)
    AppConfig(**local["applications"][0]["args"])
    chart = serve_config(objects({})["RayService"])
    for key in ("name", "import_path", "route_prefix"):
        assert local["applications"][0][key] == chart["applications"][0][key]
    pinned = {d["name"]: d["ray_actor_options"]["resources"] for d in local["applications"][0]["deployments"]}
    assert pinned == {d["name"]: d["ray_actor_options"]["resources"] for d in chart["applications"][0]["deployments"]}
    assert local["applications"][0]["args"]["shard_num_gpus"] == chart["applications"][0]["args"]["shard_num_gpus"]


def test_versions_agree_across_chart_image_and_package():
    import ray

    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'version = "{chart["appVersion"]}"' in pyproject
    dockerfile_ray = re.search(r"^ARG RAY_VERSION=(\S+)", (REPO / "cluster" / "Dockerfile").read_text(), re.M)
    assert dockerfile_ray and dockerfile_ray.group(1) == values["rayVersion"]
    assert values["rayVersion"].split(".")[:2] == ray.__version__.split(".")[:2]


def _example_text(values: dict) -> str:
    with helm.Chart.load(CHART) as chart:
        out = chart.render(values=values, name="moe", namespace="serving")
    parts = [f"---\n# Source: {path}\n{text.strip()}\n" for path, text in sorted(out.items())
             if text.strip() and not path.endswith("NOTES.txt")]
    return "# Rendered from gpu-cluster-values.yaml by tests/unit/test_helm_chart.py; do not edit.\n" + "".join(parts)


def test_committed_example_is_what_the_chart_renders():
    expected = _example_text(VALUE_SETS["gpu-cluster"])
    target = EXAMPLES / "gpu-cluster.yaml"
    if os.environ.get("UPDATE_HELM_EXAMPLES") == "1":
        target.write_text(expected)
    assert target.read_text() == expected, "helm/examples drifted: rerun with UPDATE_HELM_EXAMPLES=1"
