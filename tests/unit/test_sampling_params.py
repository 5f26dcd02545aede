"""SamplingParams: defaults other modules rely on, normalisation, typed validation errors."""
from __future__ import annotations

import dataclasses

import pytest

from serve_app.engine.sampling_params import SamplingParams, SamplingParamsError


def test_defaults_match_the_documented_contract():
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k) == (16, 1.0, 1.0, 0)
    assert (p.seed, p.stop, p.stop_token_ids, p.ignore_eos, p.n, p.logprobs) == (None, (), (), False, 1, None)
    assert (p.frequency_penalty, p.presence_penalty, p.penalized) == (0.0, 0.0, False)
    assert [f.name for f in dataclasses.fields(SamplingParams)] == [
        "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids",
        "ignore_eos", "n", "logprobs", "frequency_penalty", "presence_penalty", "penalty_skips_structural",
        "logit_bias", "draft_token_ids"]
    assert p.logit_bias == () and p.draft_token_ids == ()


def test_params_are_frozen():
    p = SamplingParams()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 0.5  # type: ignore[misc]


@pytest.mark.parametrize("stop, expected", [
    ("\n\n", ("\n\n",)),
    (["a", "bc"], ("a", "bc")),
    (("x",), ("x",)),
    (None, ()),
])
def test_stop_is_normalised_to_a_tuple(stop, expected):
    assert SamplingParams(stop=stop).stop == expected


def test_stop_token_ids_list_is_normalised_to_a_tuple():
    assert SamplingParams(stop_token_ids=[2, 7]).stop_token_ids == (2, 7)


def test_normalised_params_compare_and_hash_equal():
    assert SamplingParams(stop=["a"]) == SamplingParams(stop="a")
    assert hash(SamplingParams(stop=["a"])) == hash(SamplingParams(stop=("a",)))


def test_greedy_means_temperature_zero():
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=0.0).greedy
    assert not SamplingParams(temperature=1e-3).greedy


@pytest.mark.parametrize("kwargs, param, value_text", [
    ({"temperature": -0.1}, "temperature", "-0.1"),
    ({"temperature": 2.5}, "temperature", "2.5"),
    ({"temperature": float("nan")}, "temperature", "nan"),
    ({"temperature": "hot"}, "temperature", "'hot'"),
    ({"top_p": 0.0}, "top_p", "0.0"),
    ({"top_p": 1.01}, "top_p", "1.01"),
    ({"top_k": -2}, "top_k", "-2"),
    ({"top_k": 1.5}, "top_k", "1.5"),
    ({"max_tokens": 0}, "max_tokens", "0"),
    ({"max_tokens": True}, "max_tokens", "True"),
    ({"n": 0}, "n", "0"),
    ({"n": 17}, "n", "17"),
    ({"logprobs": -1}, "logprobs", "-1"),
    ({"logprobs": 21}, "logprobs", "21"),
    ({"seed": -5}, "seed", "-5"),
    ({"seed": 2**63}, "seed", str(2**63)),
    ({"stop": [""]}, "stop", "''"),
    ({"stop": [f"s{i}" for i in range(9)]}, "stop", "9"),
    ({"stop": [1]}, "stop", "1"),
    ({"stop": 3}, "stop", "3"),
    ({"stop_token_ids": [-1]}, "stop_token_ids", "-1"),
    ({"ignore_eos": "yes"}, "ignore_eos", "'yes'"),
])
def test_invalid_values_raise_typed_error_naming_field_and_value(kwargs, param, value_text):
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param
    assert value_text in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("kwargs", [
    {"temperature": 0}, {"temperature": 2}, {"top_p": 1e-6}, {"top_k": -1}, {"top_k": 50},
    {"n": 16}, {"logprobs": 0}, {"logprobs": 20}, {"seed": 0}, {"max_tokens": 1},
    {"stop": [f"s{i}" for i in range(8)]},
])
def test_boundary_values_are_accepted(kwargs):
    p = SamplingParams(**kwargs)
    for name, value in kwargs.items():
        assert getattr(p, name) == (tuple(value) if isinstance(value, list) else value)


def test_logit_bias_is_normalised_from_openai_string_keys_and_checked():
    params = SamplingParams(logit_bias={"50": 1, 3: -100.0, "7": 2.5})
    assert params.logit_bias == ((3, -100.0), (7, 2.5), (50, 1.0))
    assert SamplingParams(logit_bias=None).logit_bias == () == SamplingParams().logit_bias
    for bad in ({"x": 1}, {"-1": 1}, {"1.5": 1}, {"1": 100.5}, {"1": float("nan")}, {True: 1}, {"1": "2"},
                {str(i): 1 for i in range(301)}, [1, 2], 5):
        with pytest.raises(SamplingParamsError) as err:
            SamplingParams(logit_bias=bad)
        assert err.value.param == "logit_bias"
