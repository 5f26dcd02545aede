"""The full lane yields to the fast lane (engine/priority.py), with a starvation bound."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from serve_app.engine import AsyncEngine
from serve_app.engine.priority import LaneGate
from tests.helpers.engines import build_model_dir, create_engine, greedy


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("lanes"), "mixtral")


def test_wait_turn_is_free_when_no_priority_lane_has_work():
    gate = LaneGate(max_defer_s=5.0)
    assert gate.wait_turn() < 0.1
    assert gate.forced_steps == 0


def test_wait_turn_returns_when_the_priority_lane_goes_idle():
    gate, lane = LaneGate(max_defer_s=30.0), object()
    gate.set_busy(lane, True)
    released_at = []

    def release():
        released_at.append(time.monotonic())
        gate.set_busy(lane, False)
    threading.Timer(0.2, release).start()
    gate.wait_turn()
    assert released_at and time.monotonic() >= released_at[0] and gate.forced_steps == 0


def test_wait_turn_gives_up_after_max_defer():
    gate, lane = LaneGate(max_defer_s=0.1), object()
    gate.set_busy(lane, True)
    gate.set_busy(lane, True)               # idempotent: one lane counts once
    assert 0.09 < gate.wait_turn() < 5.0 and gate.forced_steps == 1
    gate.set_busy(lane, False)
    assert not gate.priority_busy


def _record_steps(engine: AsyncEngine, log: list[tuple[str, float, float]], name: str) -> None:
    """Wrap the real core's step to log (lane, start, end) of every step."""
    step = engine.core.step

    def timed():
        start = time.monotonic()
        try:
            return step()
        finally:
            log.append((name, start, time.monotonic()))
    engine.core.step = timed


async def _finish_time(engine: AsyncEngine, request_id: str, prompt: list[int], max_tokens: int) -> float:
    async for out in engine.generate(request_id, prompt, greedy(max_tokens)):
        if out.finished:
            return time.monotonic()
    raise AssertionError("stream ended without a finished output")


def _on_two_lanes(model_dir, max_defer_s: float, scenario, prepare=lambda fast, full: None):
    """A fast and a full engine sharing one gate; runs `scenario(fast, full)` (a coroutine function),
    shuts both down and returns (gate, fast, full, its result)."""
    gate = LaneGate(max_defer_s=max_defer_s)
    fast = AsyncEngine(create_engine(model_dir), gate=gate, priority=True)
    full = AsyncEngine(create_engine(model_dir), gate=gate)
    prepare(fast, full)
    try:
        result = asyncio.run(asyncio.wait_for(scenario(fast, full), timeout=120))
    finally:
        fast.shutdown()
        full.shutdown()
    return gate, fast, full, result


def test_the_full_lane_does_not_step_while_the_fast_lane_has_work(model_dir):
    steps: list[tuple[str, float, float]] = []

    def record(fast, full):
        _record_steps(fast, steps, "fast")
        _record_steps(full, steps, "full")

    async def run(fast, full):
        slow = asyncio.create_task(_finish_time(full, "complex", [5, 6, 7, 8], 60))
        while not any(name == "full" for name, _, _ in steps):
            await asyncio.sleep(0.01)
        fast_done = await _finish_time(fast, "simple", [9, 10, 11], 20)
        return fast_done, await slow

    # No starvation bound within this test.
    gate, _, _, (fast_done, full_done) = _on_two_lanes(model_dir, 60.0, run, prepare=record)
    # The fast lane's busy window from its own step log (the asyncio side may see the end later).
    fast_started = min(s for name, s, _ in steps if name == "fast")
    fast_ended = max(e for name, _, e in steps if name == "fast")
    started_during = [s for name, s, _ in steps if name == "full" and fast_started < s < fast_ended]
    # At most one full step can slip in: one whose turn was granted just before the fast lane got work.
    assert len(started_during) <= 1, started_during
    assert sum(name == "fast" for name, _, _ in steps) >= 20
    assert full_done > fast_done and gate.forced_steps == 0
    assert sum(name == "full" for name, _, _ in steps) >= 60  # the full request still ran to the end


def test_the_starvation_bound_lets_the_full_lane_progress_under_constant_fast_traffic(model_dir):
    async def run(fast, full):
        busy = asyncio.create_task(_finish_time(fast, "simple-long", [5, 6, 7, 8], 400))
        await asyncio.sleep(0.05)
        complex_done = await _finish_time(full, "complex", [9, 10, 11], 4)
        return complex_done, await busy

    gate, fast, full, (complex_done, fast_done) = _on_two_lanes(model_dir, 0.02, run)
    assert complex_done < fast_done and gate.forced_steps >= 1
    assert fast.snapshot(lambda core: core.blocks.num_used_blocks) == 0
    assert full.snapshot(lambda core: core.blocks.num_used_blocks) == 0


def test_lane_configs_split_the_kv_blocks_exactly():
    from serve_app.config import EngineConfig
    from serve_app.engine.lanes import lane_configs

    lanes = lane_configs(EngineConfig(num_kv_blocks=101), 0.3, with_fast_lane=True)
    assert lanes["fast"].num_kv_blocks == 30 and lanes["fast"].num_kv_blocks + lanes["full"].num_kv_blocks == 101
    assert list(lane_configs(EngineConfig(), 0.3, with_fast_lane=False)) == ["full"]


def test_lanes_send_quantized_requests_to_the_fast_engine_and_full_ones_to_the_full_engine(model_dir):
    from serve_app.config import EngineConfig
    from serve_app.engine.lanes import Lanes
    from serve_app.model import load_model
    from serve_app.model.quant_experts import quantized_copies
    from serve_app.tokenizer import CodeTokenizer

    model = load_model(model_dir)
    for mode, copy in quantized_copies(model.local_experts, ("int8",), 32).items():
        model.set_expert_backend(copy, mode)
    # No speculative decoding: the step counts below assume one token per step.
    lanes = Lanes(model, EngineConfig(block_size=4, num_kv_blocks=128, speculative_tokens=0),
                  CodeTokenizer.from_dir(model_dir))
    assert set(lanes.engines) == {"fast", "full"} and lanes.gate is not None

    async def final(rid, precision):
        return [o async for o in lanes.generate(rid, [5, 6, 7], greedy(5), precision=precision)][-1]

    def steps() -> dict[str, int]:
        return {name: engine.core.num_steps for name, engine in lanes.engines.items()}

    try:
        # One at a time, so each request's steps can only have come from the lane that ran it
        # (both engines share the model and accept either precision: only the step counts tell).
        before = steps()
        quantized = asyncio.run(asyncio.wait_for(final("q", "int8"), timeout=120))
        after_q = steps()
        full = asyncio.run(asyncio.wait_for(final("f", "full"), timeout=120))
        after_f = steps()
        assert quantized.finished and full.finished
        assert after_q["fast"] - before["fast"] >= 5 and after_q["full"] == before["full"]
        assert after_f["full"] - after_q["full"] >= 5 and after_f["fast"] == after_q["fast"]
        assert lanes.alive and lanes.dead_lanes() == []
        assert sum(lanes.snapshot(lambda core: core.blocks.num_used_blocks)) == 0
    finally:
        lanes.shutdown()
    assert not lanes.alive and lanes.dead_lanes() == ["fast", "full"]
