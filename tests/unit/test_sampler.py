"""Sampler: greedy = argmax, seeded reproducibility independent of the batch, top-k/top-p support,
distribution, and logprobs from the raw logits."""
from __future__ import annotations

import math

import pytest
import torch

from serve_app.engine.sampler import SamplerError, SamplerOutput, make_generator, sample
from serve_app.engine.sampling_params import SamplingParams, SamplingParamsError

V = 50


def _logits(B: int, seed: int = 0, vocab: int = V) -> torch.Tensor:
    return torch.randn(B, vocab, generator=torch.Generator().manual_seed(seed)) * 3  # [B, V]


def _sample_rows(logits, params):
    gens = [make_generator(p) for p in params]
    return sample(logits, params, gens)


def test_all_greedy_batch_equals_argmax():
    logits = _logits(8)
    out = _sample_rows(logits, [SamplingParams(temperature=0)] * 8)
    assert isinstance(out, SamplerOutput)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 8


def test_greedy_rows_in_mixed_batch_equal_argmax():
    logits = _logits(6)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.5, seed=3)] * 3
    out = _sample_rows(logits, params)
    expected = logits.argmax(-1).tolist()
    assert [out.token_ids[i] for i in (0, 2, 4)] == [expected[i] for i in (0, 2, 4)]
    assert len(out.token_ids) == 6 and all(0 <= t < V for t in out.token_ids)


@pytest.mark.parametrize("temperature", [1.267186652786592e-138, 1e-30, 5e-6])
def test_a_vanishing_temperature_is_greedy_not_an_id_past_the_vocabulary(temperature):
    """The API fuzzer's find: logits / 1e-138 overflowed, the softmax went NaN and the draw
    returned an id past the vocabulary, which failed the engine's next step."""
    logits = _logits(4)
    params = [SamplingParams(temperature=temperature, top_p=0.9, seed=i) for i in range(4)]
    assert all(p.greedy for p in params)
    assert _sample_rows(logits, params).token_ids == logits.argmax(-1).tolist()


def test_nan_logits_never_give_an_id_past_the_vocabulary():
    logits = _logits(3)
    logits[1] = float("nan")
    out = _sample_rows(logits, [SamplingParams(temperature=1.0, seed=i) for i in range(3)])
    assert all(0 <= t < V for t in out.token_ids)


def test_greedy_on_bfloat16_logits_equals_argmax():
    logits = _logits(4).to(torch.bfloat16)
    out = _sample_rows(logits, [SamplingParams(temperature=0)] * 4)
    assert out.token_ids == logits.argmax(-1).tolist()


def _run_steps(params_per_row, row_of_interest, steps=5):
    """Sample `steps` times; return the tokens of one row (its generator persists across steps)."""
    gens = [make_generator(p) for p in params_per_row]
    tokens = []
    for step in range(steps):
        logits = _logits(len(params_per_row), seed=100 + step)
        logits[row_of_interest] = _logits(1, seed=step)[0]  # same logits for the row in every batch
        tokens.append(sample(logits, params_per_row, gens).token_ids[row_of_interest])
    return tokens


def test_seeded_row_reproduces_regardless_of_batch_composition():
    mine = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)
    alone = _run_steps([mine], 0)
    torch.manual_seed(0)
    crowded = _run_steps([SamplingParams(temperature=0.7), SamplingParams(temperature=0), mine,
                          SamplingParams(top_k=3, seed=9)], 2)
    torch.manual_seed(1)
    crowded_again = _run_steps([mine, SamplingParams(temperature=1.9, top_p=0.5)], 0)
    assert alone == crowded == crowded_again


def test_candidates_of_one_request_get_seed_plus_index_generators():
    p = SamplingParams(seed=40, n=4)
    gens = [make_generator(p, i) for i in range(4)]
    assert [g.initial_seed() for g in gens] == [40, 41, 42, 43]
    assert make_generator(SamplingParams()) is None
    logits = torch.zeros(4, 1000)  # uniform: candidates only agree by chance
    first = sample(logits, [p] * 4, gens).token_ids
    assert len(set(first)) > 1
    again = sample(logits, [p] * 4, [make_generator(p, i) for i in range(4)]).token_ids
    assert first == again


def test_top_k_one_is_argmax_even_at_high_temperature():
    logits = _logits(16)
    out = _sample_rows(logits, [SamplingParams(temperature=2.0, top_k=1, seed=i) for i in range(16)])
    assert out.token_ids == logits.argmax(-1).tolist()


def test_top_k_samples_only_from_the_k_most_likely_tokens():
    logits = _logits(1).expand(400, V).contiguous()  # [400, V] same row, 400 independent draws
    params = [SamplingParams(temperature=2.0, top_k=5, seed=i) for i in range(400)]
    out = _sample_rows(logits, params)
    top5 = set(logits[0].topk(5).indices.tolist())
    assert set(out.token_ids) <= top5
    assert len(set(out.token_ids)) >= 3  # it does sample, not just argmax


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    logits = probs.log().expand(500, 4).contiguous()  # [500, 4]
    out = _sample_rows(logits, [SamplingParams(top_p=0.5, seed=i) for i in range(500)])
    assert set(out.token_ids) == {0, 1}  # 0.4 < 0.5, so token 1 completes the nucleus


def test_tiny_top_p_keeps_at_least_the_top_token():
    logits = _logits(32)
    out = _sample_rows(logits, [SamplingParams(top_p=1e-9, temperature=2.0, seed=i) for i in range(32)])
    assert out.token_ids == logits.argmax(-1).tolist()


def test_mixed_top_k_and_top_p_rows_each_get_their_own_filter():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    logits = probs.log().expand(600, 4).contiguous()  # [600, 4]
    params = [SamplingParams(top_k=1, seed=i) if i % 3 == 0 else
              SamplingParams(top_p=0.5, seed=i) if i % 3 == 1 else SamplingParams(seed=i)
              for i in range(600)]
    out = _sample_rows(logits, params)
    assert {out.token_ids[i] for i in range(0, 600, 3)} == {0}
    assert {out.token_ids[i] for i in range(1, 600, 3)} == {0, 1}
    assert {out.token_ids[i] for i in range(2, 600, 3)} == {0, 1, 2, 3}  # filters off: full vocab


def test_sampling_frequencies_follow_softmax():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    logits = probs.log().expand(4000, 4).contiguous()  # [4000, 4]
    out = _sample_rows(logits, [SamplingParams(seed=i) for i in range(4000)])
    freq = torch.bincount(torch.tensor(out.token_ids), minlength=4).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03), freq


def test_unseeded_rows_use_the_global_rng():
    logits = torch.zeros(64, 1000)  # [64, 1000] uniform
    params = [SamplingParams()] * 64
    torch.manual_seed(5)
    a = sample(logits, params, [None] * 64).token_ids
    torch.manual_seed(5)
    b = sample(logits, params, [None] * 64).token_ids
    c = sample(logits, params, [None] * 64).token_ids
    assert a == b and a != c


def test_low_temperature_sharpens_the_distribution():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    logits = probs.log().expand(1000, 4).contiguous()  # [1000, 4]
    cold = _sample_rows(logits, [SamplingParams(temperature=0.1, seed=i) for i in range(1000)])
    assert cold.token_ids.count(0) > 900  # p0 ∝ 0.4^10: about 0.94 of the mass


def test_logprobs_come_from_raw_logits_not_tempered():
    logits = _logits(3)
    params = [SamplingParams(temperature=0.3, seed=1, logprobs=5), SamplingParams(temperature=0, logprobs=0),
              SamplingParams(temperature=1.0, seed=2)]
    out = _sample_rows(logits, params)
    raw = torch.log_softmax(logits, -1)  # [3, V]
    for row in (0, 1):
        lp = out.logprobs[row]
        assert lp is not None and lp.token_id == out.token_ids[row]
        assert math.isclose(lp.logprob, raw[row, lp.token_id].item(), rel_tol=1e-5, abs_tol=1e-6)
        assert lp.rank == int((raw[row] > raw[row, lp.token_id]).sum()) + 1
    assert out.logprobs[2] is None
    top = out.logprobs[0]
    assert len(top.top_token_ids) == 5 and list(top.top_token_ids) == raw[0].topk(5).indices.tolist()
    assert list(top.top_logprobs) == sorted(top.top_logprobs, reverse=True)
    assert out.logprobs[1].top_token_ids == () and out.logprobs[1].rank == 1  # greedy = rank 1


def test_logprobs_larger_than_vocab_are_capped():
    logits = _logits(1, vocab=4)
    out = _sample_rows(logits, [SamplingParams(temperature=0, logprobs=20)])
    assert len(out.logprobs[0].top_token_ids) == 4
    assert math.isclose(sum(math.exp(x) for x in out.logprobs[0].top_logprobs), 1.0, rel_tol=1e-5)


def test_sampling_does_not_modify_the_callers_logits():
    logits = _logits(4)
    before = logits.clone()
    _sample_rows(logits, [SamplingParams(temperature=0.5, top_k=3, top_p=0.8, seed=i) for i in range(4)])
    assert torch.equal(logits, before)


@pytest.mark.parametrize("shape, n_params, n_gens", [((2, V), 3, 3), ((2, V), 2, 1), ((V,), 1, 1), ((0, V), 0, 0)])
def test_mismatched_inputs_raise_sampler_error(shape, n_params, n_gens):
    with pytest.raises(SamplerError):
        sample(torch.zeros(shape), [SamplingParams()] * n_params, [None] * n_gens)


# --- penalties (OpenAI's frequency_penalty / presence_penalty) --------------------------------


def test_penalties_lower_exactly_the_generated_tokens_logits():
    logits = torch.zeros(1, 6)
    logits[0] = torch.tensor([0.0, 3.0, 2.9, 2.0, 1.0, 0.5])
    generated = [[1, 1, 3]]                     # token 1 twice, token 3 once
    params = [SamplingParams(temperature=0, frequency_penalty=0.5, presence_penalty=0.2)]
    out = sample(logits, params, [None], generated)
    # 1: 3.0 - 2*0.5 - 0.2 = 1.8; 3: 2.0 - 0.5 - 0.2 = 1.3; 2 is untouched at 2.9 and wins.
    assert out.token_ids == [2]
    params = [SamplingParams(temperature=0, frequency_penalty=0.04, presence_penalty=0.0)]
    assert sample(logits, params, [None], generated).token_ids == [1]   # 3.0 - 0.08 = 2.92 > 2.9


def test_negative_penalties_favour_generated_tokens():
    logits = torch.tensor([[1.0, 2.0, 0.5]])
    out = sample(logits, [SamplingParams(temperature=0, presence_penalty=-2.0)], [None], [[2]])
    assert out.token_ids == [2]                 # 0.5 + 2.0 > 2.0


def test_penalties_stay_in_their_row_and_logprobs_stay_raw():
    logits = _logits(3)
    top = logits.argmax(-1).tolist()
    params = [SamplingParams(temperature=0, frequency_penalty=2.0, logprobs=0),
              SamplingParams(temperature=0, logprobs=0),
              SamplingParams(temperature=0.8, seed=1, presence_penalty=2.0)]
    generated = [[top[0]] * 20, [top[1]] * 20, []]          # row 1 is not penalized; row 2 has no output yet
    out = sample(logits, params, [make_generator(p) for p in params], generated)
    assert out.token_ids[0] != top[0] and out.token_ids[1] == top[1]
    assert out.token_ids[2] == sample(logits[2:], params[2:], [make_generator(params[2])], [[]]).token_ids[0]
    raw = logits.log_softmax(-1)
    assert math.isclose(out.logprobs[0].logprob, raw[0, out.token_ids[0]].item(), rel_tol=1e-5)


def test_random_rows_never_draw_a_token_penalized_far_below_the_rest():
    logits = torch.zeros(1, 4)
    params = [SamplingParams(temperature=1.0, seed=s, frequency_penalty=2.0) for s in range(200)]
    outs = [sample(logits, [p], [make_generator(p)], [[0] * 40]).token_ids[0] for p in params]
    assert 0 not in outs and set(outs) == {1, 2, 3}


def test_penalized_rows_without_their_output_ids_are_an_error():
    with pytest.raises(SamplerError):
        sample(_logits(1), [SamplingParams(frequency_penalty=1.0)], [None])
    with pytest.raises(SamplerError):
        sample(_logits(2), [SamplingParams()] * 2, [None] * 2, [[1]])


@pytest.mark.parametrize("field", ["frequency_penalty", "presence_penalty"])
@pytest.mark.parametrize("value", [2.01, -3, float("nan"), True])
def test_penalty_out_of_range_is_rejected(field, value):
    with pytest.raises(SamplingParamsError) as err:
        SamplingParams(**{field: value})
    assert err.value.param == field


def test_logit_bias_moves_only_its_rows_tokens_and_applies_to_greedy_rows():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    best = logits.argmax(dim=-1)
    target = int(logits[1].argmin())
    params = [SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.0, logit_bias={str(target): 100}),
              SamplingParams(temperature=0.0, logit_bias={int(best[2]): -100})]
    before = logits.clone()
    out = sample(logits, params, [None] * 3, output_ids=[[], [], []])
    assert out.token_ids[0] == int(best[0]) and out.token_ids[1] == target and out.token_ids[2] != int(best[2])
    assert torch.equal(logits, before)                         # the caller's logits are not modified
    # Random rows see the bias too: +100 dominates any temperature-1 draw.
    hot = sample(logits[:1], [SamplingParams(temperature=1.0, seed=3, logit_bias={7: 100})], [None])
    assert hot.token_ids == [7]


def test_logit_bias_and_penalties_combine():
    logits = torch.zeros(1, 10)
    logits[0, 4] = 5.0
    params = [SamplingParams(temperature=0.0, frequency_penalty=2.0, logit_bias={4: -2.0, 6: 1.5})]
    # token 4: 5 - 2 (bias) - 2 * 1 (one earlier occurrence) = 1 < token 6: 1.5
    assert sample(logits, params, [None], output_ids=[[4]]).token_ids == [6]


def test_penalty_skips_structural_tokens_only_for_rows_that_ask():
    logits = torch.zeros(2, 6)
    logits[:, 2] = 1.0                                  # token 2 (say "    ") leads, token 5 next
    logits[:, 5] = 0.5
    structural = torch.tensor([False, False, True, False, False, False])
    params = [SamplingParams(temperature=0.0, frequency_penalty=1.0),
              SamplingParams(temperature=0.0, frequency_penalty=1.0, penalty_skips_structural=True)]
    out = sample(logits, params, [None, None], output_ids=[[2], [2, 5]], structural=structural)
    # Row 0: token 2 pays 1.0 → 0.0 < token 5's 0.5. Row 1: token 2 keeps 1.0; token 5 pays → -0.5.
    assert out.token_ids == [5, 2]
    with pytest.raises(SamplerError, match="structural"):
        sample(logits, params, [None, None], output_ids=[[2], [2]])


def test_greedy_tokens_is_argmax_with_ties_and_nans():
    from serve_app.engine.sampler import greedy_tokens
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randint(-3, 4, (64, 300), generator=gen).to(dtype)     # many ties per row
        logits[5, 17] = float("nan")
        assert torch.equal(greedy_tokens(logits), logits.argmax(dim=-1))
        assert int(greedy_tokens(logits)[5]) == 17
