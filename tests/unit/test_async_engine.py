"""The async front: streams, aborts from anywhere, a stopped engine, a failing step."""
from __future__ import annotations

import asyncio

import pytest

from serve_app.engine import AsyncEngine, EngineStepError, EngineStoppedError
from tests.helpers.engines import build_model_dir, create_engine, greedy


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("async"), "mixtral")


def test_stream_deltas_add_up_to_the_final_output(model_dir):
    engine = AsyncEngine(create_engine(model_dir))

    async def run():
        outs = [o async for o in engine.generate("a", [5, 6, 7, 8], greedy(10))]
        return outs

    outs = asyncio.run(run())
    engine.shutdown()
    assert outs[-1].finished and not any(o.finished for o in outs[:-1])
    assert sum((o.outputs[0].delta_token_ids for o in outs), []) == outs[-1].outputs[0].token_ids
    assert "".join(o.outputs[0].delta_text for o in outs) == outs[-1].outputs[0].text


def test_abort_from_elsewhere_ends_the_stream_with_finish_reason_abort(model_dir):
    engine = AsyncEngine(create_engine(model_dir))

    async def run():
        stream = engine.generate("a", [5, 6, 7, 8], greedy(400))
        first = await stream.__anext__()
        await engine.abort("a")
        rest = [o async for o in stream]
        return first, rest

    first, rest = asyncio.run(asyncio.wait_for(run(), timeout=60))
    assert not first.finished
    assert rest[-1].finished and rest[-1].outputs[0].finish_reason == "abort"
    assert engine.snapshot(lambda core: core.blocks.num_used_blocks) == 0
    engine.shutdown()


def test_generate_on_a_stopped_engine_raises_instead_of_hanging(model_dir):
    engine = AsyncEngine(create_engine(model_dir))
    engine.shutdown()
    assert not engine.alive

    async def run():
        return [o async for o in engine.generate("a", [5, 6], greedy(2))]

    with pytest.raises(EngineStoppedError):
        asyncio.run(asyncio.wait_for(run(), timeout=30))


def test_a_failing_step_fails_the_requests_in_flight_and_the_engine_goes_on(model_dir):
    core = create_engine(model_dir)
    engine = AsyncEngine(core)
    real = core.runner.execute
    calls = {"n": 0}

    def flaky(batch, blocks, drafts=None):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("shard went away")
        return real(batch, blocks, drafts)

    core.runner.execute = flaky

    async def run(rid):
        return [o async for o in engine.generate(rid, [5, 6, 7], greedy(3))]

    with pytest.raises(EngineStepError, match="shard went away"):
        asyncio.run(asyncio.wait_for(run("a"), timeout=30))
    assert asyncio.run(asyncio.wait_for(run("b"), timeout=30))[-1].finished
    assert core.blocks.num_used_blocks == 0
    engine.shutdown()


def test_final_only_stream_yields_one_output_equal_to_the_streamed_final(model_dir):
    engine = AsyncEngine(create_engine(model_dir))

    async def run():
        streamed = [o async for o in engine.generate("a", [5, 6, 7, 8], greedy(10))]
        whole = [o async for o in engine.generate("b", [5, 6, 7, 8], greedy(10), stream=False)]
        return streamed, whole

    streamed, whole = asyncio.run(asyncio.wait_for(run(), timeout=60))
    engine.shutdown()
    assert len(streamed) == 10 and len(whole) == 1 and whole[0].finished
    assert whole[0].outputs[0].token_ids == streamed[-1].outputs[0].token_ids
    assert whole[0].outputs[0].text == streamed[-1].outputs[0].text


def test_a_request_cancelled_while_being_added_is_aborted_and_frees_its_blocks(model_dir):
    """Editors cancel on every keystroke; a cancel that lands before the first output must not
    leave the request running (it used to, when the add awaited a worker thread before the try)."""
    engine = AsyncEngine(create_engine(model_dir))

    async def run():
        for i in range(20):
            gen = engine.generate(f"r{i}", [5, 6, 7, 8] * 8, greedy(200))
            task = asyncio.ensure_future(anext(gen))
            for _ in range(i % 3):                   # cancel at different points of the add
                await asyncio.sleep(0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await gen.aclose()
        for _ in range(500):
            if engine.snapshot(lambda core: not core.requests and not engine._inbox):
                break
            await asyncio.sleep(0.01)

    asyncio.run(run())
    idle = engine.snapshot(lambda core: (len(core.requests), core.blocks.num_free_blocks == core.blocks.num_blocks))
    engine.shutdown()
    assert idle == (0, True)


def test_admission_errors_reach_the_caller_before_any_output(model_dir):
    engine = AsyncEngine(create_engine(model_dir))

    async def run():
        with pytest.raises(Exception, match="vocabulary"):
            await anext(engine.generate("bad", [10**6], greedy(4)))
        return [o async for o in engine.generate("ok", [5, 6], greedy(3))][-1]

    out = asyncio.run(run())
    engine.shutdown()
    assert out.finished and len(out.outputs[0].token_ids) == 3


def test_a_reader_whose_event_loop_closed_neither_kills_the_engine_nor_keeps_its_blocks(model_dir):
    """A delivery into a closed event loop used to raise in the engine thread and end it."""
    engine = AsyncEngine(create_engine(model_dir))

    async def start_and_leave():
        gen = engine.generate("orphan", [5, 6, 7, 8] * 4, greedy(300))
        await anext(gen)                         # running; then this loop closes with the stream open

    loop = asyncio.new_event_loop()
    loop.run_until_complete(start_and_leave())
    loop.close()

    async def later():
        for _ in range(1000):
            if engine.snapshot(lambda core: not core.requests):
                break
            await asyncio.sleep(0.01)
        return [o async for o in engine.generate("next", [5, 6], greedy(3))][-1]

    out = asyncio.run(later())
    idle = engine.snapshot(lambda core: core.blocks.num_free_blocks == core.blocks.num_blocks)
    alive = engine.alive
    engine.shutdown()
    assert alive and out.finished and idle


def test_an_observer_that_raises_does_not_fail_the_requests(model_dir):
    class Broken:
        def on_step(self, stats):
            raise RuntimeError("metrics backend down")

    core = create_engine(model_dir)
    core.observer = Broken()
    engine = AsyncEngine(core)

    async def run():
        return [o async for o in engine.generate("a", [5, 6, 7], greedy(5))][-1]

    out = asyncio.run(run())
    engine.shutdown()
    assert out.finished and len(out.outputs[0].token_ids) == 5
