"""AsyncLLMEngine in-process: results match the sync engine, cancellation aborts and frees
blocks, engine errors reach the waiting requests (no hang), the idle thread sleeps, shutdown
fails whatever is left."""

from __future__ import annotations

import asyncio
import time

import pytest

from kvserve.core.sampling_params import SamplingParams
from kvserve.engine.arg_utils import EngineArgs
from kvserve.engine.async_engine import AsyncLLMEngine, EngineDeadError, EngineStepError
from kvserve.engine.llm_engine import LLMEngine


@pytest.fixture(scope="module")
def llm_engine(tiny_model_dir):
    return LLMEngine(EngineArgs(model=str(tiny_model_dir), device="cpu", dtype="float32"))


def _greedy(n_tokens: int = 12, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n_tokens, temperature=0, ignore_eos=True, **kw)


async def _collect(engine: AsyncLLMEngine, prompt, params, rid: str):
    last = None
    async for out in engine.generate(prompt, params, rid):
        last = out
    return last


def _wait_free(engine: AsyncLLMEngine, timeout: float = 2.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        s = engine.stats()
        if (s["num_running"] == 0 and s["num_waiting"] == 0 and s["kv_blocks_free"] == s["kv_blocks_total"]) \
                or time.monotonic() > deadline:
            return s
        time.sleep(0.01)


def test_generate_matches_sync_engine(llm_engine):
    prompts = ["Hello world", "The quick brown fox", "日本語のテキスト"]
    expected = []
    for i, p in enumerate(prompts):
        llm_engine.add_request(f"sync-{i}", p, _greedy())
        final = None
        while llm_engine.has_unfinished_requests():
            for out in llm_engine.step():
                final = out
        expected.append(final.outputs[0].token_ids)

    async def main():
        engine = AsyncLLMEngine(llm_engine)
        engine.start()
        try:
            return await asyncio.gather(*(_collect(engine, p, _greedy(), f"a-{i}") for i, p in enumerate(prompts)))
        finally:
            await engine.shutdown()

    results = asyncio.run(main())
    assert [r.outputs[0].token_ids for r in results] == expected
    assert all(r.finished for r in results)


def test_cancel_aborts_and_frees_blocks(llm_engine):
    async def main():
        engine = AsyncLLMEngine(llm_engine)
        engine.start()
        try:
            got = asyncio.Event()

            async def consume():
                async for _ in engine.generate("Hello", _greedy(480, n=4), "long"):
                    got.set()

            task = asyncio.create_task(consume())
            await got.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return await asyncio.to_thread(_wait_free, engine)
        finally:
            await engine.shutdown()

    stats = asyncio.run(main())
    assert stats["num_running"] == 0 and stats["kv_blocks_free"] == stats["kv_blocks_total"]
    assert not llm_engine.has_unfinished_requests()


def test_step_error_reaches_requests_and_engine_keeps_serving(llm_engine, monkeypatch):
    real_step = llm_engine.step
    calls = {"n": 0}

    def flaky_step():
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return real_step()

    monkeypatch.setattr(llm_engine, "step", flaky_step)

    async def main():
        engine = AsyncLLMEngine(llm_engine)
        engine.start()
        try:
            with pytest.raises(EngineStepError, match="boom"):
                await asyncio.wait_for(_collect(engine, "Hello", _greedy(50), "x"), 10)
            return await asyncio.wait_for(_collect(engine, "Hello", _greedy(5), "y"), 10)
        finally:
            await engine.shutdown()

    out = asyncio.run(main())
    assert out.finished and len(out.outputs[0].token_ids) == 5


def test_bad_prompt_raises_value_error(llm_engine):
    async def main():
        engine = AsyncLLMEngine(llm_engine)
        engine.start()
        try:
            with pytest.raises(ValueError, match="empty"):
                await engine.add_request("e", [], _greedy())
            with pytest.raises(ValueError, match="max_model_len"):
                await engine.add_request("l", [5] * 600, _greedy())
            # long enough to be still running at the second add (2 tokens could finish first
            # on a fast CPU: the id is free again once its request is done)
            s1 = await engine.add_request("dup", "Hi", _greedy(200))
            with pytest.raises(ValueError, match="already in use"):
                await engine.add_request("dup", "Hi", _greedy(2))
            return [o async for o in s1][-1]
        finally:
            await engine.shutdown()

    assert asyncio.run(main()).finished


def test_idle_thread_does_not_spin(llm_engine):
    async def main():
        engine = AsyncLLMEngine(llm_engine)
        engine.start()
        try:
            await _collect(engine, "Hello", _greedy(3), "warm")
            await asyncio.sleep(0.1)
            cpu0, wall0 = time.process_time(), time.perf_counter()
            await asyncio.sleep(1.0)
            return time.process_time() - cpu0, time.perf_counter() - wall0
        finally:
            await engine.shutdown()

    cpu, wall = asyncio.run(main())
    assert cpu < 0.1 * wall, (cpu, wall)


def test_shutdown_fails_pending_and_later_requests(llm_engine):
    async def main():
        engine = AsyncLLMEngine(llm_engine)
        engine.start()
        stream = await engine.add_request("pending", "Hello", _greedy(480, n=8))
        await stream.__anext__()
        await engine.shutdown()
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            await engine.add_request("late", "Hello", _greedy())
        assert not engine.is_running

    asyncio.run(asyncio.wait_for(main(), 20))
    assert not llm_engine.has_unfinished_requests()


def test_add_racing_stop_never_hangs(llm_engine):
    async def main():
        for i in range(20):
            engine = AsyncLLMEngine(llm_engine)
            engine.start()
            engine.stop()  # returns at once; the add below races the thread's exit
            try:
                stream = await asyncio.wait_for(engine.add_request(f"race-{i}", "Hi", _greedy(2)), 5)
            except EngineDeadError:
                pass
            else:  # accepted before the stop was seen: it must still end, not hang
                with pytest.raises(EngineDeadError):
                    await asyncio.wait_for(_drain(stream), 5)
            await engine.shutdown()

    async def _drain(stream):
        async for _ in stream:
            pass

    asyncio.run(main())
    assert not llm_engine.has_unfinished_requests()


def test_from_engine_args_builds_on_the_engine_thread(tiny_model_dir):
    with pytest.raises(FileNotFoundError):
        AsyncLLMEngine.from_engine_args(EngineArgs(model=str(tiny_model_dir / "missing"), device="cpu"))
    engine = AsyncLLMEngine.from_engine_args(EngineArgs(model=str(tiny_model_dir), device="cpu", dtype="float32"))
    assert engine.max_model_len == 512 and engine.tokenizer is not None

    async def main():
        with pytest.raises(EngineDeadError, match="not been started"):
            await engine.add_request("early", "Hi", _greedy(2))
        engine.start()
        try:
            return await _collect(engine, "Hello", _greedy(4), "x")
        finally:
            await engine.shutdown()

    out = asyncio.run(main())
    assert out.finished and len(out.outputs[0].token_ids) == 4


def test_call_in_engine_thread(llm_engine):
    """Runs on the engine thread between steps (also while requests run); the function's error
    reaches the caller, the engine keeps serving; a stopped engine refuses calls."""
    import threading

    async def main():
        engine = AsyncLLMEngine(llm_engine)
        engine.start()
        try:
            task = asyncio.create_task(_collect(engine, "Hello world", _greedy(24), "call-0"))
            await asyncio.sleep(0)
            name, running = await engine.call_in_engine_thread(
                lambda e: (threading.current_thread().name, e.scheduler.num_running))
            assert name == "kvserve-engine" and running in (0, 1)
            with pytest.raises(ZeroDivisionError):
                await engine.call_in_engine_thread(lambda e: 1 / 0)
            final = await task
            assert len(final.outputs[0].token_ids) == 24
            assert engine.num_generated_tokens >= 24
        finally:
            await engine.shutdown()
        with pytest.raises(EngineDeadError):
            await engine.call_in_engine_thread(lambda e: None)

    asyncio.run(main())
