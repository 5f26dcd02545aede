"""Batched token sampling: one call per engine step over the logits of every running sequence.

Design:
- Rows are grouped by what they need, so the common cases cost one kernel each: an all-greedy batch
  is a single `argmax`; random rows share one temperature divide, one (optional) sort for
  top-k/top-p, one softmax and one argmax. Only seeded rows add a per-row RNG fill.
- Sampling inverts each row's CDF: one uniform draw u per row, the token is the first whose
  cumulative probability exceeds u × (the row's total). One draw per row, not one per vocabulary
  entry: the exponential race (`argmax(probs / q)`, q ~ Exp(1) per token, vLLM's GPU trick) drew
  8192 exponentials a row, which on this CPU made sampling 1.5 ms of an 8-row step (0.26 ms at
  one row); the inverse CDF is one cumsum and one searchsorted for the batch. A row's draw depends
  only on its own generator, so a seeded request reproduces exactly whatever else is in the batch.
- Generators: a request with `seed` gets its own `torch.Generator`; candidate i of an n>1 request
  is seeded with `seed + i` (`make_generator`), so candidates differ but each is reproducible.
  Unseeded rows pass `None` and share the device's default RNG (one batched fill).
  The caller keeps a row's generator across steps; its state advances by one fill per step.
- Order of transforms (vLLM's): temperature, then top-k, then top-p on the tempered, top-k masked
  distribution. Top-k keeps every token tied with the k-th value (it may keep more than k).
  Top-p keeps the smallest prefix of the sorted distribution whose mass reaches top_p, and always
  at least the most likely token.
- Penalties (OpenAI's `frequency_penalty`, `presence_penalty`) come first and apply to greedy rows
  too: a token's logit drops by frequency × (times this sequence generated it) + presence × (it did
  at all). Prompt tokens do not count, as in OpenAI's definition. Only rows that ask pay for it
  (one bincount each), on a copy of the logits.
- `penalty_skips_structural` (ours) drops the (row, token) pairs of whitespace/punctuation tokens
  from that sparse update: indents and brackets recur in correct code.
- `logit_bias` (OpenAI's) is added right after the penalties, to greedy rows too; like them it
  costs only rows that ask (one indexed add on the same copy).
- Logprobs come from `log_softmax` of the raw (un-tempered, unfiltered, unpenalized) logits, like
  vLLM's default and OpenAI: they describe the model, not the sampling transform.

Dimension legend: B = batch rows, V = vocab, S = rows that sample randomly, L = rows that want
logprobs, K = most alternatives any row asked for.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from serve_app.engine.sampling_params import SamplingParams


class SamplerError(ValueError):
    """Inputs to `sample` that do not fit together (shapes, list lengths)."""


@dataclass(frozen=True)
class TokenLogprobs:
    token_id: int                       # the sampled token
    logprob: float                      # its log-probability under the raw model distribution
    rank: int                           # 1 = most likely token; ties share the better rank
    top_token_ids: tuple[int, ...]      # the `logprobs` most likely tokens, best first (may include token_id)
    top_logprobs: tuple[float, ...]     # their log-probabilities, same order


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: list[int]                    # one sampled token per row, in row order
    logprobs: list[TokenLogprobs | None]    # per row; None where the row's params.logprobs is None


def make_generator(params: SamplingParams, candidate_index: int = 0,
                   device: torch.device | str = "cpu") -> torch.Generator | None:
    """The RNG for candidate `candidate_index` of a request: seeded with `seed + candidate_index`,
    or None (the device's shared RNG) when the request has no seed."""
    if params.seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(params.seed + candidate_index)
    return gen


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """[B, V] -> [B] the index of each row's largest logit (the first one on ties, NaN wins as in
    argmax). `max(dim).indices`, not `argmax`: on the CPU torch's argmax reduction is 3-4x slower
    (8 x 8192 bf16 logits: 253 µs against 59 µs; float32 102 / 36 µs, torch 2.13, Xeon with AMX,
    2026-12-03) — a tenth of a batch-8 decode step."""
    return logits.max(dim=-1).indices


def sample(logits: torch.Tensor, params: Sequence[SamplingParams],
           generators: Sequence[torch.Generator | None],
           output_ids: Sequence[Sequence[int]] | None = None,
           structural: torch.Tensor | None = None) -> SamplerOutput:
    """Pick one token per row of `logits` [B, V] with that row's params and generator.
    `output_ids`: the tokens each row's sequence generated so far; needed only when a row's
    params are `penalized`. `structural` [V] bool: the tokens that rows with
    `penalty_skips_structural` do not penalize (needed only for such rows)."""
    _check_inputs(logits, params, generators, output_ids)
    B, V = logits.shape
    random_rows = [i for i, p in enumerate(params) if not p.greedy]
    raw = logits
    logits = apply_penalties(logits, params, output_ids, structural)  # [B, V] raw unless a row asks

    if len(random_rows) < B:
        token_ids = greedy_tokens(logits)  # [B] greedy rows are final; random rows overwritten below
    if random_rows:
        if len(random_rows) == B:
            sub_logits = logits  # [S=B, V] no gather for the all-random batch
        else:
            idx = torch.tensor(random_rows, device=logits.device)  # [S]
            sub_logits = logits.index_select(0, idx)  # [S, V]
        sampled = _sample_random(sub_logits, [params[i] for i in random_rows],
                                 [generators[i] for i in random_rows])  # [S]
        if len(random_rows) == B:
            token_ids = sampled  # [B]
        else:
            token_ids[idx] = sampled  # [B]

    return SamplerOutput(token_ids=token_ids.tolist(), logprobs=logprobs_of(raw, token_ids, params))


def _check_inputs(logits: torch.Tensor, params: Sequence[SamplingParams],
                  generators: Sequence[torch.Generator | None], output_ids) -> None:
    if logits.dim() != 2 or logits.shape[0] == 0 or logits.shape[1] == 0:
        raise SamplerError(f"logits must be a non-empty [batch, vocab] tensor, got shape {tuple(logits.shape)}")
    if len(params) != logits.shape[0] or len(generators) != logits.shape[0]:
        raise SamplerError(f"need one SamplingParams and one generator per row: {logits.shape[0]} rows, "
                           f"{len(params)} params, {len(generators)} generators")
    if output_ids is None and any(p.penalized for p in params):
        raise SamplerError("penalized rows need output_ids")
    if output_ids is not None and len(output_ids) != logits.shape[0]:
        raise SamplerError(f"need output_ids for every row: {logits.shape[0]} rows, {len(output_ids)} given")


def apply_penalties(logits: torch.Tensor, params: Sequence[SamplingParams],
                     output_ids: Sequence[Sequence[int]] | None,
                     structural: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, V] with each penalized row lowered on the tokens it generated and each biased
    row's logit_bias added; the input when no row asks for either (no copy)."""
    rows = [i for i, p in enumerate(params) if p.penalized and output_ids[i]]
    biased = [i for i, p in enumerate(params) if p.logit_bias]
    if not rows and not biased:
        return logits
    out = logits.clone()  # [B, V]
    if biased:
        # (row, token) pairs of every biased row at once; ids were checked against V at admission.
        row_of = torch.tensor([i for i in biased for _ in params[i].logit_bias], device=logits.device)  # [N]
        token_of = torch.tensor([t for i in biased for t, _ in params[i].logit_bias], device=logits.device)
        bias = torch.tensor([b for i in biased for _, b in params[i].logit_bias], dtype=logits.dtype,
                            device=logits.device)                                                # [N]
        out[row_of, token_of] += bias
    if not rows:
        return out
    dev, V = logits.device, logits.shape[1]
    # Only the (row, token) pairs a sequence generated change, so the update is sparse: one unique
    # with counts over row·V + token for every penalized row at once, then one indexed subtract.
    keys = torch.tensor([i * V + t for i in rows for t in output_ids[i]], device=dev)      # [N]
    pairs, counts = torch.unique(keys, return_counts=True)                                  # [U], [U]
    row_of, token_of = pairs // V, pairs % V                                                # [U]
    skips = [i for i in rows if params[i].penalty_skips_structural]
    if skips:
        if structural is None:
            raise SamplerError("rows with penalty_skips_structural need the structural token mask")
        skip_row = torch.zeros(len(params), dtype=torch.bool, device=dev)
        skip_row[skips] = True
        keep = ~(skip_row[row_of] & structural[token_of])                                   # [U]
        pairs, counts, row_of, token_of = pairs[keep], counts[keep], row_of[keep], token_of[keep]
    freq = torch.tensor([p.frequency_penalty for p in params], dtype=logits.dtype, device=dev)  # [B]
    pres = torch.tensor([p.presence_penalty for p in params], dtype=logits.dtype, device=dev)   # [B]
    out[row_of, token_of] -= freq[row_of] * counts.to(logits.dtype) + pres[row_of]
    return out


def _sample_random(logits: torch.Tensor, params: Sequence[SamplingParams],
                   generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """Temperature, top-k, top-p, then one inverse-CDF draw per row. logits [S, V] -> tokens [S]."""
    return draw(tempered_probs(logits, params), generators)


def tempered_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """The distribution random rows sample from: softmax of the tempered, top-k / top-p masked
    logits [S, V] → [S, V] float32 (speculative verification compares these for draft and target)."""
    S, V = logits.shape
    dev = logits.device
    temps = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=dev)  # [S]
    scaled = logits.float() / temps.unsqueeze(1)  # [S, V] a new tensor: raw logits stay intact

    ks = [p.top_k if 0 < p.top_k < V else V for p in params]
    ps = [p.top_p for p in params]
    top_k = torch.tensor(ks, device=dev) if min(ks) < V else None  # [S]
    top_p = torch.tensor(ps, dtype=torch.float32, device=dev) if min(ps) < 1.0 else None  # [S]
    if top_k is not None or top_p is not None:
        scaled = _apply_top_k_top_p(scaled, top_k, top_p)  # [S, V] dropped tokens at -inf
    return scaled.softmax(dim=-1)  # [S, V] masked tokens at 0


def draw(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One inverse-CDF draw per row of probs [S, V] (rows need not sum to 1) → tokens [S]."""
    S, V = probs.shape
    dev = probs.device
    cdf = probs.cumsum(dim=-1)  # [S, V] non-decreasing; masked tokens add 0
    u = torch.empty(S, 1, dtype=cdf.dtype, device=dev)  # [S, 1] one U[0, 1) draw per row
    if any(g is None for g in generators):
        u.uniform_()  # shared RNG for unseeded rows (seeded rows are overwritten next)
    for row, gen in enumerate(generators):
        if gen is not None:
            u[row].uniform_(generator=gen)  # depends only on this row's generator
    # First token whose cumulative mass exceeds the draw: a zero-probability token never is (its
    # cumulative mass equals its predecessor's). The draw is scaled to the row's own total so
    # rounding in the cumsum cannot leave it past the end; the clamp covers u × total rounding up.
    total = cdf[:, -1:]  # [S, 1]
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))  # [S, 1] < total
    # NaN logits (a broken checkpoint) would put the draw past the end: a wrong token for that row
    # is its problem, an id past the vocabulary would fail the whole batch's next step.
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=V - 1)  # [S]


def _apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None,
                       top_p: torch.Tensor | None) -> torch.Tensor:
    """Set logits outside each row's top-k / nucleus to -inf. logits [S, V]; top_k, top_p [S]."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [S, V], [S, V]
    if top_k is not None:
        kth = sorted_logits.gather(1, (top_k - 1).unsqueeze(1))  # [S, 1] k-th largest value
        sorted_logits.masked_fill_(sorted_logits < kth, float("-inf"))  # ties with kth survive
    if top_p is not None:
        probs = sorted_logits.softmax(dim=-1)  # [S, V]
        mass_before = probs.cumsum(dim=-1) - probs  # [S, V] mass strictly ahead of each token
        # The top token's mass_before is exactly 0 < top_p, so at least one token always stays.
        drop = mass_before >= top_p.unsqueeze(1)  # [S, V]
        # Rows with top_p == 1 are off: rounding in cumsum must not trim their tail.
        drop &= (top_p < 1.0).unsqueeze(1)  # [S, V]
        sorted_logits.masked_fill_(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)  # [S, V] back in vocab order


def logprobs_of(logits: torch.Tensor, token_ids: torch.Tensor,
              params: Sequence[SamplingParams]) -> list[TokenLogprobs | None]:
    """Logprobs of the chosen tokens (+ alternatives) from the raw logits [B, V]; tokens [B]."""
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    out: list[TokenLogprobs | None] = [None] * len(params)
    if not rows:
        return out
    V = logits.shape[1]
    idx = torch.tensor(rows, device=logits.device)  # [L]
    logp = torch.log_softmax(logits.index_select(0, idx).float(), dim=-1)  # [L, V]
    chosen = token_ids.index_select(0, idx)  # [L]
    chosen_logp = logp.gather(1, chosen.unsqueeze(1))  # [L, 1]
    ranks = (logp > chosen_logp).sum(dim=-1) + 1  # [L]
    K = min(max(params[i].logprobs for i in rows), V)
    top_logp, top_ids = logp.topk(K, dim=-1)  # [L, K], [L, K]

    chosen_l, chosen_lp_l, ranks_l = chosen.tolist(), chosen_logp.squeeze(1).tolist(), ranks.tolist()
    top_logp_l, top_ids_l = top_logp.tolist(), top_ids.tolist()
    for j, row in enumerate(rows):
        k = min(params[row].logprobs, V)
        out[row] = TokenLogprobs(token_id=chosen_l[j], logprob=chosen_lp_l[j], rank=ranks_l[j],
                                 top_token_ids=tuple(top_ids_l[j][:k]),
                                 top_logprobs=tuple(top_logp_l[j][:k]))
    return out
