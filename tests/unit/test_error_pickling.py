"""Errors that cross Ray keep their type and fields.

The Router raises engine errors that the Ingress maps to HTTP statuses; Ray pickles them. An
exception whose __init__ takes more than the message is pickled as (message,) by default and
fails to unpickle, which Ray reports as an UnserializableException: the Ingress then answered an
engine overload with 503 instead of 429 + Retry-After (found by loadtests/overload.py over Ray).
"""
from __future__ import annotations

import pickle

import pytest
from ray import cloudpickle

from serve_app.api.errors import BackendUnavailableError
from serve_app.engine import EngineOverloadedError, EngineStepError, EngineStoppedError, RequestRejectedError
from serve_app.engine.sampling_params import SamplingParamsError
from serve_app.model.moe import MissingExpertError
from serve_app.tokenizer import PromptError

ERRORS = [
    (EngineOverloadedError("queue full", 2.5), {"retry_after_s": 2.5}),
    (RequestRejectedError("too long", "max_tokens"), {"param": "max_tokens"}),
    (SamplingParamsError("top_p", "top_p must be in (0, 1]"), {"param": "top_p"}),
    (BackendUnavailableError("shard gone", 3.0), {"retry_after_s": 3.0}),
    (EngineStepError("step failed"), {}),
    (EngineStoppedError("stopped"), {}),
    (PromptError("bad prompt"), {}),
    (MissingExpertError("expert (0, 1) is not here"), {}),
]


@pytest.mark.parametrize("dumps, loads", [(pickle.dumps, pickle.loads), (cloudpickle.dumps, cloudpickle.loads)],
                         ids=["pickle", "ray.cloudpickle"])
@pytest.mark.parametrize("error, fields", ERRORS, ids=[type(e).__name__ for e, _ in ERRORS])
def test_engine_errors_survive_pickling_with_their_fields(error, fields, dumps, loads):
    back = loads(dumps(error))
    assert type(back) is type(error) and str(back) == str(error)
    for name, value in fields.items():
        assert getattr(back, name) == value
