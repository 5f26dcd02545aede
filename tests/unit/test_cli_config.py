"""`moe-serve --config FILE`: AppConfig fields from a file; flags, then the environment, win over it."""
from __future__ import annotations

import pytest

from serve_app.cli import app_config_from_args, direct_ingress_env, main, parse_args


def test_config_file_fields_reach_the_app_config_and_flags_override_them(tmp_path, monkeypatch):
    monkeypatch.delenv("MOE_SERVE_PORT", raising=False)
    monkeypatch.delenv("MOE_SERVE_HOST", raising=False)
    path = tmp_path / "app.yaml"
    path.write_text("full_lane_max_defer_s: 0\nexpert_shards: 3\nport: 9123\nengine:\n  max_num_seqs: 8\n")
    config = app_config_from_args(parse_args(["--config", str(path)]))
    assert config.full_lane_max_defer_s == 0 and config.expert_shards == 3 and config.port == 9123
    assert config.engine_config().max_num_seqs == 8 and config.host == "127.0.0.1"
    config = app_config_from_args(parse_args(["--config", str(path), "--port", "9200", "--expert-shards", "1"]))
    assert config.port == 9200 and config.expert_shards == 1
    monkeypatch.setenv("MOE_SERVE_PORT", "9300")
    assert app_config_from_args(parse_args(["--config", str(path)])).port == 9300


def test_the_front_takes_the_public_port_and_the_ingress_replicas_the_ones_above(tmp_path, capsys):
    config = app_config_from_args(parse_args(["--port", "9400"]))
    assert config.front and config.ingress_ports() == (9401,)
    env = direct_ingress_env(config.ingress_ports())
    assert (env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"], env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]) == ("9401", "9402")
    config = app_config_from_args(parse_args(["--port", "9400", "--no-front"]))
    assert not config.front and direct_ingress_env(config.ingress_ports())["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] == "9400"
    # Several Ingress replicas need the front: without it they would share one port. Refused before Ray starts.
    path = tmp_path / "app.yaml"
    path.write_text("autoscaling:\n  ingress: {min_replicas: 1, max_replicas: 2}\n")
    assert main(["--config", str(path), "--no-front"]) == 2
    assert "needs the front" in capsys.readouterr().err
    scaled = app_config_from_args(parse_args(["--config", str(path), "--port", "9400"]))
    assert direct_ingress_env(scaled.ingress_ports())["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"] == "9403"


def test_a_config_file_with_an_unknown_field_is_refused(tmp_path):
    path = tmp_path / "app.json"
    path.write_text('{"expert_shard": 2}')
    with pytest.raises(ValueError, match="expert_shard"):
        app_config_from_args(parse_args(["--config", str(path)]))


def test_a_config_file_that_is_not_a_mapping_is_refused(tmp_path):
    path = tmp_path / "app.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(SystemExit, match="mapping"):
        app_config_from_args(parse_args(["--config", str(path)]))


def test_the_router_asks_for_a_gpu_only_when_told_or_when_the_cluster_has_one():
    from serve_app.config import AppConfig
    from serve_app.deployments.app import router_actor_options

    assert router_actor_options(AppConfig(router_num_gpus=1)) == {"num_cpus": 0.1, "num_gpus": 1.0}
    assert router_actor_options(AppConfig(router_num_gpus=0)) == {"num_cpus": 0.1}
    # This machine has no GPU (whether or not the test session's Ray cluster is up): "auto" asks none.
    assert router_actor_options(AppConfig()) == {"num_cpus": 0.1}
