"""The bundled default model through the server (issue 8): `moe-serve` with no --model serves it, and
FIM requests on held-out functions come back as the offline engine's completions, many of which parse.

The server runs embedded (the same FastAPI app and engine as the Ray deployment's, in one process):
the Ray path is covered on random checkpoints by test_serve_app, and a second Ray Ingress in one
session would fight the first for the direct-ingress port.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import httpx
import pytest

from serve_app.api.settings import GenerationDefaults
from serve_app.config import default_model_dir
from serve_app.engine import LLM, SamplingParams
from serve_app.tokenizer import CodeTokenizer
from serve_app.train import evaluate_server
from serve_app.train.evaluate import edit_similarity
from tests.helpers import servers
from tests.helpers.engines import fixed_kernels

MODEL = Path(default_model_dir())
CASES, MAX_TOKENS = 16, 64

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # No --model: the bundled default. The server process keeps the fixed table it started with.
    with fixed_kernels():
        log = tmp_path_factory.mktemp("default-model") / "server.log"
        stack = contextlib.ExitStack()
        url = stack.enter_context(servers.embedded_server(log))
    with stack:
        yield url


def test_no_model_argument_serves_the_bundled_checkpoint(server):
    models = httpx.get(f"{server}/v1/models", timeout=10).json()["data"]
    config = json.loads((MODEL / "config.json").read_text())
    assert [m["id"] for m in models] == [MODEL.name]
    assert models[0]["max_model_len"] == config["max_position_embeddings"]


def test_fim_on_held_out_functions_through_the_server_equals_the_engine_and_parses(server):
    fim = evaluate_server.load_cases(MODEL, num_fim=200, max_tokens=MAX_TOKENS, limit=CASES)
    report = evaluate_server.run(server, fim, MAX_TOKENS, precision="full")
    assert report["cases"] == CASES and report["statuses"] == {200: CASES}
    assert report["tier_precision"] and all(k.endswith("/full") for k in report["tier_precision"])
    # The offline engine on the same prompts (the served numerics: the checkpoint dtype, full-precision experts),
    # with the penalties the checkpoint's generation_config.json sets: the requests left them out.
    defaults = GenerationDefaults.from_model_dir(MODEL)
    tokenizer = CodeTokenizer.from_dir(MODEL)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, frequency_penalty=defaults.frequency_penalty,
                            presence_penalty=defaults.presence_penalty,
                            penalty_skips_structural=defaults.penalty_skips_structural)
    with fixed_kernels():
        offline = [o.outputs[0].text for o in LLM(MODEL).generate(
            [tokenizer.build_fim_prompt_ids(p, s) for p, s in fim.prompts], params)]
    assert report["completions"] == offline
    # Some completions must make the whole file parse (the model card reports the share on 200 cases).
    assert report["parse_rate"] > 0
    # The graded measures agree with the completions they summarise.
    assert 0 <= report["parse_rate_nonempty"] <= report["parse_rate"]
    similarity = sum(edit_similarity(t, c.middle) for t, c in zip(offline, fim.cases)) / CASES
    assert report["edit_similarity"] == pytest.approx(similarity, abs=1e-4)
