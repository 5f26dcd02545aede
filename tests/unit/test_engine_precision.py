"""Requests of different precisions share an engine without mixing their numerics."""
from __future__ import annotations

import random

import pytest
import torch

from serve_app.engine import RequestRejectedError
from serve_app.model import LocalExpertBackend
from tests.helpers.engines import build_model_dir, create_engine, greedy


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("prec"), "mixtral")


def _engine(model_dir):
    """An engine whose model also holds a second, different set of experts under 'int8' (a stand-in
    for quantized copies: what matters here is that the rows of each precision reach their own)."""
    engine = create_engine(model_dir)
    local = engine.model.local_experts
    other = LocalExpertBackend(local.holds(), engine.model.config.hidden_size,
                               engine.model.config.moe_intermediate_size)
    with torch.no_grad():
        for name, p in other.named_parameters():
            p.copy_(local.get_parameter(name) * 0.5)
    engine.model.set_expert_backend(other, "int8")
    return engine


def _run(engine, requests):
    for rid, prompt, precision in requests:
        engine.add_request(rid, prompt, greedy(10), precision=precision)
    return {rid: out.outputs[0].token_ids for rid, out in engine.run_until_done([r[0] for r in requests]).items()}


def test_mixed_precision_batch_equals_each_request_alone(model_dir):
    rng = random.Random(0)
    a, b = [rng.randrange(5, 320) for _ in range(11)], [rng.randrange(5, 320) for _ in range(7)]
    alone_a = _run(_engine(model_dir), [("a", a, "int8")])["a"]
    alone_b = _run(_engine(model_dir), [("b", b, "full")])["b"]
    together = _run(_engine(model_dir), [("a", a, "int8"), ("b", b, "full")])
    assert together == {"a": alone_a, "b": alone_b}
    full_a = _run(_engine(model_dir), [("a", a, "full")])["a"]
    assert full_a != alone_a                      # the int8 rows really used the other experts


def test_prefix_cache_is_not_shared_across_precisions(model_dir):
    engine = _engine(model_dir)
    prompt = list(range(5, 35))
    _run(engine, [("full", prompt, "full")])
    engine.add_request("int8", prompt, greedy(2), precision="int8")
    assert engine.run_until_done(["int8"])["int8"].num_cached_tokens == 0
    engine.add_request("full-again", prompt, greedy(2))
    assert engine.run_until_done(["full-again"])["full-again"].num_cached_tokens == 28


def test_unknown_precision_is_rejected(model_dir):
    engine = create_engine(model_dir)
    with pytest.raises(RequestRejectedError, match="int4") as exc:
        engine.add_request("x", [5, 6], greedy(), precision="int4")
    assert exc.value.param == "precision"
