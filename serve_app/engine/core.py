"""Engine core: add / abort requests, and `step()` = schedule → run model → sample → update.

Synchronous and single-threaded by design; `AsyncEngine` drives it from a background thread and
guards it with one lock, so every method here sees a consistent state.

n > 1 candidates: a request starts as one sequence. When its prompt is computed, the same
last-prompt logits are sampled n times (each candidate with its own generator) and candidates
1..n-1 are forked from it: they share its full prompt blocks and get a copy of the partially
filled last block. If blocks are short for a fork, the candidate queues instead and gets the
prompt from the prefix cache.
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Iterable

import torch

from serve_app.config import EngineConfig
from serve_app.engine.block_manager import BlockManager, OutOfBlocksError
from serve_app.engine.runner import ModelRunner
from serve_app.engine.sampler import logprobs_of, make_generator, sample
from serve_app.engine.sampling_params import SamplingParams
from serve_app.engine.scheduler import Scheduler, SchedulerOutput
from serve_app.engine.speculative import Draft, Speculator, SpecStats, within_vocab
from serve_app.engine.sequence import (CompletionOutput, EngineOverloadedError, FinishReason, Request,
                                       RequestOutput, RequestRejectedError, RequestTimes, Sequence)
from serve_app.engine.stats import EngineObserver, StepStats, TokenTiming
from serve_app.engine.stop import StopChecker
from serve_app.model import MoeForCausalLM

log = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, model: MoeForCausalLM, cfg: EngineConfig = EngineConfig(), tokenizer=None,
                 observer: EngineObserver | None = None, dtype=None):
        """`dtype`: activation dtype of this engine's steps (ModelRunner); default the weights'."""
        self.model, self.cfg, self.tokenizer, self.observer = model, cfg, tokenizer, observer
        self._timings: list[TokenTiming] = []
        self._prefix_seen = (0, 0)          # (queries, hits) already reported
        self.max_model_len = min(cfg.max_model_len or model.config.max_position_embeddings,
                                 model.config.max_position_embeddings)
        self.blocks = BlockManager(cfg.num_kv_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(cfg, self.blocks)
        self.runner = ModelRunner(model, cfg, dtype)
        # Speculative decoding of full-precision rows with the model's quantized copy as the
        # draft (engine/speculative.py); off where the model holds no such copy.
        drafts_by_model = cfg.speculative_precision in model.precisions and cfg.speculative_precision != "full"
        k = cfg.speculative_tokens if drafts_by_model else 0
        self.speculator = (Speculator(self.runner, self.blocks, k, cfg.speculative_precision, self.max_model_len,
                                      cfg.speculative_lookup_tokens, cfg.typing_through_tokens, tokenizer)
                           if k > 0 or cfg.speculative_lookup_tokens > 0 or cfg.typing_through_tokens > 0 else None)
        self._spec = SpecStats()
        if observer is not None:
            self.runner.track_expert_load()
        self.requests: dict[str, Request] = {}
        eos = tokenizer.stop_token_ids if tokenizer is not None else model.config.eos_token_ids
        self.eos_token_ids = frozenset(eos)
        self.num_steps = 0
        # Exponentially weighted step time (seconds; weight 0.2: about the last five steps), for
        # admission by predicted latency. None until the first step.
        self.step_time_s: float | None = None
        # Calibration of that prediction: the weighted ratio of what admitted requests really took
        # to what was predicted for them. It absorbs what the step-time model leaves out (the
        # batch growing with later admissions, early stops before max_tokens, the host's other work).
        self.latency_ratio = 1.0
        self.last_step: SchedulerOutput | None = None
        self._structural: torch.Tensor | None = None   # [V] bool, see _structural_for
        if tokenizer is not None:       # decoded once here, not on the engine thread mid-traffic
            _ = tokenizer.structural_token_ids

    # ---- requests ------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    tag: str = "", precision: str = "full", arrival: float | None = None) -> None:
        """Queue a request. `tag` is opaque to the engine and only labels its timings for observers;
        `precision` picks the experts its rows use ("full", or a quantized copy the model holds);
        `arrival` (time.monotonic()) is when the caller received it, default now."""
        self._validate(request_id, prompt_token_ids, params)
        if precision not in self.model.precisions:
            raise RequestRejectedError(f"precision {precision!r} is not served here; available: "
                                       f"{', '.join(self.model.precisions)}", "precision")
        predicted = self._admit_or_raise(len(prompt_token_ids), params.max_tokens)
        if (draft := within_vocab(params.draft_token_ids, self.model.config.vocab_size)) != params.draft_token_ids:
            params = replace(params, draft_token_ids=draft)        # a hint: cut, never refused
        req = Request(request_id, list(prompt_token_ids), params, tag=tag, precision=precision)
        req.times.predicted_s = predicted
        if arrival is not None:
            req.times.arrival = arrival
        req.sequences.append(self._new_sequence(req, 0, list(prompt_token_ids)))
        self.requests[request_id] = req
        self.scheduler.add(req.sequences[0])

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now: its blocks are freed before this returns. Unknown ids are ignored."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for seq in req.sequences:
            if not seq.finished:
                seq.finish_reason = FinishReason.ABORT
            self.scheduler.remove(seq)
        req.forked = True
        req.times.finished = time.monotonic()
        return self._output(req)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def _validate(self, request_id: str, prompt: list[int], params: SamplingParams) -> None:
        if request_id in self.requests:
            raise RequestRejectedError(f"request id {request_id!r} is already in use")
        if not prompt:
            raise RequestRejectedError("the prompt is empty: at least one token is needed", "prompt")
        vocab = self.model.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise RequestRejectedError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})", "prompt")
        biased = [t for t, _ in params.logit_bias if t >= vocab]
        if biased:      # the sampler indexes the logits with these: refuse here, never fail a step
            raise RequestRejectedError(f"logit_bias token id {biased[0]} is outside the vocabulary [0, {vocab})",
                                       "logit_bias")
        total = len(prompt) + params.max_tokens
        if total > self.max_model_len:
            raise RequestRejectedError(
                f"this model's maximum context length is {self.max_model_len} tokens; the request needs "
                f"{len(prompt)} prompt + {params.max_tokens} max_tokens = {total}", "max_tokens")
        capacity = self.cfg.num_kv_blocks * self.cfg.block_size
        if total > capacity:
            raise RequestRejectedError(f"the request needs {total} tokens of KV cache; the engine has {capacity}",
                                       "max_tokens")
        if params.stop and self.tokenizer is None:
            raise RequestRejectedError("stop strings need a tokenizer; this engine works on token ids only", "stop")

    def _admit_or_raise(self, num_prompt_tokens: int, max_tokens: int) -> float | None:
        """Raises EngineOverloadedError to refuse; returns the latency predicted for the request
        (before calibration) when admission by predicted latency is on and has a step time."""
        waiting = self.scheduler.waiting
        if len(waiting) >= self.cfg.max_waiting_requests:
            raise EngineOverloadedError(f"{len(waiting)} requests are already waiting "
                                        f"(limit {self.cfg.max_waiting_requests})", self.cfg.retry_after_s)
        queued = self.scheduler.num_waiting_tokens
        if queued + num_prompt_tokens > self.cfg.max_waiting_tokens:
            raise EngineOverloadedError(f"{queued} prompt tokens are already waiting (limit "
                                        f"{self.cfg.max_waiting_tokens})", self.cfg.retry_after_s)
        limit = self.cfg.max_queue_delay_s
        # The oldest request that has never run: a preempted one back at the head of the queue
        # keeps its old arrival and would otherwise close admission until it runs again.
        oldest = next((s.request.times.arrival for s in waiting if s.request.times.first_scheduled is None), None)
        if limit is not None and oldest is not None:
            waited = time.monotonic() - oldest
            if waited > limit:
                raise EngineOverloadedError(f"the oldest waiting request has waited {waited:.2f} s "
                                            f"(limit {limit:g} s)", self.cfg.retry_after_s)
        budget = self.cfg.max_predicted_latency_s
        if budget is None or self.step_time_s is None:
            return None
        wait = time.monotonic() - oldest if oldest is not None else 0.0
        steps = -(-num_prompt_tokens // self.cfg.long_prefill_chunk) + max_tokens
        predicted = wait + self.step_time_s * steps
        if self.requests and predicted * self.latency_ratio > budget:
            raise EngineOverloadedError(
                f"this request would take ~{predicted * self.latency_ratio:.2f} s at the current load ({steps} "
                f"steps of {self.step_time_s * 1000:.1f} ms after {wait:.2f} s of queue, × {self.latency_ratio:.2f} "
                f"as measured; budget {budget:g} s)", self.cfg.retry_after_s)
        return predicted

    def _new_sequence(self, req: Request, index: int, token_ids: list[int]) -> Sequence:
        detok = None
        if self.tokenizer is not None:
            from serve_app.detokenizer import IncrementalDetokenizer
            detok = IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids)
        return Sequence(f"{req.request_id}#{index}", req, index, token_ids,
                        make_generator(req.params, index, self.runner.device),
                        StopChecker(req.params.stop), detok)

    # ---- the step ------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One iteration over the running batch; returns an output for every request that progressed."""
        batch = self.scheduler.schedule()
        self.last_step = batch
        if batch.empty:
            return []
        self.num_steps += 1
        started = time.perf_counter()
        now = time.monotonic()
        drafts = self._draft(batch) if self.speculator is not None else {}
        logits = self.runner.execute(batch, self.blocks, {s: d.tokens for s, d in drafts.items()})  # [N, V]
        samplers: list[Sequence] = []
        sample_rows: list[int] = []
        verified: list[tuple[Sequence, torch.Tensor, Draft]] = []
        row = 0
        for item in batch.scheduled:
            seq = item.seq
            seq.request.times.first_scheduled = seq.request.times.first_scheduled or now
            seq.num_computed_tokens = item.start + item.num_new_tokens
            self.blocks.mark_computed(seq.seq_id, seq.token_ids, seq.num_computed_tokens)
            if (draft := drafts.get(seq.seq_id)) is not None:
                verified.append((seq, logits[row:row + 1 + len(draft.tokens)], draft))
                row += 1 + len(draft.tokens)
            elif item.samples:
                samplers.append(seq)
                sample_rows.append(row)
                row += 1
        # Without drafts every row samples, in order: no gather.
        touched = self._sample_and_update(samplers, logits[sample_rows] if drafts else logits) if samplers else {}
        touched.update(self._verify_and_update(verified))
        self._settle(touched.values())
        outputs = [self._output(req) for req in touched.values()]
        elapsed = time.perf_counter() - started
        self.step_time_s = elapsed if self.step_time_s is None else 0.8 * self.step_time_s + 0.2 * elapsed
        if self.observer is not None:
            try:
                self.observer.on_step(self._step_stats(batch, elapsed, outputs))
            except Exception:               # noqa: BLE001 - metrics must never fail the requests of a step
                log.exception("engine observer failed; the step's outputs are delivered anyway")
        return outputs

    def _structural_for(self, params: list[SamplingParams]) -> torch.Tensor | None:
        """[V] bool of the tokenizer's structural tokens when any of `params` skips them in its
        penalties (penalty_skips_structural), else None; built on first use."""
        if not any(p.penalty_skips_structural for p in params):
            return None
        if self._structural is None:
            vocab = self.model.config.vocab_size
            mask = torch.zeros(vocab, dtype=torch.bool, device=self.runner.device)
            if self.tokenizer is not None:
                mask[[t for t in self.tokenizer.structural_token_ids if t < vocab]] = True
            self._structural = mask
        return self._structural

    def _step_stats(self, batch: SchedulerOutput, duration_s: float, outputs: list[RequestOutput]) -> StepStats:
        prefix = self.blocks.prefix_cache_stats
        queries, hits = prefix.queries - self._prefix_seen[0], prefix.hits - self._prefix_seen[1]
        self._prefix_seen = (prefix.queries, prefix.hits)
        expert_tokens = self.runner.take_expert_load()
        timings, self._timings = self._timings, []
        spec, self._spec = self._spec, SpecStats()
        return StepStats(duration_s, len(batch.scheduled), batch.num_batched_tokens, len(self.scheduler.running),
                         len(self.scheduler.waiting), self.blocks.num_used_blocks, self.cfg.num_kv_blocks,
                         queries, hits, timings, [o for o in outputs if o.finished], expert_tokens, spec)

    def _sample_and_update(self, seqs: list[Sequence], logits) -> dict[str, Request]:
        # Rows to sample: one per sequence, except a request finishing its prompt with n > 1,
        # whose row is sampled once per candidate.
        row_of, params, generators, targets = [], [], [], []
        for row, seq in enumerate(seqs):
            req = seq.request
            fan_out = req.params.n if (req.params.n > 1 and not req.forked) else 1
            for index in range(fan_out):
                cand = seq
                if index > 0:       # fork before anyone appends: the parent may finish on this token
                    cand = self._new_sequence(req, index, list(req.prompt_token_ids))
                    self._fork(cand)
                row_of.append(row)
                params.append(req.params)
                generators.append(cand.generator)
                targets.append(cand)
        if len(row_of) != len(seqs):
            logits = logits[row_of]
        output_ids = [c.output_token_ids for c in targets] if any(p.penalized for p in params) else None
        structural = self._structural_for(params)
        result = sample(logits, params, generators, output_ids, structural)
        touched: dict[str, Request] = {}
        for cand, token, lp in zip(targets, result.token_ids, result.logprobs):
            self._append_token(cand, token, lp)
            touched[cand.request.request_id] = cand.request
        return touched

    def _settle(self, touched: Iterable[Request]) -> None:
        for req in touched:
            req.forked = True
            if req.finished:
                req.times.finished = time.monotonic()
                self.requests.pop(req.request_id, None)
                self._calibrate(req.times)

    # ---- speculative decoding (engine/speculative.py) ------------------------------------------

    def _draft(self, batch: SchedulerOutput) -> dict[str, Draft]:
        return self.speculator.draft(batch.scheduled, self._structural_for,
                                     self.cfg.max_num_batched_tokens - batch.num_batched_tokens)

    def _verify_and_update(self, verified: list[tuple[Sequence, torch.Tensor, Draft]]) -> dict[str, Request]:
        touched: dict[str, Request] = {}
        for seq, logits, draft in verified:
            params = seq.request.params
            tokens = self.speculator.verify(seq, logits, draft, self._structural_for([params]))
            lps = (logprobs_of(logits[:len(tokens)], torch.tensor(tokens, device=logits.device),
                               [params] * len(tokens)) if params.logprobs is not None else [None] * len(tokens))
            start = seq.num_tokens            # positions start-1 .. start-1+k were computed at full precision
            appended = 0
            for token, lp in zip(tokens, lps):
                self._append_token(seq, token, lp)
                appended += 1
                if seq.finished:
                    break
            # Drafts kept and used: their KV (positions start .. start+kept-1) is valid. A stop
            # inside the run uses fewer than the verification kept.
            kept = min(len(tokens) - 1, appended)
            self._spec.sequences += 1
            self._spec.drafted += len(draft.tokens)
            self._spec.accepted += kept
            self.speculator.adapt(seq, len(draft.tokens), kept, draft.hint)
            if not seq.finished:
                seq.num_computed_tokens = start + kept
                self.blocks.mark_computed(seq.seq_id, seq.token_ids, seq.num_computed_tokens)
            touched[seq.request.request_id] = seq.request
        return touched

    def _calibrate(self, times: RequestTimes) -> None:
        if times.predicted_s:
            ratio = (times.finished - times.arrival) / times.predicted_s
            # Weight 0.1 (about the last ten requests); bounded so one outlier cannot close or
            # open admission by itself.
            self.latency_ratio = min(4.0, max(0.25, 0.9 * self.latency_ratio + 0.1 * ratio))

    def _fork(self, child: Sequence) -> None:
        req = child.request
        parent = req.sequences[0]
        req.sequences.append(child)
        try:
            self.runner.copy_blocks(self.blocks.fork(parent.seq_id, child.seq_id))
            child.num_computed_tokens = parent.num_computed_tokens
            child.num_cached_tokens = parent.num_cached_tokens
            self.scheduler.add_running(child)
        except OutOfBlocksError:
            self.scheduler.add(child)               # recomputes its prompt, mostly from the prefix cache

    def _append_token(self, seq: Sequence, token: int, lp) -> None:
        req = seq.request
        now = time.monotonic()
        if self.observer is not None:
            first = req.times.first_token is None
            since = req.times.arrival if first else (seq.last_token_time or req.times.first_token)
            self._timings.append(TokenTiming(req.tag, first, now - since))
        req.times.first_token = req.times.first_token or now
        seq.last_token_time = now
        seq.token_ids.append(token)
        if lp is not None:
            seq.logprobs.append(lp)
            seq.cumulative_logprob += lp.logprob
        params = req.params
        stop_id = token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids)
        if stop_id:
            self._finish(seq, FinishReason.STOP, token)
            return
        if seq.detokenizer is not None:
            res = seq.stop_checker.feed(seq.detokenizer.add(token))
            seq.text += res.text
            if res.stopped:
                self._finish(seq, FinishReason.STOP, res.stop_string, flush=False)
                return
        if len(seq.output_token_ids) >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            self._finish(seq, FinishReason.LENGTH, None)

    def _finish(self, seq: Sequence, reason: FinishReason, stop_reason, flush: bool = True) -> None:
        if flush and seq.detokenizer is not None:
            results = [seq.stop_checker.feed(seq.detokenizer.flush())]
            if not seq.stop_checker.stopped:
                results.append(seq.stop_checker.flush())
            seq.text += "".join(r.text for r in results)
            hit = next((r.stop_string for r in results if r.stopped), None)
            if hit is not None:            # a stop string completed by the held tail still counts
                reason, stop_reason = FinishReason.STOP, hit
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        self.scheduler.remove(seq)

    # ---- reporting -----------------------------------------------------------------------------

    def _output(self, req: Request) -> RequestOutput:
        outs = []
        for seq in sorted(req.sequences, key=lambda s: s.index):
            gen = seq.output_token_ids
            want_lp = req.params.logprobs is not None
            outs.append(CompletionOutput(
                seq.index, seq.text, list(gen), seq.finish_reason.value if seq.finish_reason else None,
                seq.stop_reason, list(seq.logprobs) if want_lp else None,
                seq.cumulative_logprob if want_lp else None,
                delta_text=seq.text[seq.emitted_chars:], delta_token_ids=gen[seq.emitted_tokens:]))
            seq.emitted_chars, seq.emitted_tokens = len(seq.text), len(gen)
        cached = req.sequences[0].num_cached_tokens
        return RequestOutput(req.request_id, req.prompt_token_ids, outs, req.finished, cached, req.times, req.tag)

    def run_until_done(self, request_ids: Iterable[str] | None = None) -> dict[str, RequestOutput]:
        """Step until the given requests (default: all) finish; their final outputs by id."""
        pending = set(request_ids) if request_ids is not None else set(self.requests)
        final: dict[str, RequestOutput] = {}
        while pending - final.keys():
            outputs = self.step()
            for out in outputs:
                if out.finished and out.request_id in pending:
                    final[out.request_id] = out
            if self.last_step.empty and not outputs:
                missing = sorted(pending - final.keys())
                raise RuntimeError(f"engine made no progress; requests {missing} cannot be scheduled")
        return final
