"""llama.cpp's answers for /completion and /infill: result objects, SSE chunks, and the two stop
rules editor plugins rely on.

The answer (llama.cpp's tools/server README): `content`, `stop`, `stop_type` ("eos", "limit",
"word", "none"), `stopping_word`, `tokens_predicted`, `tokens_evaluated`, `tokens_cached` (prompt +
generated, as llama.cpp's code counts it), `truncated` (here: the FIM prompt was trimmed to fit),
`generation_settings` (llama.vscode reads `n_ctx` from every answer) and `timings`, measured here at
the HTTP layer (prompt_ms: request sent → first token; predicted_ms: first → last token). The
detokenized `prompt` is not echoed: it is the user's whole file, and no client reads it.
Streams are `data: {json}` events with partial `content`, then one final object per completion
(`stop: true`, empty `content`), and no `[DONE]`. JSON is compact: llama.vim only accepts
`"content":"` with no space after the colon.

Stop rules, applied to each completion as its text arrives (so these requests ask the engine for
every step's output, and a completion ended here is aborted in the engine at once):
- `n_indent` (llama.vim sends the cursor line's indentation): a line after the first that is
  indented less ends the completion at its first non-blank character — the rest is outside the
  block being completed. While streaming, the blanks after the last newline are held back until
  the line's indentation is known.
- `t_max_predict_ms`: once generating has taken that long, the completion ends at the next newline.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import Response

from serve_app.api.client import EngineClient
from serve_app.api.errors import from_exception
from serve_app.api.prepare import PreparedRequest
from serve_app.api.render import Renderer
from serve_app.api.settings import ApiSettings
from serve_app.api.streaming import (SSE_HEADERS, EventStreamResponse, abort_quietly, fail_before_response,
                                     next_before, response_headers, run_guarded, sse, start_generation)
from serve_app.engine import CompletionOutput, RequestOutput

UNSEEDED = 2**32 - 1                    # how llama.cpp reports a random seed (-1 as uint32)


@dataclass(frozen=True)
class LlamaOptions:
    """What llama.cpp's fields add to a prepared request (filled by api/llamacpp.py)."""
    n_indent: int                       # lines after the first need this much indentation (0: off)
    t_max_predict_ms: int               # end at a newline once generating took this long (0: off)
    response_fields: tuple[str, ...] | None   # keep only these paths, as flat keys ("timings/prompt_n")
    return_tokens: bool                 # `tokens` holds the generated ids
    warm_up: bool                       # n_predict 0: the prompt is prefilled (the cache warmed), no text returned
    as_array: bool                      # n_cmpl > 1: a JSON array of results


def indent_cut(text: str, n_indent: int) -> int | None:
    """Where the n_indent rule ends `text`: the first non-blank character of the first line after
    the first one that is indented less than `n_indent` (its blanks stay, as in llama.cpp); None if
    no line is."""
    if n_indent <= 0:
        return None
    pos = text.find("\n")
    while pos != -1:
        start, end = pos + 1, text.find("\n", pos + 1)
        line = text[start:] if end == -1 else text[start:end]
        body = line.lstrip(" \t")
        if body and len(line) - len(body) < n_indent:
            return start + len(line) - len(body)
        pos = end
    return None


@dataclass
class Candidate:
    """One completion as this endpoint answers it."""
    output: CompletionOutput            # the engine's latest state of it
    text: str                           # the answer's text (shorter than output.text once cut)
    cut: bool = False                   # ended by a stop rule here, not by the engine
    sent_chars: int = 0                 # streamed so far
    sent_tokens: int = 0

    @property
    def done(self) -> bool:
        return self.cut or self.output.finish_reason is not None


class LlamaRun:
    """One request's outputs as they arrive, with the stop rules applied."""

    def __init__(self, prepared: PreparedRequest, opts: LlamaOptions, settings: ApiSettings) -> None:
        self.p, self.opts, self.settings = prepared, opts, settings
        self.candidates: dict[int, Candidate] = {}
        self.final: RequestOutput | None = None
        self.started = self.last = time.monotonic()
        self.first_token: float | None = None

    def update(self, out: RequestOutput) -> None:
        now = self.last = time.monotonic()
        self.final = out
        if self.first_token is None and any(c.token_ids for c in out.outputs):
            self.first_token = now
        for c in out.outputs:
            cand = self.candidates.get(c.index)
            if cand is None:
                cand = self.candidates[c.index] = Candidate(c, c.text)
            if cand.cut:
                continue
            cand.output, cand.text = c, c.text
            cut = indent_cut(c.text, self.opts.n_indent)
            if cut is not None:
                cand.text, cand.cut = c.text[:cut], True
            elif (self.opts.t_max_predict_ms > 0 and c.finish_reason is None and "\n" in c.delta_text
                  and (now - (self.first_token or now)) * 1000 > self.opts.t_max_predict_ms):
                cand.cut = True

    @property
    def done(self) -> bool:
        return self.final is not None and (self.final.finished or all(c.done for c in self.candidates.values()))

    # ---- streams -------------------------------------------------------------------------------

    def chunks(self) -> list[dict[str, Any]]:
        """Partial chunks for what became sendable since the last call."""
        chunks = []
        for index in sorted(self.candidates):
            cand = self.candidates[index]
            text = "" if self.opts.warm_up else self._sendable(cand)
            if len(text) <= cand.sent_chars:
                continue
            ids = cand.output.token_ids
            chunks.append({"index": index, "content": text[cand.sent_chars:],
                           "tokens": ids[cand.sent_tokens:] if self.opts.return_tokens else [], "stop": False,
                           "id_slot": -1, "tokens_predicted": len(ids), "tokens_evaluated": self._num_prompt})
            cand.sent_chars, cand.sent_tokens = len(text), len(ids)
        return chunks

    def _sendable(self, cand: Candidate) -> str:
        if cand.done or self.opts.n_indent <= 0 or "\n" not in cand.text:
            return cand.text
        start = cand.text.rfind("\n") + 1
        return cand.text if cand.text[start:].strip(" \t") else cand.text[:start]   # indentation not known yet

    # ---- results -------------------------------------------------------------------------------

    def results(self, renderer: Renderer, streamed: bool = False) -> list[dict[str, Any]]:
        """The final objects, in the order the client gets them (ranked as the OpenAI routes rank)."""
        outputs = [self.candidates[i].output for i in sorted(self.candidates)]
        return [self._result(self.candidates[i], k, streamed) for k, i in enumerate(renderer.returned_indices(outputs))]

    @property
    def _num_prompt(self) -> int:
        return len(self.final.prompt_token_ids) if self.final else len(self.p.prompt_token_ids)

    def _result(self, cand: Candidate, index: int, streamed: bool) -> dict[str, Any]:
        p, params, final = self.p, self.p.params, self.final
        assert final is not None
        ids = [] if self.opts.warm_up else cand.output.token_ids
        text = "" if self.opts.warm_up else cand.text
        stop_type, word = self._stop_type(cand)
        first = self.first_token or self.last
        prompt_ms, predicted_ms = (first - self.started) * 1000, (self.last - first) * 1000
        prompt_n = self._num_prompt - final.num_cached_tokens
        settings = {"n_ctx": self.settings.max_model_len, "n_predict": params.max_tokens,
                    "max_tokens": params.max_tokens, "seed": UNSEEDED if params.seed is None else params.seed,
                    "temperature": params.temperature, "top_k": params.top_k, "top_p": params.top_p, "min_p": 0.0,
                    "stop": list(params.stop), "stream": p.stream, "n_probs": 0, "precision": p.precision,
                    "tier": p.tier.tier.value}
        timings = {"cache_n": final.num_cached_tokens, "prompt_n": prompt_n, "prompt_ms": _ms(prompt_ms),
                   "prompt_per_token_ms": _ms(prompt_ms / max(1, prompt_n)),
                   "prompt_per_second": _ms(prompt_n / prompt_ms * 1000) if prompt_ms > 0 else 0.0,
                   "predicted_n": len(ids), "predicted_ms": _ms(predicted_ms),
                   "predicted_per_token_ms": _ms(predicted_ms / max(1, len(ids))),
                   "predicted_per_second": _ms(len(ids) / predicted_ms * 1000) if predicted_ms > 0 else 0.0}
        result = {"index": index, "content": "" if streamed else text,
                  "tokens": list(ids) if self.opts.return_tokens and not streamed else [], "id_slot": 0, "stop": True,
                  "model": p.model, "tokens_predicted": len(ids), "tokens_evaluated": self._num_prompt,
                  "generation_settings": settings, "has_new_line": "\n" in text,
                  "truncated": p.dropped_prompt_tokens > 0, "stop_type": stop_type, "stopping_word": word,
                  "tokens_cached": self._num_prompt + len(ids), "timings": timings}
        return pick(result, self.opts.response_fields)

    def _stop_type(self, cand: Candidate) -> tuple[str, str]:
        if cand.cut or self.opts.warm_up:
            return "limit", ""
        reason, stop = cand.output.finish_reason, cand.output.stop_reason
        if reason == "length":
            return "limit", ""
        if reason == "stop":
            return ("word", stop) if isinstance(stop, str) else ("eos", "")
        return "none", ""


def pick(obj: dict[str, Any], paths: tuple[str, ...] | None) -> dict[str, Any]:
    """llama.cpp's response_fields: each "a/b" path looked up and stored flat under that string;
    missing paths are left out."""
    if paths is None:
        return obj
    picked = {}
    for path in paths:
        node: Any = obj
        for key in path.split("/"):
            if not isinstance(node, dict) or key not in node:
                break
            node = node[key]
        else:
            picked[path] = node
    return picked


def _ms(value: float) -> float:
    return round(value, 3)


def compact(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


async def serve_llama(request: Request, client: EngineClient, settings: ApiSettings, prepared: PreparedRequest,
                      opts: LlamaOptions) -> Response:
    """Run one request and answer it in llama.cpp's shape (see the module docstring)."""
    timeout_s = settings.request_timeout_s
    deadline = asyncio.get_running_loop().time() + timeout_s
    run, renderer = LlamaRun(prepared, opts, settings), Renderer(prepared, settings.tokenizer)
    every_step = prepared.stream or opts.n_indent > 0 or opts.t_max_predict_ms > 0   # the stop rules read each step
    outputs, headers = start_generation(client, prepared, every_step), response_headers(prepared)
    try:
        if prepared.stream:
            first = await run_guarded(request, anext(outputs, None), deadline, timeout_s)
            if first is None:
                raise RuntimeError("the engine's output stream ended before its first output")
            run.update(first)
        else:
            await run_guarded(request, _drive(outputs, run), deadline, timeout_s)
    except BaseException as exc:
        return await fail_before_response(client, outputs, prepared, exc)
    if not prepared.stream:
        await _close(client, outputs, run, prepared)
        results = run.results(renderer)
        return Response(compact(results if opts.as_array else results[0]), headers=headers,
                        media_type="application/json")
    body = _events(run, renderer, outputs, client, deadline, timeout_s)
    return EventStreamResponse(body, headers={**headers, **SSE_HEADERS})


async def _drive(outputs: AsyncIterator[RequestOutput], run: LlamaRun) -> None:
    async for out in outputs:
        run.update(out)
        if run.done:
            return
    raise RuntimeError("the engine's output stream ended before the request finished")


async def _close(client: EngineClient, outputs: AsyncIterator[RequestOutput], run: LlamaRun,
                 prepared: PreparedRequest) -> None:
    """Free the request's blocks now if a stop rule ended it before the engine did."""
    if run.final is not None and run.final.finished:
        await outputs.aclose()
    else:
        await abort_quietly(client, outputs, prepared.request_id)


async def _events(run: LlamaRun, renderer: Renderer, outputs: AsyncIterator[RequestOutput], client: EngineClient,
                  deadline: float, timeout_s: float) -> AsyncIterator[str]:
    error = None
    try:
        while True:
            for chunk in run.chunks():
                yield sse(compact(chunk))
            if run.done:
                break
            run.update(await next_before(outputs, deadline, timeout_s))
        for result in run.results(renderer, streamed=True):
            yield sse(compact(result))
    except Exception as exc:             # noqa: BLE001 - the status is sent; report in-band
        error = from_exception(exc, run.p.param_aliases)
    finally:
        await _close(client, outputs, run, run.p)
    if error is not None:
        yield sse(compact(error.body()))
