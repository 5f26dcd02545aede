"""Locust users that behave like editors talking to moe-serve.

- `EditorUser`: an inline-completion plugin filling holes (`workloads.hole_session`): the user types
  into a hole 1-6 characters at a time, pausing 0.2-0.5 s, 8-20 requests, the text after the hole
  unchanged; then a new hole in another file. Each session uses one request form, as a plugin
  does: `/v1/fim/completions` (most), the OpenAI form `/v1/completions` with `suffix`, or a
  streamed FIM (its time to the first token is recorded as its own statistic, `TTFT fim-stream`).
- `ChatUser`: the editor's chat panel; only with MOE_LT_CHAT_USERS > 0.

Run it through `loadtests/run_slo.py` (which checks the SLO), or directly:
`locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 --headless -u 8 -r 2 -t 60s`.
Request shapes come from MOE_LT_* variables (see workloads.WorkloadConfig); MOE_LT_RAW_CSV, when
set, names a file that gets one line per request (name, start, milliseconds, ok), so the runner
computes exact percentiles over all inline requests together and plots latency over time.
"""
from __future__ import annotations

import json
import os
import random
import time

from locust import FastHttpUser, between, events, task

import workloads as wl

CFG = wl.WorkloadConfig.from_env()
POOL = wl.SourcePool()
API_KEY = os.environ.get("MOE_LT_API_KEY", "")
HEADERS = {"Authorization": f"Bearer {API_KEY}"} if API_KEY else {}
_raw = None


@events.init.add_listener
def _open_raw_log(environment, **_):
    global _raw
    path = os.environ.get("MOE_LT_RAW_CSV")
    if path:
        _raw = open(path, "w", buffering=1)
        _raw.write("name,start_s,ms,ok\n")


@events.request.add_listener
def _log_request(name, start_time, response_time, exception, **_):
    if _raw is not None:
        _raw.write(f"{name},{start_time:.3f},{response_time:.3f},{int(exception is None)}\n")


@events.quitting.add_listener
def _close_raw_log(environment, **_):
    if _raw is not None:
        _raw.close()


def _check(resp, field: str) -> None:
    """A 200 whose body lacks the answer is a failure too (e.g. an error event in a stream)."""
    if resp.status_code != 200:
        resp.failure(f"HTTP {resp.status_code}: {resp.text[:200] if resp.text else ''}")
        return
    try:
        body = resp.json()
    except (ValueError, TypeError):
        resp.failure("response is not JSON")
        return
    if field not in json.dumps(body):
        resp.failure(f"no {field!r} in response")


def _sse_lines(resp):
    """Lines of a streamed body as they arrive. Locust's FastResponse has no line iterator that
    returns before a whole read buffer is full, which would hide the first token's arrival; the
    geventhttpclient response under it does."""
    raw = getattr(resp, "_response", None)
    if raw is not None and hasattr(raw, "readline"):
        while line := raw.readline(b"\n"):
            yield line.decode("utf-8", "replace").rstrip("\r\n")
        return
    yield from resp.text.splitlines()


class EditorUser(FastHttpUser):
    weight = 6
    wait_time = between(CFG.min_think_s, CFG.max_think_s)    # then a new hole in another file

    def on_start(self) -> None:
        self.rng = random.Random()

    def _fim_body(self, cut: wl.FimCut) -> dict:
        return {"prefix": cut.prefix, "suffix": cut.suffix, "max_tokens": wl.max_tokens(self.rng, CFG),
                "temperature": CFG.temperature}

    @task
    def fill_a_hole(self) -> None:
        send = self.rng.choices([self.fim, self.completions_with_suffix, self.fim_stream], weights=[6, 2, 2])[0]
        for i, cut in enumerate(wl.hole_session(POOL.text(self.rng), self.rng, CFG)):
            if i:
                time.sleep(wl.think_time(self.rng, CFG))
            send(cut)

    def fim(self, cut: wl.FimCut) -> None:
        with self.client.post("/v1/fim/completions", json=self._fim_body(cut), name=wl.FIM, headers=HEADERS,
                              catch_response=True) as resp:
            _check(resp, "completion")

    def completions_with_suffix(self, cut: wl.FimCut) -> None:
        body = {"prompt": cut.prefix, "suffix": cut.suffix, "max_tokens": wl.max_tokens(self.rng, CFG),
                "temperature": CFG.temperature}
        with self.client.post("/v1/completions", json=body, name=wl.COMPLETIONS_FIM, headers=HEADERS,
                              catch_response=True) as resp:
            _check(resp, "choices")

    def fim_stream(self, cut: wl.FimCut) -> None:
        body = {**self._fim_body(cut), "stream": True}
        started, started_wall = time.perf_counter(), time.time()
        ttft_ms, done, error = None, False, None
        with self.client.post("/v1/fim/completions", json=body, name=wl.FIM_STREAM, headers=HEADERS,
                              stream=True, catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}")
                return
            for line in _sse_lines(resp):
                if line == "data: [DONE]":
                    done = True
                    break
                if line.startswith("data: "):
                    event = json.loads(line[6:])
                    if "error" in event:
                        error = event["error"].get("message", "error event")
                    elif ttft_ms is None:
                        ttft_ms = (time.perf_counter() - started) * 1000
            # The request's time is the whole stream, not just its headers.
            resp.request_meta["response_time"] = (time.perf_counter() - started) * 1000
            if error or not done:
                resp.failure(error or "stream ended without [DONE]")
            elif ttft_ms is not None:
                self.environment.events.request.fire(
                    request_type="SSE", name=wl.TTFT_FIM_STREAM, response_time=ttft_ms, response_length=0,
                    exception=None, context={}, start_time=started_wall, url="")


class ChatUser(FastHttpUser):
    abstract = CFG.chat_users == 0          # editors only unless asked for
    weight = max(1, CFG.chat_users)
    wait_time = between(2.0, 6.0)      # reading the previous answer

    def on_start(self) -> None:
        self.rng = random.Random()

    @task
    def chat(self) -> None:
        body = {"messages": wl.chat_messages(POOL.text(self.rng), self.rng, CFG),
                "max_tokens": CFG.chat_max_tokens, "temperature": 0.7}
        with self.client.post("/v1/chat/completions", json=body, name=wl.CHAT, headers=HEADERS,
                              catch_response=True) as resp:
            _check(resp, "choices")
