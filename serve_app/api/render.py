"""Engine outputs → response bodies and stream chunks, for each endpoint's shape.

A `RequestOutput` carries every candidate's cumulative text and ids plus the delta since the
previous output. Non-streaming responses take the final output; streams turn each output into one
chunk per candidate that has something new. `StreamState` remembers, per candidate, what was sent:
the finish chunk goes out once even though later outputs (n > 1) repeat the finished candidate,
and logprobs/offsets continue where the previous chunk stopped.

Logprob token strings are single-token decodes; a token holding part of a UTF-8 character shows
as U+FFFD (its `bytes` are those of the replacement character, not the raw bytes).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from pydantic import BaseModel

from serve_app.api.prepare import PreparedRequest
from serve_app.api.ranking import TIER_RANKER
from serve_app.api.protocol import (ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionResponse,
                                    ChatDelta, ChatLogprobs, ChatMessageOut, ChatTokenLogprob, CompletionChoice,
                                    CompletionLogprobs, CompletionResponse, FimResponse, PromptTokensDetails,
                                    TopLogprob, Usage)
from serve_app.engine import CompletionOutput, RequestOutput
from serve_app.engine.sampler import TokenLogprobs
from serve_app.tokenizer import CodeTokenizer


def usage_of(out: RequestOutput, dropped_tokens: int = 0) -> Usage:
    prompt = len(out.prompt_token_ids)
    completion = sum(len(c.token_ids) for c in out.outputs)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=out.num_cached_tokens,
                                                           dropped_tokens=dropped_tokens))


@dataclass
class StreamState:
    started: bool = False                                   # the first output was rendered
    finished: set[int] = field(default_factory=set)         # candidates whose finish chunk was sent
    logprobs_sent: dict[int, int] = field(default_factory=dict)   # candidate → logprob entries sent
    text_offset: dict[int, int] = field(default_factory=dict)     # candidate → chars of token text sent


class Renderer:
    """Builds one endpoint kind's bodies for one request."""

    def __init__(self, prepared: PreparedRequest, tokenizer: CodeTokenizer) -> None:
        self.p = prepared
        self.tok = tokenizer

    # ---- whole responses -------------------------------------------------------------------------

    def response(self, final: RequestOutput) -> BaseModel:
        p = self.p
        usage = usage_of(final, p.dropped_prompt_tokens)      # counts every candidate generated, ranked or not
        tags = dict(precision=p.precision, tier=p.tier.tier.value)
        outputs = self.returned(final.outputs)
        if p.kind == "fim":
            only = outputs[0]
            return FimResponse(id=p.request_id, completion=only.text, finish_reason=only.finish_reason, usage=usage,
                               **tags)
        if p.kind == "chat":
            choices = [ChatChoice(index=c.index, message=ChatMessageOut(content=c.text),
                                  logprobs=self._chat_logprobs(c.logprobs), finish_reason=c.finish_reason)
                       for c in outputs]
            return ChatCompletionResponse(id=p.request_id, created=p.created, model=p.model, choices=choices,
                                          usage=usage, **tags)
        choices = [CompletionChoice(index=c.index, text=p.echo_text + c.text, finish_reason=c.finish_reason,
                                    logprobs=self._completion_logprobs(c.logprobs, 0)) for c in outputs]
        return CompletionResponse(id=p.request_id, created=p.created, model=p.model, choices=choices, usage=usage,
                                  **tags)

    def returned(self, outputs: list[CompletionOutput]) -> list[CompletionOutput]:
        """The candidates the client gets (`returned_indices`), re-indexed; logprobs only if the
        client asked for them."""
        by_index = {c.index: c for c in outputs}
        outputs = [replace(by_index[i], index=k) for k, i in enumerate(self.returned_indices(outputs))]
        if not self.p.client_logprobs:
            outputs = [replace(c, logprobs=None) for c in outputs]
        return outputs

    def returned_indices(self, outputs: list[CompletionOutput]) -> list[int]:
        """Which candidates the client gets, best first: the n best by `ranking.TIER_RANKER` when the
        tier ranks or the client sent OpenAI's best_of > n; otherwise all, in order."""
        p = self.p
        if p.tier.rank_candidates or (p.best_of is not None and p.best_of > p.tier.n):
            return [c.index for c in TIER_RANKER(outputs)[:p.tier.n]]
        return [c.index for c in outputs]

    # ---- streams -------------------------------------------------------------------------------

    def chunks(self, out: RequestOutput, state: StreamState) -> list[BaseModel]:
        """The chunks this output adds: every candidate on the first output (so the client sees the
        stream start at the first token), later only candidates with new text, logprobs or a finish."""
        first, state.started = not state.started, True
        chunks = []
        for c in out.outputs:
            sent = state.logprobs_sent.get(c.index, 0)
            new_lps = c.logprobs[sent:] if c.logprobs is not None else None
            finishing = c.finish_reason is not None and c.index not in state.finished
            if not (first or c.delta_text or new_lps or finishing):
                continue
            if finishing:
                state.finished.add(c.index)
            if new_lps is not None:
                state.logprobs_sent[c.index] = sent + len(new_lps)
            chunks.append(self._chunk(out, c, new_lps, first, state))
        return chunks

    def _usage(self, out: RequestOutput) -> Usage:
        return usage_of(out, self.p.dropped_prompt_tokens)

    def usage_chunk(self, final: RequestOutput) -> BaseModel:
        p = self.p
        if p.kind == "chat":
            return ChatCompletionChunk(id=p.request_id, created=p.created, model=p.model, precision=p.precision,
                                       tier=p.tier.tier.value, choices=[], usage=self._usage(final))
        return CompletionResponse(id=p.request_id, created=p.created, model=p.model, precision=p.precision,
                                  tier=p.tier.tier.value, choices=[], usage=self._usage(final))

    def _chunk(self, out: RequestOutput, c: CompletionOutput, new_lps: list[TokenLogprobs] | None,
               first: bool, state: StreamState) -> BaseModel:
        p = self.p
        finish = c.finish_reason if c.index in state.finished else None
        if p.kind == "fim":
            usage = self._usage(out) if finish else None      # FIM streams carry usage on their last chunk
            return FimResponse(id=p.request_id, completion=c.delta_text, finish_reason=finish, usage=usage,
                               precision=p.precision, tier=p.tier.tier.value)
        if p.kind == "chat":
            delta = ChatDelta(role="assistant" if first else None, content=c.delta_text)
            choice = ChatChunkChoice(index=c.index, delta=delta, logprobs=self._chat_logprobs(new_lps),
                                     finish_reason=finish)
            return ChatCompletionChunk(id=p.request_id, created=p.created, model=p.model, precision=p.precision,
                                       tier=p.tier.tier.value, choices=[choice])
        offset = state.text_offset.get(c.index, 0)
        logprobs = self._completion_logprobs(new_lps, offset)
        if logprobs is not None:
            state.text_offset[c.index] = offset + sum(len(t) for t in logprobs.tokens)
        text = p.echo_text + c.delta_text if first else c.delta_text       # echo: the prompt opens each choice
        choice = CompletionChoice(index=c.index, text=text, logprobs=logprobs, finish_reason=finish)
        return CompletionResponse(id=p.request_id, created=p.created, model=p.model, precision=p.precision,
                                  tier=p.tier.tier.value, choices=[choice], usage=None)

    # ---- logprobs ------------------------------------------------------------------------------

    def _token(self, token_id: int) -> str:
        return self.tok.decode([token_id], skip_special_tokens=False)

    def _completion_logprobs(self, lps: list[TokenLogprobs] | None, start_offset: int) -> CompletionLogprobs | None:
        if lps is None:
            return None
        tokens, offsets, offset = [], [], start_offset
        for lp in lps:
            text = self._token(lp.token_id)
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
        tops = [{self._token(t): v for t, v in zip(lp.top_token_ids, lp.top_logprobs)} for lp in lps]
        return CompletionLogprobs(tokens=tokens, token_logprobs=[lp.logprob for lp in lps], top_logprobs=tops,
                                  text_offset=offsets)

    def _chat_logprobs(self, lps: list[TokenLogprobs] | None) -> ChatLogprobs | None:
        if lps is None:
            return None
        content = []
        for lp in lps:
            token = self._token(lp.token_id)
            tops = [TopLogprob(token=(s := self._token(t)), logprob=v, bytes=list(s.encode("utf-8")))
                    for t, v in zip(lp.top_token_ids, lp.top_logprobs)]
            content.append(ChatTokenLogprob(token=token, logprob=lp.logprob, bytes=list(token.encode("utf-8")),
                                            top_logprobs=tops))
        return ChatLogprobs(content=content)
