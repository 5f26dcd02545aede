"""Autoscaling from AppConfig (issue 18): validated at the edge, applied to each deployment by build_app."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from serve_app.config import AppConfig, Autoscaling

SCALE = {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 4, "upscale_delay_s": 1,
         "downscale_delay_s": 5}


def test_bounds_are_checked():
    with pytest.raises(ValidationError, match="min_replicas 3 > max_replicas 2"):
        Autoscaling(min_replicas=3, max_replicas=2)
    with pytest.raises(ValidationError, match="initial_replicas"):
        Autoscaling(min_replicas=1, max_replicas=2, initial_replicas=5)
    with pytest.raises(ValidationError):
        AppConfig(autoscaling={"shard": SCALE})                     # not a deployment kind


def test_equal_bounds_are_a_fixed_count_and_a_range_is_serve_autoscaling():
    assert Autoscaling(min_replicas=2, max_replicas=2).serve_options() == {"num_replicas": 2}
    options = Autoscaling(**SCALE).serve_options()["autoscaling_config"]
    assert options["min_replicas"] == 1 and options["max_replicas"] == 3
    assert options["target_ongoing_requests"] == 4 and options["downscale_delay_s"] == 5
    assert "initial_replicas" not in options                       # unset: Serve's own default


def test_replicas_that_a_connection_would_leave_idle_are_refused():
    with pytest.raises(ValidationError, match="engine_host 'replica'"):
        AppConfig(engine_host="process", autoscaling={"router": SCALE})
    AppConfig(engine_host="auto", autoscaling={"router": SCALE})            # auto = replica
    with pytest.raises(ValidationError, match="expert_transport 'serve'"):
        AppConfig(expert_transport="socket", autoscaling={"expert_shard": SCALE})
    AppConfig(expert_transport="serve", autoscaling={"expert_shard": SCALE})
    AppConfig(expert_shards=0, autoscaling={"expert_shard": SCALE})         # no shards: nothing to scale


def test_build_app_gives_each_deployment_its_autoscaling(tmp_path):
    from serve_app.deployments.app import build_app
    from tests.helpers.engines import build_model_dir

    model = build_model_dir(tmp_path, "mixtral", num_local_experts=4)
    config = AppConfig(model=str(model), expert_shards=2, expert_transport="serve",
                       autoscaling={"router": SCALE, "expert_shard": {**SCALE, "max_replicas": 2},
                                    "ingress": {"min_replicas": 2, "max_replicas": 2}})
    ingress = build_app(config)._bound_deployment
    router = ingress.init_args[0]._bound_deployment
    shards = [s._bound_deployment for s in router.init_args[1]]
    assert ingress._deployment_config.num_replicas == 2
    auto = router._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (1, 3, 4)
    assert [s._deployment_config.autoscaling_config.max_replicas for s in shards] == [2, 2]
    plain = build_app(AppConfig(model=str(model), expert_shards=1))._bound_deployment
    assert plain._deployment_config.autoscaling_config is None
    assert plain._deployment_config.num_replicas == 1

