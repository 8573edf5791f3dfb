"""asyncio front for `LLMEngine`: the step loop runs in a background thread.

`LLMEngine.step()` is blocking torch work and the engine is not thread-safe, so one dedicated
thread owns it. Everything else talks to that thread through a thread-safe command queue (add,
abort, stop) that it drains between steps; results travel back to the asyncio loop with one
`loop.call_soon_threadsafe` per step, into one `asyncio.Queue` per request. When no request is
unfinished the thread blocks on the command queue (no busy spin).

Invariants:
- every request added ends on its stream with a finished `RequestOutput`, an exception, or
  (when its consumer aborted it) nothing more: a waiting consumer never hangs. A failed step
  fails every request then in the engine; a dead engine thread or `shutdown()` fails every
  request still waiting and every later `add_request`.
- `abort(request_id)` frees the request's KV blocks before the thread next blocks or steps.
- `stats()` is a snapshot taken by the engine thread after each step and before it idles.
- `call_in_engine_thread(fn)` runs `fn(engine)` on the engine thread between steps: the one
  safe way to read scheduler or KV-cache state from asyncio code (the dashboard uses it).
- commands (add, abort) are applied in the order they were queued, at every step boundary:
  an abort queued right after its add means the request is never scheduled.
- a step that raises fails the requests in the engine and the loop goes on;
  `MAX_CONSECUTIVE_STEP_FAILURES` failed steps in a row stop the engine thread (logged at
  CRITICAL), after which `is_running` is False and every request gets `EngineDeadError`.
- overload (off by default): with `max_waiting_requests`, `add_request` raises
  `EngineOverloadedError` while that many requests wait for admission; with `max_queue_time`,
  a request not yet admitted after that many seconds ends with `EngineOverloadedError`.
- step time budget: on CPU the scheduler caps each step's tokens so a step takes about
  `step_time_budget` seconds (default 0.5 s; see `Scheduler`), timed here around every step.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from typing import Any, AsyncIterator, Callable, TypeVar

from kvserve.core.sampling_params import SamplingParams
from kvserve.engine.arg_utils import EngineArgs
from kvserve.engine.fault_inject import FaultInjector
from kvserve.engine.llm_engine import LLMEngine, PromptType
from kvserve.engine.outputs import RequestOutput

logger = logging.getLogger(__name__)

T = TypeVar("T")

MAX_CONSECUTIVE_STEP_FAILURES = 3
DEFAULT_CPU_STEP_TIME_BUDGET = 0.5  # seconds


class EngineDeadError(RuntimeError):
    """The engine thread has stopped (shut down or crashed); no request can be served."""


class EngineStepError(RuntimeError):
    """A step of the engine failed while this request was in it (a server-side error)."""


class EngineOverloadedError(RuntimeError):
    """The engine will not queue this request now (the server answers 429 + Retry-After).
    `reason`: 'queue_full' (max_waiting_requests) or 'queue_timeout' (max_queue_time)."""

    def __init__(self, message: str, reason: str, retry_after: int) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after = retry_after


class RequestStream:
    """Async iterator over one request's outputs (cumulative `RequestOutput`s, last one
    finished). Raises whatever error the engine thread delivered for it."""

    def __init__(self, request_id: str, n: int = 1) -> None:
        self.request_id = request_id
        self.n = n  # completions the request carries
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.finished = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item

    def put(self, item: RequestOutput | BaseException) -> None:
        self.queue.put_nowait(item)


class AsyncLLMEngine:
    """Serve an `LLMEngine` to asyncio code. Call `start()` from inside the running loop.

    Prefer `from_engine_args`, which builds the engine on the engine thread itself: CPU torch
    work runs markedly slower on a thread other than the one whose OpenMP team was created
    first (measured here: small ops up to 2x, a SmolLM2 step 30-50%), so the model should be
    loaded, warmed up and stepped on the same thread, and the asyncio thread should never run
    torch ops.
    """

    def __init__(self, engine: LLMEngine | None) -> None:
        """Wrap an engine built by the caller (None: `from_engine_args` builds it)."""
        self._commands: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._dead: BaseException | None = None
        self._lock = threading.Lock()  # orders "the thread is ending" against new adds
        # Owned by the engine thread: the streams of requests now in the engine.
        self._active: dict[str, RequestStream] = {}
        self._leftover: list[tuple[Any, ...]] = []  # commands after "stop"
        # Owned by the engine thread: when each request not yet known to have been admitted
        # was added (insertion order = age), for the queue-time limit.
        self._queued_since: dict[str, float] = {}
        self._pending_adds = 0  # adds queued but not yet applied (guarded by _lock)
        self._consecutive_failures = 0
        self.max_waiting_requests: int | None = None
        self.max_queue_time: float | None = None
        # Tokens generated so far (written by the engine thread only; read anywhere).
        self.num_generated_tokens = 0
        if engine is not None:
            self._bind(engine)

    def _bind(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = engine.model_name
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.model_config.vocab_size
        args = getattr(engine, "args", None)
        self.max_waiting_requests = getattr(args, "max_waiting_requests", None)
        self.max_queue_time = getattr(args, "max_queue_time", None)
        budget = getattr(args, "step_time_budget", None)
        if budget is None:
            on_cpu = getattr(getattr(engine, "platform", None), "device", None)
            budget = DEFAULT_CPU_STEP_TIME_BUDGET if getattr(on_cpu, "type", None) == "cpu" else 0
        engine.scheduler.set_step_time_budget(budget or None)
        faults = FaultInjector.from_env()
        if faults is not None:
            faults.install(engine)
        self._stats: dict[str, float] = self._snapshot()

    def _snapshot(self) -> dict[str, float]:
        stats = dict(self.engine.stats())
        stats["num_prefill_tokens"] = self.engine.scheduler.num_prefill_tokens
        return stats

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> AsyncLLMEngine:
        """Build the LLMEngine on a new engine thread (blocking until it is loaded; load
        errors are raised here). The thread then waits for `start()`."""
        self = cls(None)
        ready = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            try:
                self._bind(LLMEngine(args))
            except BaseException as e:  # reported to the caller below
                failure.append(e)
                return
            finally:
                ready.set()
            self._run()

        self._thread = threading.Thread(target=main, name="kvserve-engine", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]
        return self

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        """Bind to the running asyncio loop (and start the engine thread if not yet running)."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="kvserve-engine", daemon=True)
            self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._dead is None

    @property
    def dead_error(self) -> BaseException | None:
        return self._dead

    def stop(self) -> None:
        """Ask the engine thread to stop after its current step (thread-safe, returns at once);
        requests still in it get `EngineDeadError`."""
        self._commands.put(("stop",))

    async def shutdown(self, timeout: float = 30.0) -> None:
        """`stop()`, then wait for the engine thread to end."""
        thread = self._thread
        if thread is None:
            return
        self.stop()
        await asyncio.to_thread(thread.join, timeout)
        if thread.is_alive():
            logger.warning("engine thread did not stop within %.0f s", timeout)

    # -- requests ---------------------------------------------------------------------------
    async def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams) -> RequestStream:
        """Queue a request; returns once the engine thread has accepted it. Raises ValueError
        for input the engine refuses and EngineDeadError when the engine is not running."""
        stream = RequestStream(request_id, params.n)
        accepted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        with self._lock:  # the thread cannot end between this check and the put
            self._check_alive()
            self._check_queue_room()
            self._pending_adds += 1
            self._commands.put(("add", request_id, prompt, params, stream, accepted))
        try:
            await accepted
        except asyncio.CancelledError:
            self.abort(request_id)  # the client left before the engine saw the request
            raise
        return stream

    async def generate(
        self, prompt: PromptType, params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Yield this request's outputs until it finishes. Closing or cancelling the iterator
        aborts the request."""
        stream = await self.add_request(request_id, prompt, params)
        try:
            async for out in stream:
                yield out
        finally:
            if not stream.finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Stop decoding the request and free its blocks (no-op if it is already done)."""
        self._commands.put(("abort", request_id))

    def stats(self) -> dict[str, float]:
        return self._stats

    async def call_in_engine_thread(self, fn: Callable[[LLMEngine], T], timeout: float = 10.0) -> T:
        """Run `fn(engine)` on the engine thread between two steps and return its result
        (`fn` must be quick and must not change the engine). Raises EngineDeadError when the
        engine is not running and TimeoutError when no step boundary came within `timeout`."""
        done: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        with self._lock:
            self._check_alive()
            self._commands.put(("call", fn, done))
        return await asyncio.wait_for(done, timeout)

    def _check_queue_room(self) -> None:
        limit = self.max_waiting_requests
        if limit is None:
            return
        waiting = int(self._stats.get("num_waiting", 0)) + self._pending_adds
        if waiting >= limit:
            raise EngineOverloadedError(
                f"the server is overloaded: {waiting} requests are already waiting (limit {limit}); "
                "retry later", reason="queue_full", retry_after=1,
            )

    def _check_alive(self) -> None:
        if self._thread is None or self._loop is None:
            raise EngineDeadError("the engine has not been started")
        if self._dead is not None or not self._thread.is_alive():
            raise EngineDeadError(f"the engine is not running ({self._dead or 'stopped'})")

    # -- the engine thread ------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                if not self._drain_commands(block=not self.engine.has_unfinished_requests()):
                    break
                if not self.engine.has_unfinished_requests():
                    continue
                self._expire_queued()
                if not self.engine.has_unfinished_requests():
                    continue
                t0 = time.perf_counter()
                try:
                    outputs = self.engine.step()
                except Exception as e:  # a bug or a device error: fail the batch, keep serving
                    self._consecutive_failures += 1
                    logger.exception("engine step failed (%d in a row); failing %d request(s)",
                                     self._consecutive_failures, len(self._active))
                    self._fail_all(EngineStepError(f"engine step failed: {type(e).__name__}: {e}"))
                    if self._consecutive_failures >= MAX_CONSECUTIVE_STEP_FAILURES:
                        logger.critical("engine stopped: %d steps failed in a row (last: %s: %s); "
                                        "/health now answers 503 and every request fails",
                                        self._consecutive_failures, type(e).__name__, e)
                        self._dead = EngineDeadError(
                            f"the engine stopped after {self._consecutive_failures} failed steps in a row "
                            f"(last: {type(e).__name__}: {e})")
                        break
                    continue
                self._consecutive_failures = 0
                elapsed = time.perf_counter() - t0
                self.engine.scheduler.record_step(elapsed)
                if logger.isEnabledFor(logging.DEBUG):
                    logger.debug("step: %d tokens in %.3f s", self.engine.scheduler.last_step_tokens, elapsed)
                self._deliver(outputs)
                self._stats = self._snapshot()
            self._dead = self._dead or EngineDeadError("the engine was shut down")
        except BaseException as e:  # pragma: no cover - the thread itself broke
            logger.exception("engine thread died")
            self._dead = EngineDeadError(f"the engine thread died: {type(e).__name__}: {e}")
        finally:
            with self._lock:
                error = self._dead = self._dead or EngineDeadError("the engine stopped")
                self._fail_all(error)
                self._reject_queued(error)
            try:
                self._stats = self._snapshot()
            except Exception:  # pragma: no cover - a broken engine keeps its last snapshot
                pass

    def _reject_queued(self, error: BaseException) -> None:
        """Adds that will never be applied: fail them so their callers do not wait forever."""
        cmds = self._leftover
        while True:
            try:
                cmds.append(self._commands.get_nowait())
            except queue.Empty:
                break
        for cmd in cmds:
            if cmd[0] == "add":
                self._call(_resolve, cmd[5], error)
            elif cmd[0] == "call":
                self._call(_resolve, cmd[2], error)

    def _drain_commands(self, block: bool) -> bool:
        """Apply queued commands; wait for one first when `block`. False means stop."""
        if block:
            self._stats = self._snapshot()
            cmds = [self._commands.get()]
        else:
            cmds = []
        while True:
            try:
                cmds.append(self._commands.get_nowait())
            except queue.Empty:
                break
        for i, cmd in enumerate(cmds):
            kind = cmd[0]
            if kind == "stop":
                self._leftover = cmds[i + 1:]
                return False
            if kind == "add":
                self._add(*cmd[1:])
            elif kind == "abort":
                rid = cmd[1]
                self._queued_since.pop(rid, None)
                if self._active.pop(rid, None) is not None:
                    self.engine.abort_request(rid)
            elif kind == "call":
                self._run_call(cmd[1], cmd[2])
        if cmds and not self.engine.has_unfinished_requests():
            self._queued_since.clear()
        if cmds:  # the queue changed: /metrics and the waiting-requests limit see it at once
            self._stats = self._snapshot()
        return True

    def _add(self, rid: str, prompt: PromptType, params: SamplingParams, stream: RequestStream,
             accepted: asyncio.Future[None]) -> None:
        with self._lock:
            self._pending_adds -= 1
        try:
            if rid in self._active:
                raise ValueError(f"request id {rid!r} is already in use")
            self.engine.add_request(rid, prompt, params)
        except Exception as e:
            self._call(_resolve, accepted, e)
            return
        self._active[rid] = stream
        if self.max_queue_time is not None:
            self._queued_since[rid] = time.monotonic()
        self._call(_resolve, accepted, None)

    def _expire_queued(self) -> None:
        """Queue-time limit: end requests still waiting for admission after `max_queue_time`
        seconds with EngineOverloadedError (oldest first; stops at the first young one)."""
        limit = self.max_queue_time
        if limit is None or not self._queued_since:
            return
        now = time.monotonic()
        sched = self.engine.scheduler
        expired = []
        for rid, since in list(self._queued_since.items()):
            group = self.engine.groups.get(rid)
            if group is None or rid not in self._active:
                del self._queued_since[rid]
                continue
            if not all(sched.is_queued(cid) for cid in group.child_ids):
                del self._queued_since[rid]  # admitted: it is being served
                continue
            if now - since < limit:
                break
            del self._queued_since[rid]
            expired.append(rid)
        if not expired:
            return
        retry = max(1, math.ceil(limit))
        error = EngineOverloadedError(
            f"the server is overloaded: the request waited {limit:g} s without being scheduled; retry later",
            reason="queue_timeout", retry_after=retry,
        )
        self.engine.abort_request(expired)
        self._call(_put_all, [(self._active.pop(rid), error) for rid in expired])
        logger.warning("queue-time limit: %d request(s) waited over %g s and were refused", len(expired), limit)

    def _run_call(self, fn: Callable[[LLMEngine], Any], done: asyncio.Future[Any]) -> None:
        try:
            result = fn(self.engine)
        except Exception as e:  # the caller's error, not the engine's
            self._call(_resolve, done, e)
            return
        self._call(_set_result, done, result)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        batch = []
        for out in outputs:
            self.num_generated_tokens += sum(len(c.delta_token_ids) for c in out.outputs)
            stream = self._active.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del self._active[out.request_id]
            batch.append((stream, out))
        if batch:
            self._call(_put_all, batch)

    def _fail_all(self, error: BaseException) -> None:
        self._queued_since.clear()
        if not self._active:
            return
        streams = list(self._active.items())
        self._active.clear()
        try:
            self.engine.abort_request([rid for rid, _ in streams])
        except Exception:  # pragma: no cover - the engine is already broken
            logger.exception("aborting failed requests also failed")
        self._call(_put_all, [(s, error) for _, s in streams])

    def _call(self, fn: Any, *args: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop closed meanwhile
            pass


def _resolve(fut: asyncio.Future[None], error: BaseException | None) -> None:
    if fut.done():
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)


def _set_result(fut: asyncio.Future[Any], result: Any) -> None:
    if not fut.done():
        fut.set_result(result)


def _put_all(batch: list[tuple[RequestStream, RequestOutput | BaseException]]) -> None:
    for stream, item in batch:
        stream.put(item)
