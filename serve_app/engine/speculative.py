"""Speculative decoding: the router's quantized experts draft, full precision verifies in one pass.

Why: every full-precision decode step crosses the expert shards once per MoE layer. The router
already holds INT8/INT4 copies of every expert (the fast lane's), so it can draft k tokens with
no hop at all and verify them in ONE full-precision forward of k+1 positions: up to k+1 tokens
per shard round trip instead of one (DESIGN.md §3, "amortise hops").

How it sits in the one engine over the one model:
- Drafts: k decode passes of the same model with the rows at the draft precision (its INT8
  dense weights and INT8 experts, in-process), reading the sequence's full-precision KV of the
  context and writing draft KV into the slots after it. Those slots are rewritten by the
  verification, which recomputes every draft position at full precision.
- Verification: the step's scheduled decode row carries its drafts (`ModelRunner.execute`):
  positions n-1 .. n-1+k in one forward, logits at each.
- Acceptance (Leviathan et al. 2023; Chen et al. 2023): draft d_i, drawn from the draft's sampling
  distribution q_i, is kept with probability min(1, p_i(d_i) / q_i(d_i)) where p_i is the target's;
  the first rejected position draws from norm(max(0, p_i - q_i)); when all k are kept a bonus
  token is drawn from p_{k+1}. The output then has exactly the target's distribution. Greedy rows
  are the one-hot case: a draft is kept iff it is the target's argmax and the correction is that
  argmax, so greedy output is the non-speculative output. p and q are the *sampling*
  distributions (penalties over the tokens before each position, logit_bias, temperature,
  top-k/top-p: sampler.py), so every sampling option keeps its meaning.
- KV and the prefix cache: a sequence's computed count advances only over kept positions, and
  blocks are marked computed (hashed for the cache) only up to there, so the prefix cache never
  holds draft KV, nor KV of a rejected token.

Exactness: greedy output equals the non-speculative output where a (k+1)-position pass computes
the same logits as k+1 single-token steps — float32 on CPU, which the tests check, and the bf16
fast lanes bit for bit where the quantized matmuls are row-count invariant (the AVX2 build): a
step that verifies drafts multiplies on the packed kernels at any row count (RowPrecision.packed),
not on the dense copies that sum in another order. Elsewhere in 16-bit a near-tie can flip. A seeded sampled request is reproducible at the same draft lengths,
but its generator also draws the drafts and the acceptance uniforms, so a draft cut short by KV
pressure changes the text (never the distribution).

Typing-through drafts: a request may bring the tokens its output is expected to start with
(`SamplingParams.draft_token_ids`, the rest of a suggestion the user is typing). While its output
follows them, the next `hint_k` of them are the row's draft, in any lane, before any other source:
a proposal, q one-hot, like prompt lookup. "Follows" is by text where the engine has a tokenizer:
the user cut the suggestion anywhere (typing "re" of "return" leaves "turn", which the model may
spell with other tokens), so while the output's text starts the drafts' text, the rest of that text,
tokenized, is the draft. Once the output leaves it, never again. Ids past the vocabulary end a
draft (`within_vocab`): it is a hint, never a reason to refuse a request.

Who speculates: decode rows of full-precision requests (the rows that would cross the shards),
when the model holds the draft precision. How many: per sequence, adapted from its acceptance
(the schedule of transformers' assisted generation): it starts at the maximum k
(`EngineConfig.speculative_tokens`), a verification that keeps every draft adds 2 (up to k), one
that rejects a draft takes 1 off (down to 1): drafts past the first rejection are wasted draft
passes. It is also cut where the request has fewer tokens left, or blocks are short (then that
row decodes normally).

Legend: k = drafts of one sequence, V = vocab, B = sequences drafting together.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from serve_app.engine.block_manager import BlockManager
from serve_app.engine.runner import ModelRunner
from serve_app.engine.sampler import apply_penalties, draw, greedy_tokens, tempered_probs
from serve_app.engine.scheduler import ScheduledSeq
from serve_app.engine.sequence import Sequence


@dataclass
class Draft:
    """The k tokens proposed for one sequence this step, and what they were drawn from."""
    tokens: list[int]
    probs: list[torch.Tensor]        # per draft: its sampling distribution q_i [V]; empty when greedy
                                     # or proposed by lookup (q one-hot on the token)
    hint: bool = False               # the request's own draft tokens (typing-through), not a model's


@dataclass
class SpecStats:
    """Counted over a step's verified sequences (metrics: acceptance rate, tokens per pass)."""
    sequences: int = 0               # sequences whose drafts were verified
    drafted: int = 0                 # draft tokens proposed
    accepted: int = 0                # of those, kept


class LookupIndex:
    """Prompt-lookup drafting (vLLM's "ngram" speculator): where each 1-, 2- and 3-gram of a
    sequence last ended, kept one token behind the end, so looking up the sequence's own tail finds
    its previous occurrence; the tokens that followed it are the draft. Updated incrementally (a
    few dict writes per new token), never rescanned."""

    def __init__(self):
        self.last: dict[tuple[int, ...], int] = {}
        self.indexed = 0                 # n-grams ending before this position are in `last`

    def draft(self, tokens: list[int], k: int) -> list[int]:
        for end in range(self.indexed, len(tokens) - 1):
            for n in (1, 2, 3):
                if end >= n - 1:
                    self.last[tuple(tokens[end - n + 1:end + 1])] = end
        self.indexed = max(self.indexed, len(tokens) - 1)
        for n in (3, 2, 1):
            if len(tokens) >= n and (end := self.last.get(tuple(tokens[-n:]))) is not None:
                return tokens[end + 1:end + 1 + k]
        return []


def within_vocab(tokens, vocab_size: int) -> tuple[int, ...]:
    """`tokens` up to the first id the logits have no row for."""
    return next((tuple(tokens[:i]) for i, t in enumerate(tokens) if t >= vocab_size), tuple(tokens))


class Speculator:
    def __init__(self, runner: ModelRunner, blocks: BlockManager, k: int, precision: str, max_model_len: int,
                 lookup_k: int = 0, hint_k: int = 0, tokenizer=None):
        """k: most drafts of a full-precision row by the `precision` copy; lookup_k: most drafts of
        any other row by prompt lookup (0 = those rows never speculate); hint_k: most of a
        request's own draft tokens (typing-through) verified in one step."""
        self.runner, self.blocks, self.k, self.precision = runner, blocks, k, precision
        self.max_model_len, self.lookup_k, self.hint_k = max_model_len, lookup_k, hint_k
        self.tokenizer = tokenizer       # aligns a request's draft tokens with its output by text

    # ---- drafting ------------------------------------------------------------------------------

    def draft(self, items: list[ScheduledSeq], structural_for, token_budget: int) -> dict[str, Draft]:
        """Drafts for the step's decode rows that can take them, at most `token_budget` in all (the
        step's unused share of max_num_batched_tokens: verification positions are batch tokens);
        `structural_for(params)`: the structural-token mask the draft's penalties need, or None."""
        by_model: list[tuple[Sequence, int]] = []
        drafts: dict[str, Draft] = {}
        for item in items:
            seq = item.seq
            if (hint := self._hint(item, token_budget)) and (fit := self._fit(seq, len(hint))):
                drafts[seq.seq_id] = Draft(hint[:fit], [], hint=True)
                token_budget -= fit
                continue
            k = min(self._budget(item, self.most(seq)), token_budget)
            if k <= 0:
                continue
            if self._by_model(seq):
                by_model.append((seq, k))
                token_budget -= k
                continue
            seq.lookup = seq.lookup or LookupIndex()
            tokens = seq.lookup.draft(seq.token_ids, k)
            if tokens and self._reserve(seq, len(tokens)):
                drafts[seq.seq_id] = Draft(tokens, [])
                token_budget -= len(tokens)
        if by_model:
            drafts.update(self._propose(by_model, structural_for([s.request.params for s, _ in by_model])))
        return drafts

    def _hint(self, item: ScheduledSeq, token_budget: int) -> list[int]:
        """The next drafts from the request's own draft tokens, while its output follows them."""
        seq = item.seq
        hint = seq.request.params.draft_token_ids
        if self.hint_k <= 0 or not hint or seq.hint_dead:
            return []
        rest = self._hint_rest(seq, hint)
        if not rest:
            seq.hint_dead = True
            return []
        return rest[:min(self._room(item, self.hint_k), token_budget)]

    def _hint_rest(self, seq: Sequence, hint: tuple[int, ...]) -> list[int]:
        """The draft tokens after what the output has generated: by token where the output is a
        start of them, else by text (the engine's tokenizer); [] once the output left them."""
        out = seq.output_token_ids
        if len(out) < len(hint) and tuple(out) == hint[:len(out)]:
            return list(hint[len(out):])
        if self.tokenizer is None:
            return []
        if seq.hint_text is None:
            seq.hint_text = self.tokenizer.decode(list(hint))
        made = self.tokenizer.decode(list(out))
        if len(made) >= len(seq.hint_text) or not seq.hint_text.startswith(made):
            return []
        return list(within_vocab(self.tokenizer.encode_fragment(seq.hint_text[len(made):]),
                                 self.runner.model.config.vocab_size))

    def _by_model(self, seq: Sequence) -> bool:
        return seq.request.precision == "full" and self.k > 0

    def most(self, seq: Sequence) -> int:
        """The most drafts this row may take: k by the model copy, lookup_k by prompt lookup."""
        return self.k if self._by_model(seq) else self.lookup_k

    def _budget(self, item: ScheduledSeq, most: int) -> int:
        """Drafts this scheduled row may take: 0 unless it is a decode row with tokens to spare.
        Each verification yields up to k+1 tokens: never draft past max_tokens or the window."""
        return min(item.seq.draft_len or most, self._room(item, most))

    def _room(self, item: ScheduledSeq, most: int) -> int:
        """At most `most` drafts for a decode row, fewer where max_tokens or the window end first."""
        seq, req = item.seq, item.seq.request
        if most <= 0 or item.num_new_tokens != 1 or not item.samples or not req.forked:
            return 0
        return min(most, req.params.max_tokens - len(seq.output_token_ids) - 1, self.max_model_len - seq.num_tokens - 1)

    def _reserve(self, seq: Sequence, k: int) -> bool:
        """KV slots for k more positions (the verification writes them)."""
        return self.blocks.allocate(seq.seq_id, seq.token_ids, seq.num_tokens + k) is not None

    def _propose(self, items: list[tuple[Sequence, int]], structural) -> dict[str, Draft]:
        """k_s drafts for each (sequence, k_s) by the `precision` copy, all sequences in one pass
        per position."""
        items = [(seq, k) for seq, k in ((s, self._fit(s, k)) for s, k in items) if k > 0]
        drafts = {seq.seq_id: Draft([], []) for seq, _ in items}
        for j in range(max((k for _, k in items), default=0)):
            active = [seq for seq, k in items if k > j]
            last = [drafts[s.seq_id].tokens[-1] if j else s.token_ids[-1] for s in active]
            logits = self.runner.decode_rows([s.seq_id for s in active], last,
                                             [s.num_tokens - 1 + j for s in active], self.blocks, self.precision)
            params = [s.request.params for s in active]
            outputs = [s.output_token_ids + drafts[s.seq_id].tokens for s in active]
            logits = apply_penalties(logits, params, outputs, structural)              # [B, V]
            tokens = greedy_tokens(logits).tolist()
            random_rows = [b for b, p in enumerate(params) if not p.greedy]
            if random_rows:
                q = tempered_probs(logits[random_rows], [params[b] for b in random_rows])   # [S, V]
                sampled = draw(q, [active[b].generator for b in random_rows]).tolist()
                for i, b in enumerate(random_rows):
                    tokens[b] = sampled[i]
                    drafts[active[b].seq_id].probs.append(q[i])
            for seq, token in zip(active, tokens):
                drafts[seq.seq_id].tokens.append(token)
        return drafts

    def _fit(self, seq: Sequence, k: int) -> int:
        """The most of k drafts whose KV slots can be had (fewer when blocks are short)."""
        while k > 0 and not self._reserve(seq, k):
            k -= 1
        return k

    def adapt(self, seq: Sequence, drafted: int, kept: int, hint: bool = False) -> None:
        """The next step's draft length for `seq` from this verification's outcome (a typing-through
        draft says nothing about how well the model's copy drafts)."""
        if hint:
            return
        most = self.most(seq)
        current = min(seq.draft_len or most, most)
        seq.draft_len = min(most, current + 2) if kept == drafted else max(1, current - 1)

    # ---- verification --------------------------------------------------------------------------

    def verify(self, seq: Sequence, logits: torch.Tensor, draft: Draft, structural) -> list[int]:
        """The tokens to append for `seq`: the kept drafts and one more (a correction or the bonus).
        `logits` [k+1, V]: the target's at the positions of the last token and each draft."""
        params = seq.request.params
        k = len(draft.tokens)
        outputs = [seq.output_token_ids + draft.tokens[:i] for i in range(k + 1)]
        target = apply_penalties(logits, [params] * (k + 1), outputs, structural)      # [k+1, V]
        if params.greedy:
            best = target.argmax(dim=-1).tolist()
            kept = next((i for i in range(k) if best[i] != draft.tokens[i]), k)
            return draft.tokens[:kept] + [best[kept]]
        p = tempered_probs(target, [params] * (k + 1))                                 # [k+1, V]
        d = torch.tensor(draft.tokens, device=p.device)                                # [k]
        # A lookup draft is a proposal, not a draw: q is one-hot on it (q_d = 1).
        q = torch.stack(draft.probs) if draft.probs else None                          # [k, V]
        u = torch.empty(k, device=p.device)
        if seq.generator is None:
            u.uniform_()
        else:
            u.uniform_(generator=seq.generator)
        p_d = p[:k].gather(1, d[:, None]).squeeze(1)                                   # [k]
        q_d = q.gather(1, d[:, None]).squeeze(1) if q is not None else torch.ones_like(p_d)
        # Kept iff u < p/q, written without the division (q_d > 0: d was drawn from q).
        rejected = (u * q_d >= p_d).tolist()
        kept = next((i for i in range(k) if rejected[i]), k)
        if kept == k:
            return draft.tokens + draw(p[k:], [seq.generator]).tolist()
        if q is not None:
            residual = (p[kept] - q[kept]).clamp_min_(0)                               # [V]
        else:
            residual = p[kept].clone().index_fill_(0, d[kept:kept + 1], 0.0)           # [V] max(0, p - onehot)
        if not bool(residual.sum() > 0):       # p == q up to rounding: p itself is the residual
            residual = p[kept]
        return draft.tokens[:kept] + draw(residual[None], [seq.generator]).tolist()
