"""The engine's grammar cache: compile each distinct spec once, in a worker thread.

`submit(spec)` returns a `concurrent.futures.Future` of the compiled grammar, shared by every
request with an equal spec (`StructuredOutputsParams.key`); the engine keeps a request out of
the scheduler until its future is done, so a slow compilation delays only the requests that
need it. `get(spec)` waits for it (at most `timeout` seconds, default 10): a compilation error
or a timeout raises ValueError naming the field. A compilation that timed out keeps running
in its thread (xgrammar cannot be interrupted) and its result is cached when it ends.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
import time
from collections import OrderedDict
from typing import Any, Iterable

from kvserve.core.sampling_params import StructuredOutputsParams
from kvserve.structured.grammar import BitmaskFiller, GrammarCompiler, RequestGrammar

logger = logging.getLogger(__name__)

COMPILE_TIMEOUT_S = 10.0
_CACHE_SIZE = 256


class StructuredOutputManager:
    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Iterable[int],
                 compile_timeout: float = COMPILE_TIMEOUT_S, cache_size: int = _CACHE_SIZE) -> None:
        if tokenizer is None:
            raise ValueError("structured_outputs needs a tokenizer (this model has none)")
        self.compiler = GrammarCompiler(tokenizer, vocab_size, stop_token_ids)
        self.filler = BitmaskFiller()
        self.vocab_size = vocab_size
        self.compile_timeout = compile_timeout
        self._cache: OrderedDict[tuple, cf.Future] = OrderedDict()
        self._started: dict[tuple, float] = {}
        self._cache_size = cache_size
        self._lock = threading.Lock()
        # Two workers: one pathological schema cannot hold back every other compilation.
        self._pool = cf.ThreadPoolExecutor(max_workers=2, thread_name_prefix="kvserve-grammar")
        self.hits = 0
        self.misses = 0
        self.compile_seconds: dict[tuple, float] = {}

    def submit(self, spec: StructuredOutputsParams) -> cf.Future:
        key = spec.key
        with self._lock:
            fut = self._cache.get(key)
            if fut is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return fut
            self.misses += 1
            fut = self._pool.submit(self._compile, spec, key)
            self._cache[key] = fut
            self._started[key] = time.monotonic()
            while len(self._cache) > self._cache_size:
                old_key, old = next(iter(self._cache.items()))
                if not old.done():
                    break
                self._cache.popitem(last=False)
                self._started.pop(old_key, None)
            return fut

    def _compile(self, spec: StructuredOutputsParams, key: tuple) -> Any:
        t0 = time.perf_counter()
        try:
            return self.compiler.compile(spec)
        finally:
            dt = time.perf_counter() - t0
            self.compile_seconds[key] = dt
            if dt > 1.0:
                logger.warning("compiling %s took %.1f s", spec.field_name, dt)

    def status(self, spec: StructuredOutputsParams, fut: cf.Future) -> str | None:
        """'ready', 'error' (fut.exception() or a timeout: see `error`) or None (still compiling)."""
        if fut.done():
            return "error" if fut.exception() is not None else "ready"
        started = self._started.get(spec.key)
        if started is not None and time.monotonic() - started > self.compile_timeout:
            return "error"
        return None

    def error(self, spec: StructuredOutputsParams, fut: cf.Future) -> ValueError:
        if fut.done() and fut.exception() is not None:
            e = fut.exception()
            return e if isinstance(e, ValueError) else ValueError(f"invalid {spec.field_name}: {e}")
        return ValueError(
            f"{spec.field_name} could not be compiled within {self.compile_timeout:g} s"
        )

    def get(self, spec: StructuredOutputsParams, timeout: float | None = None) -> Any:
        """The compiled grammar, waiting for it; ValueError on an invalid spec or a timeout."""
        fut = self.submit(spec)
        started = self._started.get(spec.key, time.monotonic())
        limit = self.compile_timeout if timeout is None else timeout
        try:
            return fut.result(timeout=max(0.0, started + limit - time.monotonic()))
        except cf.TimeoutError:
            raise ValueError(f"{spec.field_name} could not be compiled within {limit:g} s") from None
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f"invalid {spec.field_name}: {e}") from None

    def new_matcher(self, spec: StructuredOutputsParams) -> RequestGrammar:
        """A matcher at the grammar's start (the spec must have compiled: `get`/`status`)."""
        with self._lock:
            fut = self._cache.get(spec.key)
        if fut is None:  # evicted meanwhile (the cache holds far more specs than run at once)
            fut = self.submit(spec)
        return RequestGrammar(fut.result(timeout=self.compile_timeout), self.compiler.stop_token_ids,
                              self.compiler.guard)

    def stats(self) -> dict[str, float]:
        return {"grammar_cache_hits": self.hits, "grammar_compilations": self.misses}

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
