"""Worker threads for the frontend's blocking work (chat template rendering, tokenization),
so the event loop never runs it; and the chat template call with its time and size limits."""

from __future__ import annotations

import asyncio
import ctypes
import queue
import threading
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from kvserve.engine.chat_template import ChatTemplateError, render_chat

if TYPE_CHECKING:
    from kvserve.entrypoints.server.serving import ServerState

T = TypeVar("T")


class WorkerInterrupted(BaseException):
    """Raised inside a worker thread whose call ran past its time limit (see WorkerThreads)."""


class WorkerThreads:
    """A few daemon threads that run blocking calls for the event loop.

    `run(fn, ..., timeout=s)` raises TimeoutError after `s` seconds and stops the call: the
    thread running it gets `WorkerInterrupted` raised asynchronously at its next Python
    bytecode (the way a runaway chat template, which is Python code, is ended). Daemon threads
    (not a ThreadPoolExecutor, whose threads are joined at exit), so a call stuck in C code
    cannot keep the process from exiting."""

    def __init__(self, name: str, num_threads: int) -> None:
        self.name = name
        self.num_threads = num_threads
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()  # guards _Job.thread (who runs which job)

    async def run(self, fn: Callable[..., T], *args: Any, timeout: float | None = None, **kwargs: Any) -> T:
        self._start()
        job = _Job(asyncio.get_running_loop(), fn, args, kwargs)
        self._jobs.put(job)
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), timeout)
        except (TimeoutError, asyncio.CancelledError):
            self._interrupt(job)
            raise

    def _interrupt(self, job: _Job) -> None:
        with self._lock:
            job.abandoned = True
            if job.thread is not None and not job.future.done():
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(job.thread),
                                                           ctypes.py_object(WorkerInterrupted))

    def _start(self) -> None:
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            while len(self._threads) < self.num_threads:
                t = threading.Thread(target=self._work, name=f"{self.name}-{len(self._threads)}", daemon=True)
                t.start()
                self._threads.append(t)

    def _work(self) -> None:
        me = threading.get_ident()
        job: _Job | None = None
        while True:
            try:
                job = self._jobs.get()
                with self._lock:
                    if job.abandoned:
                        continue  # its caller gave up while it waited
                    job.thread = me
                try:
                    result, error = job.fn(*job.args, **job.kwargs), None
                except BaseException as e:  # delivered to the caller
                    result, error = None, e
                with self._lock:
                    job.thread = None  # no interrupt can be aimed at this thread after this
                job.settle(result, error)
            except WorkerInterrupted:  # arrived between the call's end and the line above
                if job is not None:
                    with self._lock:
                        job.thread = None
                    job.settle(None, TimeoutError())


class _Job:
    __slots__ = ("loop", "fn", "args", "kwargs", "future", "thread", "abandoned")

    def __init__(self, loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
        self.loop, self.fn, self.args, self.kwargs = loop, fn, args, kwargs
        self.future: asyncio.Future[Any] = loop.create_future()
        self.thread: int | None = None
        self.abandoned = False

    def settle(self, result: Any, error: BaseException | None) -> None:
        try:
            self.loop.call_soon_threadsafe(_settle, self.future, result, error)
        except RuntimeError:  # the loop is closed
            pass


def _settle(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


async def render_chat_limited(state: ServerState, template: str | None, messages: list[dict[str, Any]],
                              **kwargs: Any) -> str:
    """`render_chat` on a template worker thread, within `state.template_timeout` seconds and
    `state.template_max_chars` characters of output; ChatTemplateError (a 400) past either."""
    limit = state.template_timeout
    try:
        return await state.template_workers.run(
            render_chat, template, messages, max_chars=state.template_max_chars, time_limit=limit,
            timeout=limit + 0.5, **kwargs,
        )
    except (TimeoutError, WorkerInterrupted):
        raise ChatTemplateError(f"chat template rendering took longer than the limit of {limit:g} s") from None
