"""A batch of prompts in one /v1/completions request (OpenAI's `prompt` as a list).

Each prompt becomes its own engine request (`{response id}-{i}`): its own tier and precision, its
own prefix-cache hits, batched with everything else by the engine. The response has one choice
per prompt and candidate, `index = prompt * n + candidate` (OpenAI's rule; a running sum of the
earlier prompts' choices when a tier returns more), usage summed over the
prompts, and, for the tier and precision fields, those of the first prompt (each prompt was
classified on its own; a response has one such field).

Rendering reuses one `Renderer` per prompt (echo, best_of ranking and logprob offsets stay
per-prompt) and re-indexes its choices. A failure of any prompt — admission (429/400), the engine,
the deadline, the client leaving — aborts every prompt of the batch before the answer goes out,
so no blocks stay behind.
"""
from __future__ import annotations

import asyncio
import json

import anyio
from dataclasses import replace
from typing import AsyncIterator

from starlette.requests import Request

from serve_app.api.client import EngineClient
from serve_app.api.errors import from_exception
from serve_app.api.prepare import PreparedRequest
from serve_app.api.protocol import CompletionResponse, PromptTokensDetails, Usage
from serve_app.api.render import Renderer, StreamState
from serve_app.api.streaming import DONE_EVENT, last_output, request_timeout, run_guarded, sse, start_generation
from serve_app.engine import RequestOutput, RequestRejectedError
from serve_app.tokenizer import CodeTokenizer


def batch_parts(parts: list[PreparedRequest]) -> tuple[str, list[PreparedRequest]]:
    """The response id (the first prompt's) and the prompts' requests with engine ids under it."""
    batch_id = parts[0].request_id
    return batch_id, [replace(p, request_id=f"{batch_id}-{i}") for i, p in enumerate(parts)]


class BatchCompletion:
    """Runs the prompts of one request and renders them as one response or one event stream."""

    def __init__(self, client: EngineClient, parts: list[PreparedRequest], response_id: str,
                 tokenizer: CodeTokenizer) -> None:
        self.client = client
        self.parts = parts
        self.response_id = response_id
        self.renderers = [Renderer(p, tokenizer) for p in parts]
        self.outputs = [start_generation(client, p, p.stream) for p in parts]
        self.finished = [False] * len(parts)
        # Choice index of each prompt's first candidate: prompts may return different numbers of
        # choices (an unranked tier returns all its candidates), so offsets are a running sum.
        self.offsets = [sum(p.tier.n for p in parts[:i]) for i in range(len(parts))]

    # ---- whole response ------------------------------------------------------------------------

    async def response(self, request: Request, deadline: float, timeout_s: float) -> CompletionResponse:
        try:
            finals = await run_guarded(request, self._all(last_output), deadline, timeout_s)
            self.finished = [True] * len(self.parts)
        finally:
            await self.abort_all()
        bodies = [r.response(f) for r, f in zip(self.renderers, finals)]
        return self._merge(bodies, [b.usage for b in bodies])

    async def _all(self, read) -> list:
        """read(outputs) for every prompt at once; when one fails (a 429 for prompt 2), the others
        are cancelled and awaited before the error goes on, so no iterator is left running."""
        async def one(i: int, outputs):
            try:
                return await read(outputs)
            except RequestRejectedError as exc:     # the engine names "prompt": say which one
                if exc.param == "prompt":
                    exc.param = f"prompt[{i}]"
                raise

        tasks = [asyncio.ensure_future(one(i, o)) for i, o in enumerate(self.outputs)]
        try:
            return await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.gather(*tasks, return_exceptions=True)

    # ---- stream --------------------------------------------------------------------------------

    async def first_outputs(self, request: Request, deadline: float, timeout_s: float) -> list[RequestOutput]:
        """Every prompt's first output: admission errors of any prompt surface here, before the
        response starts (the status can still say what went wrong)."""
        try:
            firsts = await run_guarded(request, self._all(lambda o: anext(o, None)), deadline, timeout_s)
        except BaseException:
            await self.abort_all()
            raise
        if any(f is None for f in firsts):
            await self.abort_all()
            raise RuntimeError("the engine's output stream ended before its first output")
        return firsts

    async def events(self, firsts: list[RequestOutput], deadline: float, timeout_s: float) -> AsyncIterator[str]:
        """SSE events of the whole batch, in the order the prompts' outputs arrive."""
        states = [StreamState() for _ in self.parts]
        queue: asyncio.Queue = asyncio.Queue()
        for i, out in enumerate(firsts):
            queue.put_nowait((i, out))
        pumps = [asyncio.ensure_future(self._pump(i, o, queue)) for i, o in enumerate(self.outputs)]
        finals: list[RequestOutput | None] = [None] * len(self.parts)
        error = None
        loop = asyncio.get_running_loop()
        try:
            while not all(self.finished):
                try:
                    i, out = await asyncio.wait_for(queue.get(), timeout=max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    raise request_timeout(timeout_s) from None
                if isinstance(out, BaseException):
                    raise out
                for chunk in self.renderers[i].chunks(out, states[i]):
                    yield sse(self._reindex(chunk, i).model_dump_json())
                if out.finished:
                    self.finished[i], finals[i] = True, out
            if self.parts[0].include_usage:
                usages = [r.usage_chunk(f).usage for r, f in zip(self.renderers, finals)]
                yield sse(self._merge([], usages).model_dump_json())
        except Exception as exc:         # noqa: BLE001 - the status is sent; report in-band
            error = from_exception(exc)
        finally:                         # a disconnect cancels us here: the clean-up must still finish
            with anyio.CancelScope(shield=True):
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
                await self.abort_all()
        if error is not None:
            yield sse(json.dumps(error.body()))
        yield DONE_EVENT

    @staticmethod
    async def _pump(i: int, outputs: AsyncIterator[RequestOutput], queue: asyncio.Queue) -> None:
        try:
            async for out in outputs:
                queue.put_nowait((i, out))
        except Exception as exc:         # noqa: BLE001 - handed to the consumer
            queue.put_nowait((i, exc))

    # ---- shared --------------------------------------------------------------------------------

    async def abort_all(self) -> None:
        """Close every prompt's iterator and abort the unfinished ones (shielded: it must finish)."""
        async def close(i: int) -> None:
            try:
                await self.outputs[i].aclose()
            finally:
                if not self.finished[i]:
                    await self.client.abort(self.parts[i].request_id)
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*(close(i) for i in range(len(self.parts))), return_exceptions=True)

    def _reindex(self, body: CompletionResponse, prompt: int) -> CompletionResponse:
        choices = [c.model_copy(update={"index": self.offsets[prompt] + c.index}) for c in body.choices]
        return body.model_copy(update={"id": self.response_id, "choices": choices})

    def _merge(self, bodies: list[CompletionResponse], usages: list[Usage | None]) -> CompletionResponse:
        first = self.parts[0]
        choices = [c for i, b in enumerate(bodies) for c in self._reindex(b, i).choices]
        usages = [u for u in usages if u is not None]
        details = [u.prompt_tokens_details for u in usages if u.prompt_tokens_details is not None]
        usage = Usage(prompt_tokens=sum(u.prompt_tokens for u in usages),
                      completion_tokens=sum(u.completion_tokens for u in usages),
                      total_tokens=sum(u.total_tokens for u in usages),
                      prompt_tokens_details=PromptTokensDetails(
                          cached_tokens=sum(d.cached_tokens for d in details),
                          dropped_tokens=sum(d.dropped_tokens for d in details)))
        return CompletionResponse(id=self.response_id, created=first.created, model=first.model,
                                  precision=first.precision, tier=first.tier.tier.value, choices=choices, usage=usage)
