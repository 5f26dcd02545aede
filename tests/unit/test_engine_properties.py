"""Property test: any interleaving of arrivals, steps, finishes, aborts and preemptions leaves the
KV bookkeeping consistent — no leaked block, no block shared by sequences that may differ in it."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serve_app.config import EngineConfig
from serve_app.engine import EngineCore, SamplingParams
from serve_app.model import load_model
from tests.helpers.engines import build_model_dir

BLOCK = 4


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(build_model_dir(tmp_path_factory.mktemp("prop"), "mixtral"))


# Prompts from a 3-token alphabet so prefixes (and prefix-cache hits) repeat often.
prompts = st.lists(st.integers(5, 7), min_size=1, max_size=20)
ops = st.lists(st.one_of(
    st.tuples(st.just("add"), prompts, st.integers(1, 6), st.integers(1, 2), st.booleans()),
    st.tuples(st.just("step")),
    st.tuples(st.just("abort"), st.integers(0, 50)),
), min_size=1, max_size=40)


def _check_sharing(engine: EngineCore) -> None:
    """A block held by two live sequences must be full, computed by both, and hold the same tokens."""
    holders: dict[int, list[tuple]] = {}
    for req in engine.requests.values():
        for seq in req.sequences:
            if seq.seq_id in engine.blocks:
                for idx, block in enumerate(engine.blocks.block_table(seq.seq_id)):
                    holders.setdefault(block, []).append((seq, idx))
    for block, users in holders.items():
        if len(users) < 2:
            continue
        for seq, idx in users:
            end = (idx + 1) * BLOCK
            assert seq.num_computed_tokens >= end, f"block {block} shared before it was computed"
        first_seq, idx = users[0]
        span = first_seq.token_ids[:(idx + 1) * BLOCK]
        assert all(s.token_ids[:(i + 1) * BLOCK] == span for s, i in users), f"block {block} shared by different prefixes"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(script=ops)
def test_any_interleaving_keeps_blocks_consistent_and_frees_all_when_idle(model, script):
    engine = EngineCore(model, EngineConfig(block_size=BLOCK, num_kv_blocks=12, max_num_batched_tokens=12,
                                            long_prefill_chunk=6, max_num_seqs=6), tokenizer=None)
    added = []
    for op in script:
        if op[0] == "add":
            _, prompt, max_tokens, n, sampled = op
            rid = f"r{len(added)}"
            params = SamplingParams(max_tokens=max_tokens, n=n, temperature=1.0 if sampled else 0.0,
                                    seed=len(added), ignore_eos=True)
            engine.add_request(rid, prompt, params)
            added.append(rid)
        elif op[0] == "step":
            engine.step()
        elif added:
            engine.abort(added[op[1] % len(added)])
        engine.blocks.check_invariants()
        _check_sharing(engine)
    engine.run_until_done()
    engine.blocks.check_invariants()
    assert not engine.has_unfinished()
    assert engine.blocks.num_used_blocks == 0
