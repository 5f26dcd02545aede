"""Speculative decoding (engine/speculative.py): INT8 drafts, full-precision verification.

Greedy output equals non-speculative output token for token (float32, many prompts, penalties,
candidates forked from one prompt, stop tokens); the rejection sampler's output has the target's
distribution (chi-square on a small vocabulary); drafts are really made and kept; no draft KV is
left behind in the blocks or the prefix cache.
"""
from __future__ import annotations

import random

import pytest
import torch

from serve_app.config import EngineConfig
from serve_app.engine import EngineCore, SamplingParams
from serve_app.engine.sequence import Request, Sequence
from serve_app.engine.speculative import Draft, Speculator
from serve_app.engine.stop import StopChecker
from serve_app.model import load_model
from serve_app.model.precision import add_quantized_lanes
from tests.helpers.checkpoints import build_checkpoint

ENGINE = dict(block_size=4, num_kv_blocks=512, max_num_batched_tokens=64, long_prefill_chunk=16)


class Steps:
    """Observer: counts steps and the speculative stats of each."""

    def __init__(self):
        self.steps, self.sequences, self.drafted, self.accepted = 0, 0, 0, 0

    def on_step(self, stats):
        self.steps += 1
        if stats.speculative is not None:
            self.sequences += stats.speculative.sequences
            self.drafted += stats.speculative.drafted
            self.accepted += stats.speculative.accepted


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe"])
def model(request, tmp_path_factory):
    ckpt = build_checkpoint(tmp_path_factory.mktemp("spec"), request.param)
    m = load_model(ckpt.path)                                   # float32: the parity lane
    add_quantized_lanes(m, m.local_experts, ("int8",), 32, torch.float32)
    return m


def _engine(model, k: int, observer=None) -> EngineCore:
    return EngineCore(model, EngineConfig(**ENGINE, speculative_tokens=k), observer=observer)


def _prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab) for _ in range(rng.randrange(3, 30))] for _ in range(n)]


def _run(engine: EngineCore, prompts, params: SamplingParams) -> list[list[list[int]]]:
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    final = engine.run_until_done()
    return [[c.token_ids for c in final[f"r{i}"].outputs] for i in range(len(prompts))]


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("extra", [{}, {"frequency_penalty": 0.8, "presence_penalty": 0.3}, {"n": 3}],
                         ids=["plain", "penalties", "n3"])
def test_greedy_output_equals_non_speculative(model, k, extra):
    prompts = _prompts(12, model.config.vocab_size, seed=k)
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, **extra)
    steps = Steps()
    want = _run(_engine(model, 0), prompts, params)
    got = _run(_engine(model, k, steps), prompts, params)
    assert got == want
    # The drafts were made and (INT8 next to float32) mostly kept.
    assert steps.drafted > 0 and steps.accepted / steps.drafted > 0.5


def test_speculation_takes_fewer_steps_and_leaves_no_block_behind(model):
    prompts = _prompts(4, model.config.vocab_size, seed=9)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    plain, spec = Steps(), Steps()
    _run(_engine(model, 0, plain), prompts, params)
    engine = _engine(model, 4, spec)
    _run(engine, prompts, params)
    assert spec.steps < plain.steps
    assert (spec.accepted + spec.sequences) / spec.sequences > 1.5       # tokens per verification pass
    engine.blocks.check_invariants()
    assert engine.blocks.num_used_blocks == 0


def test_the_prefix_cache_never_serves_draft_kv(model):
    """A second request whose prompt is the first one's prompt + output reuses the first one's
    cached blocks; its output must equal a fresh non-speculative engine's."""
    prompt = _prompts(1, model.config.vocab_size, seed=3)[0]
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    engine = _engine(model, 4)
    first = _run(engine, [prompt], params)[0][0]
    follow = prompt + first
    again = _run(engine, [follow], params)[0][0]
    assert engine.blocks.prefix_cache_stats.hits > 0
    assert again == _run(_engine(model, 0), [follow], params)[0][0]


def test_stop_tokens_and_max_tokens_cut_inside_a_verified_run(model):
    prompts = _prompts(6, model.config.vocab_size, seed=5)
    want = _run(_engine(model, 0), prompts, SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True))
    stop = [w[0][3] for w in want]                               # a token each output makes
    for i, p in enumerate(prompts):
        params = SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True, stop_token_ids=[stop[i]])
        got = _run(_engine(model, 4), [p], params)[0][0]
        ref = _run(_engine(model, 0), [p], params)[0][0]
        assert got == ref and len(got) <= 4


def test_sampled_requests_run_and_report_acceptance(model):
    prompts = _prompts(6, model.config.vocab_size, seed=11)
    steps = Steps()
    outs = _run(_engine(model, 3, steps), prompts, SamplingParams(max_tokens=16, temperature=0.8, seed=1,
                                                                  ignore_eos=True))
    assert all(len(o[0]) == 16 for o in outs)
    assert steps.drafted > 0 and 0 < steps.accepted <= steps.drafted


# ---- the rejection sampler alone: output distribution = target distribution -----------------------

V = 5


def _seq(params: SamplingParams, seed: int) -> Sequence:
    req = Request("r", [1], params)
    gen = torch.Generator().manual_seed(seed)
    return Sequence("r#0", req, 0, [1], gen, StopChecker(()), None)


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rejection_sampling_keeps_the_target_distribution(temperature):
    """Target logits p_0, p_1 per position, a draft distribution q far from them: the first token
    is distributed as softmax(p_0 / T), and the second (emitted when the first draft was kept) as
    softmax(p_1 / T). 4 degrees of freedom: chi-square < 18.5 is p > 0.001."""
    target = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5], [0.0, 0.0, 1.5, 0.3, -2.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    q = torch.tensor([[0.05, 0.05, 0.3, 0.3, 0.3], [0.6, 0.1, 0.1, 0.1, 0.1]])
    params = SamplingParams(max_tokens=100, temperature=temperature)
    speculator = Speculator(runner=None, blocks=None, k=2, precision="int8", max_model_len=100)
    first, second = torch.zeros(V), torch.zeros(V)
    gen = torch.Generator().manual_seed(0)
    for trial in range(6000):
        drafts = [int(torch.multinomial(q[i], 1, generator=gen)) for i in range(2)]
        tokens = speculator.verify(_seq(params, trial), target, Draft(drafts, [q[0], q[1]]), None)
        assert 1 <= len(tokens) <= 3
        first[tokens[0]] += 1
        if len(tokens) >= 2:
            second[tokens[1]] += 1
    p = (target / temperature).softmax(-1)
    assert _chi2(first, p[0]) < 18.5
    assert second.sum() > 500 and _chi2(second, p[1]) < 18.5


def test_greedy_verification_keeps_the_drafts_up_to_the_first_disagreement():
    target = torch.zeros(4, V)
    target[0, 2] = target[1, 4] = target[2, 1] = target[3, 0] = 5.0     # argmax 2, 4, 1, 0
    speculator = Speculator(runner=None, blocks=None, k=3, precision="int8", max_model_len=100)
    seq = _seq(SamplingParams(max_tokens=100, temperature=0.0), 0)
    assert speculator.verify(seq, target, Draft([2, 4, 1], []), None) == [2, 4, 1, 0]    # all kept + bonus
    assert speculator.verify(seq, target, Draft([2, 3, 1], []), None) == [2, 4]          # corrected at 2nd
    assert speculator.verify(seq, target, Draft([0, 4, 1], []), None) == [2]


def test_draft_length_adapts_to_the_acceptance():
    speculator = Speculator(runner=None, blocks=None, k=6, precision="int8", max_model_len=100)
    seq = _seq(SamplingParams(max_tokens=100, temperature=0.0), 0)
    lengths = []
    for drafted, kept in ((6, 2), (5, 0), (4, 4), (6, 6), (6, 1)):
        speculator.adapt(seq, drafted, kept)
        lengths.append(seq.draft_len)
    assert lengths == [5, 4, 6, 6, 5]


# ---- prompt-lookup drafts (quantized rows) ------------------------------------------------------

def test_lookup_index_drafts_what_followed_the_last_earlier_occurrence_of_the_tail():
    from serve_app.engine.speculative import LookupIndex
    index = LookupIndex()
    assert index.draft([1, 2, 3, 9, 1, 2], 3) == [3, 9, 1]          # tail (1, 2) seen at 0..1
    assert index.draft([1, 2, 3, 9, 1, 2, 7], 3) == []               # 7 never seen before
    assert index.draft([1, 2, 3, 9, 1, 2, 7, 9], 2) == [1, 2]        # (7, 9) no, (9,) at 3
    assert LookupIndex().draft([5, 5, 5, 5], 2) == [5]               # the latest earlier (5, 5, 5)


def _lookup_engine(model, k: int, observer=None) -> EngineCore:
    return EngineCore(model, EngineConfig(**ENGINE, speculative_tokens=0, speculative_lookup_tokens=k),
                      observer=observer)


def _repetitive_prompts(n: int, vocab: int) -> list[list[int]]:
    rng = random.Random(4)
    out = []
    for _ in range(n):
        motif = [rng.randrange(1, vocab) for _ in range(rng.randrange(3, 7))]
        out.append(motif * rng.randrange(2, 5) + motif[:2])
    return out


@pytest.mark.parametrize("precision", ["int8", "full"])
def test_lookup_drafts_keep_greedy_output_and_are_kept_on_repetitive_text(model, precision):
    prompts = _repetitive_prompts(10, model.config.vocab_size)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    steps = Steps()

    def run(engine):
        for i, p in enumerate(prompts):
            engine.add_request(f"r{i}", p, params, precision=precision)
        final = engine.run_until_done()
        return [final[f"r{i}"].outputs[0].token_ids for i in range(len(prompts))]
    want = run(_lookup_engine(model, 0))
    engine = _lookup_engine(model, 4, steps)
    assert run(engine) == want
    assert steps.drafted > 0 and steps.accepted > 0
    engine.blocks.check_invariants()
    assert engine.blocks.num_used_blocks == 0


def test_rejection_sampling_with_a_one_hot_proposal_keeps_the_target_distribution():
    """A lookup draft has q = one-hot: kept with probability p(d), else a draw from p without d."""
    target = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5], [0.0, 0.0, 1.5, 0.3, -2.0]])
    params = SamplingParams(max_tokens=100, temperature=1.0)
    speculator = Speculator(runner=None, blocks=None, k=1, precision="int8", max_model_len=100)
    first = torch.zeros(V)
    for trial in range(5000):
        tokens = speculator.verify(_seq(params, trial), target, Draft([0], []), None)
        first[tokens[0]] += 1
    assert _chi2(first, target[0].softmax(-1)) < 18.5
