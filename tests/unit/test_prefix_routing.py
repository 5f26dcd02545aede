"""Prefix-affine routing over Router replicas (issue 18): the affinity index, rendezvous hashing,
the config that turns it on. The router itself runs under real Serve in
tests/integration/test_prefix_routing.py."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from serve_app.config import AppConfig
from serve_app.deployments.prefix_routing import AffinityIndex, rendezvous


def test_the_longest_recorded_prefix_names_its_replica():
    index = AffinityIndex(block_size=4)
    session = list(range(100, 140))                          # 10 blocks
    index.record(index.hashes(session[:24]), "A")            # keystroke 1 went to A
    index.record(index.hashes(list(range(900, 930))), "B")   # another file to B
    grown = session[:33]                                     # keystroke 2: 8 full blocks, 6 known
    assert index.match(index.hashes(grown), {"A", "B"}) == ("A", 6)
    assert index.match(index.hashes(grown), {"B"}) == (None, 0)       # A gone: nobody has it
    index.record(index.hashes(session[:12]), "B")            # B got a shorter prefix later
    assert index.match(index.hashes(grown), {"A", "B"}) == ("A", 6)   # the longest still wins
    assert index.match(index.hashes(session[:12]), {"A", "B"}) == ("B", 3)
    edited = session[:8] + [7] + session[9:33]               # an edit in block 2: blocks 0-1 shared
    assert index.match(index.hashes(edited), {"A", "B"}) == ("B", 2)


def test_short_prompts_have_a_key_and_the_index_is_bounded():
    index = AffinityIndex(block_size=16, max_blocks=8)
    assert len(index.hashes([1, 2, 3])) == 1 and index.hashes([]) == []
    assert index.hashes([1, 2, 3]) != index.hashes([1, 2, 4])
    index.record(index.hashes(list(range(64))), "A")         # 4 blocks
    index.record(index.hashes(list(range(1000, 1096))), "B") # 6 blocks: A's oldest two go
    assert len(index.owner) == 8
    assert index.match(index.hashes(list(range(64))), {"A"}) == ("A", 4)   # its last blocks stay
    assert index.match(index.hashes(list(range(32))), {"A"}) == (None, 0)
    index.forget("B")
    assert set(index.owner.values()) == {"A"}


def test_rendezvous_is_stable_and_moves_only_a_leaving_replicas_keys():
    index = AffinityIndex(block_size=4)
    keys = [index.hashes([i, i + 1, i + 2, i + 3])[0] for i in range(400)]
    three = ["r1", "r2", "r3"]
    chosen = [rendezvous(k, three) for k in keys]
    assert chosen == [rendezvous(k, list(reversed(three))) for k in keys]      # order-free
    counts = {r: chosen.count(r) for r in three}
    assert min(counts.values()) > 90, counts                                   # spread (~133 each)
    after = [rendezvous(k, ["r1", "r3"]) for k in keys]
    assert all(a == c for a, c in zip(after, chosen) if c != "r2")             # only r2's keys moved


def test_num_routers_and_routing_in_the_config(tmp_path):
    from serve_app.deployments.app import build_app
    from serve_app.deployments.prefix_routing import PrefixAffinityRouter
    from tests.helpers.engines import build_model_dir

    assert AppConfig(num_routers=3).replicas("router") == {"num_replicas": 3}
    # Re-placing experts needs every transport and shard replica in reach (Router.apply_placement).
    assert AppConfig().single_replicas() and not AppConfig(num_routers=2).single_replicas()
    assert not AppConfig(expert_transport="serve",
                         autoscaling={"expert_shard": {"min_replicas": 1, "max_replicas": 2}}).single_replicas()
    assert AppConfig().replicas("router") == {}
    with pytest.raises(ValidationError, match="give one of them"):
        AppConfig(num_routers=2, autoscaling={"router": {"min_replicas": 1, "max_replicas": 2}})
    with pytest.raises(ValidationError, match="engine_host 'replica'"):
        AppConfig(num_routers=2, engine_host="process")
    model = build_model_dir(tmp_path, "mixtral", num_local_experts=4)
    router = build_app(AppConfig(model=str(model), num_routers=2, engine={"block_size": 8})) \
        ._bound_deployment.init_args[0]._bound_deployment
    config = router._deployment_config
    assert config.num_replicas == 2
    assert config.request_router_config.request_router_kwargs == {"block_size": 8}
    assert config.request_router_config.get_request_router_class() is PrefixAffinityRouter
    plain = build_app(AppConfig(model=str(model), router_routing="power_of_two")) \
        ._bound_deployment.init_args[0]._bound_deployment._deployment_config
    assert "PowerOfTwo" in plain.request_router_config.get_request_router_class().__name__


def test_moe_serve_takes_num_routers_and_embedded_refuses_several(capsys):
    from serve_app.cli import app_config_from_args, main, parse_args

    assert app_config_from_args(parse_args(["--num-routers", "2"])).num_routers == 2
    assert main(["--embedded", "--num-routers", "2"]) == 2
    assert "num_routers > 1 needs Ray" in capsys.readouterr().err
