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
set, names a file that gets one line per request (name, start, milliseconds, ok, HTTP status — 0
when no response came —, Retry-After, error), so the runner computes exact percentiles over all
inline requests together and plots latency over time, and the chaos soak (loadtests/chaos.py)
judges every answer. Requests still open when Locust stops are written last with status "open"
and their age, so a request that never ends is seen rather than lost. Locust kills users mid-request
when the run time is up (a user it finds between waits is killed at once, even if it has just
sent a request); such a request is written with its age when it was cut and the error "cut by
Locust stopping", so the judges can tell it from one that was stuck.
"""
from __future__ import annotations

import contextlib
import csv
import itertools
import json
import os
import random
import time

from gevent import GreenletExit
from locust import FastHttpUser, between, events, task

import workloads as wl

CFG = wl.WorkloadConfig.from_env()
POOL = wl.SourcePool()
API_KEY = os.environ.get("MOE_LT_API_KEY", "")
HEADERS = {"Authorization": f"Bearer {API_KEY}"} if API_KEY else {}
# keystroke: the request's place in its hole session (0 = the session's first); prompt_tokens /
# cached_tokens: the answer's usage (the prefix cache's share as the client sees it).
RAW_COLUMNS = ("name", "start_s", "ms", "ok", "status", "retry_after", "error", "keystroke", "prompt_tokens",
               "cached_tokens")
_raw_file = _raw = None
_open: dict[int, tuple[str, float, float | None]] = {}   # not yet answered: name, start, when Locust cut it
_ids = itertools.count()


@events.init.add_listener
def _open_raw_log(environment, **_):
    global _raw_file, _raw
    path = os.environ.get("MOE_LT_RAW_CSV")
    if path:
        _raw_file = open(path, "w", buffering=1, newline="")
        _raw = csv.writer(_raw_file)
        _raw.writerow(RAW_COLUMNS)


def _error_text(exception) -> str:
    if exception is None:
        return ""
    text = str(exception) or type(exception).__name__
    return " ".join(text.split())[:160]


@events.request.add_listener
def _log_request(name, start_time, response_time, exception, response=None, context=None, **_):
    if _raw is None:
        return
    status = getattr(response, "status_code", 0) or 0
    headers = getattr(response, "headers", None) or {}
    context = context or {}
    usage = context.get("usage") or {}
    _raw.writerow((name, f"{start_time:.3f}", f"{response_time:.3f}", int(exception is None), status,
                   headers.get("retry-after", "") if status else "", _error_text(exception),
                   context.get("keystroke", ""), usage.get("prompt_tokens", ""),
                   (usage.get("prompt_tokens_details") or {}).get("cached_tokens", "") if usage else ""))


@contextlib.contextmanager
def _in_flight(name: str):
    """Marks a request open until its answer is logged. No `finally`: a request interrupted by
    Locust stopping stays open (with the time it was cut), and is written as such when Locust quits."""
    key = next(_ids)
    _open[key] = (name, time.time(), None)
    try:
        yield
    except GreenletExit:
        _open[key] = (name, _open[key][1], time.time())
        raise
    _open.pop(key, None)


@events.quitting.add_listener
def _close_raw_log(environment, **_):
    if _raw is None:
        return
    now = time.time()
    for name, started, cut in list(_open.values()):
        error = "no answer yet" if cut is None else "cut by Locust stopping"
        _raw.writerow((name, f"{started:.3f}", f"{((cut or now) - started) * 1000:.3f}", 0, "open", "", error,
                       "", "", ""))
    _raw_file.close()


def _check(resp, field: str) -> None:
    """A 200 whose body lacks the answer is a failure too (e.g. an error event in a stream). The
    answer's usage goes into the request's context (the raw log's columns; Locust copies the
    context it is given, so it is set on the copy it reports)."""
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
    elif isinstance(body, dict):
        resp.request_meta["context"]["usage"] = body.get("usage")


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
    network_timeout = connection_timeout = CFG.timeout_s

    def on_start(self) -> None:
        self.rng = random.Random()

    def _fim_body(self, cut: wl.FimCut) -> dict:
        body = {"prefix": cut.prefix, "suffix": cut.suffix, "max_tokens": wl.max_tokens(self.rng, CFG),
                "temperature": CFG.temperature}
        if self.rng.random() < CFG.full_precision_share:
            body["precision"] = "full"
        return body

    @task
    def fill_a_hole(self) -> None:
        send = self.rng.choices([self.fim, self.completions_with_suffix, self.fim_stream], weights=[6, 2, 2])[0]
        for i, cut in enumerate(wl.hole_session(POOL.text(self.rng), self.rng, CFG)):
            if i:
                time.sleep(wl.think_time(self.rng, CFG))
            send(cut, {"keystroke": i})

    def fim(self, cut: wl.FimCut, context: dict) -> None:
        with _in_flight(wl.FIM), self.client.post("/v1/fim/completions", json=self._fim_body(cut), name=wl.FIM,
                                                  headers=HEADERS, catch_response=True, context=context) as resp:
            _check(resp, "completion")

    def completions_with_suffix(self, cut: wl.FimCut, context: dict) -> None:
        body = {**self._fim_body(cut), "prompt": cut.prefix}
        del body["prefix"]
        with _in_flight(wl.COMPLETIONS_FIM), self.client.post("/v1/completions", json=body, name=wl.COMPLETIONS_FIM,
                                                              headers=HEADERS, catch_response=True,
                                                              context=context) as resp:
            _check(resp, "choices")

    def fim_stream(self, cut: wl.FimCut, context: dict) -> None:
        body = {**self._fim_body(cut), "stream": True}
        started, started_wall = time.perf_counter(), time.time()
        ttft_ms, done, error = None, False, None
        with _in_flight(wl.FIM_STREAM), self.client.post(
                "/v1/fim/completions", json=body, name=wl.FIM_STREAM, headers=HEADERS, stream=True,
                catch_response=True, context=context) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}")
                return
            try:
                for line in _sse_lines(resp):
                    if line == "data: [DONE]":
                        done = True
                        break
                    if line.startswith("data: "):
                        event = json.loads(line[6:])
                        if "error" in event:
                            error = event["error"].get("message", "error event")
                        else:
                            ttft_ms = ttft_ms if ttft_ms is not None else (time.perf_counter() - started) * 1000
                            if event.get("usage"):                     # the last chunk carries it
                                resp.request_meta["context"]["usage"] = event["usage"]
            except Exception as exc:     # noqa: BLE001 - a connection cut mid-stream is this request's answer
                error = f"stream broken: {type(exc).__name__}: {exc}"
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
    network_timeout = connection_timeout = CFG.timeout_s

    def on_start(self) -> None:
        self.rng = random.Random()

    @task
    def chat(self) -> None:
        body = {"messages": wl.chat_messages(POOL.text(self.rng), self.rng, CFG),
                "max_tokens": CFG.chat_max_tokens, "temperature": 0.7}
        with _in_flight(wl.CHAT), self.client.post("/v1/chat/completions", json=body, name=wl.CHAT,
                                                   headers=HEADERS, catch_response=True) as resp:
            _check(resp, "choices")
