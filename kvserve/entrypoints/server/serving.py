"""What the completion and chat handlers share: reading the body, checking the model name,
building SamplingParams, checking the context window, adding requests, following several
engine streams at once, and noticing a client that went away.

A generation request's client is watched from the moment its body has been read (`ClientWatch`):
if it leaves while the request is prepared, queued or run, its engine requests are aborted at
once (an abort queued behind its add means the engine never schedules it), and it is never
added at all if it left before that. CPU work of the frontend that can take long (chat
template rendering, tokenization) runs on worker threads, never on the event loop."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send
from pydantic import BaseModel, ValidationError

from kvserve.core.sampling_params import SamplingParams
from kvserve.engine.async_engine import AsyncLLMEngine, EngineDeadError, EngineOverloadedError, RequestStream
from kvserve.engine.outputs import RequestOutput
from kvserve.entrypoints.server.errors import (
    APIError,
    bad_request,
    clip,
    from_validation_error,
    from_value_error,
    overloaded,
)
from kvserve.entrypoints.server.metrics import ServerMetrics
from kvserve.entrypoints.server.protocol import CompletionRequest, SamplingRequest
from kvserve.entrypoints.server.workers import WorkerThreads, render_chat_limited  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

MAX_N = 128  # most completions one request may ask for (n x prompts)
MAX_TEMPERATURE = 2.0  # OpenAI's range is [0, 2]
MAX_STOP = 16  # stop strings per request (OpenAI: 4)
MAX_STOP_CHARS = 512  # characters per stop string
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 1024  # logit_bias entries per request
LOGIT_BIAS_RANGE = 100.0  # OpenAI: each bias in [-100, 100]
CHAT_TEMPLATE_TIMEOUT_S = 2.0  # wall clock for rendering one conversation
CHAT_TEMPLATE_MIN_CHARS = 1 << 20  # rendered text may be max(1 MiB, 32 x max_model_len) characters
CHAT_TEMPLATE_CHARS_PER_TOKEN = 32
_SEED_MIN, _SEED_MAX = -(1 << 63), (1 << 63) - 1
_SAMPLING_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


@dataclass
class ServerState:
    engine: AsyncLLMEngine
    served_model_names: list[str]
    metrics: ServerMetrics
    allow_request_chat_template: bool = False
    max_body_bytes: int = 8 << 20
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    model_root: str | None = None
    tool_call_parser: str | None = None  # --tool-call-parser (tool_choice="auto")
    # Chat replies in gpt-oss's channels (engine/harmony.py) are split into reasoning and
    # content; None: decided from the model on first use.
    harmony: bool | None = None
    template_timeout: float = CHAT_TEMPLATE_TIMEOUT_S
    # Chat templates render on their own threads (a runaway one cannot hold up tokenization);
    # tokenization on one thread (the tokenizer is not meant to be called concurrently).
    template_workers: WorkerThreads = field(default_factory=lambda: WorkerThreads("kvserve-template", 2))
    tokenizer_worker: WorkerThreads = field(default_factory=lambda: WorkerThreads("kvserve-tokenize", 1))

    @property
    def template_max_chars(self) -> int:
        return max(CHAT_TEMPLATE_MIN_CHARS, CHAT_TEMPLATE_CHARS_PER_TOKEN * self.engine.max_model_len)

    async def encode(self, text: str, **kwargs: Any) -> list[int]:
        """Tokenize off the event loop (a long prompt takes seconds)."""
        return await self.tokenizer_worker.run(self.engine.tokenizer.encode, text, **kwargs)

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    def is_harmony(self) -> bool:
        """Whether the model replies in harmony channels (gpt-oss)."""
        from kvserve.engine.harmony import is_harmony_model

        if self.harmony is None:
            config = getattr(getattr(self.engine, "engine", None), "model_config", None)
            self.harmony = is_harmony_model(self.engine.tokenizer, getattr(config, "architecture", None))
        return self.harmony

    def harmony_parser(self, tools: bool = False) -> Any:
        """A fresh `HarmonyParser` for one chat reply of a gpt-oss model, else None; with
        `tools`, messages to `functions.NAME` are read as tool calls."""
        from kvserve.engine.harmony import HarmonyParser

        return HarmonyParser(self.engine.tokenizer, tools=tools) if self.is_harmony() else None

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.served_model_names:
            raise APIError(404, f"The model `{clip(name)}` does not exist.", param="model", code="model_not_found")


class ClientGone(Exception):
    """The client closed its connection before its request was added (answered 499, unread)."""


class ClientWatch:
    """Watches one generation request's connection from the moment its body was read. When the
    client leaves, every engine request registered here is aborted at once (and `gone` is set,
    so `add_requests` adds nothing more). Stopped before a streamed response starts, which
    watches the connection itself."""

    def __init__(self, request: Request, state: ServerState) -> None:
        self.state = state
        self.gone = False
        self.request_ids: list[str] = []
        self.task = asyncio.create_task(self._watch(request))

    async def _watch(self, request: Request) -> None:
        await wait_for_disconnect(request)
        self.gone = True
        for rid in self.request_ids:
            self.state.engine.abort(rid)

    def stop(self) -> None:
        self.task.cancel()


def client_watch(request: Request) -> ClientWatch | None:
    return getattr(request.state, "kvserve_watch", None)


def stop_client_watch(request: Request) -> None:
    watch = client_watch(request)
    if watch is not None:
        watch.stop()


# -- request body -------------------------------------------------------------------------------
def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def read_body(request: Request, state: ServerState) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > state.max_body_bytes:
        raise body_too_large(state.max_body_bytes)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > state.max_body_bytes:
            raise body_too_large(state.max_body_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def body_too_large(limit: int) -> APIError:
    return APIError(413, f"request body is larger than {limit} bytes", code="request_too_large")


def check_content_type(request: Request) -> None:
    """JSON routes take only `application/json` bodies: a browser page can POST `text/plain`
    (or a form) to any local server without asking first (no CORS preflight), but not JSON."""
    ctype = request.headers.get("content-type")
    media = (ctype or "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        got = f"got {clip(ctype, 100)!r}" if ctype is not None else "none was sent"
        raise APIError(415, f"Content-Type must be application/json ({got})", code="unsupported_media_type")


async def parse_request(request: Request, state: ServerState, model: type[M]) -> M:
    """Check the Content-Type, read and validate the body. For a generation request
    (`SamplingRequest`) the client's connection is watched from here on (`ClientWatch`)."""
    check_content_type(request)
    body = await read_body(request, state)
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise bad_request("request body must be a JSON object")
    if issubclass(model, CompletionRequest):
        check_prompt_count(data.get("prompt"), data.get("n"))  # before validating 10^6 prompts
    try:
        req = model.model_validate(data)
    except ValidationError as e:
        raise from_validation_error(e) from None
    if issubclass(model, SamplingRequest):
        request.state.kvserve_watch = ClientWatch(request, state)
    return req


def check_prompt_count(prompt: Any, n: Any) -> None:
    """n x number of prompts <= MAX_N, checked on the raw JSON (before any validation or
    tokenization, which for a list of a million prompts would take seconds)."""
    if not isinstance(prompt, list) or not prompt or isinstance(prompt[0], int):
        count = 1
    else:
        count = len(prompt)
    n = n if isinstance(n, int) and n > 0 else 1
    if count * n > MAX_N:
        raise bad_request(f"n x number of prompts must be <= {MAX_N} (got {count} x {n})", param="n")


# -- sampling params ----------------------------------------------------------------------------
def build_sampling_params(
    req: SamplingRequest,
    state: ServerState,
    *,
    max_tokens: int | None,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
) -> SamplingParams:
    vocab = state.engine.vocab_size
    check_sampling_limits(req)
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("best_of is not supported (only best_of == n)", param="best_of")
    if isinstance(req.n, int) and req.n > MAX_N:
        raise bad_request(f"n must be <= {MAX_N} (got {req.n})", param="n")
    if req.seed is not None and not _SEED_MIN <= req.seed <= _SEED_MAX:
        raise bad_request(f"seed must be a 64-bit signed integer (got {req.seed})", param="seed")
    if req.logit_bias:
        for key in req.logit_bias:
            if not key.lstrip("-").isdigit() or not 0 <= int(key) < vocab:
                raise bad_request(f"logit_bias keys must be token ids in [0, {vocab}) (got {clip(key)!r})",
                                  param="logit_bias")
    defaults = state.generation_defaults
    top_k = req.top_k if req.top_k is not None else defaults.get("top_k", -1)
    if isinstance(top_k, int) and top_k > vocab:
        top_k = -1  # keeping more tokens than exist is the same as keeping all of them
    kwargs: dict[str, Any] = dict(
        n=req.n,
        temperature=_pick(req.temperature, defaults, "temperature", 1.0),
        top_p=_pick(req.top_p, defaults, "top_p", 1.0),
        top_k=top_k,
        min_p=_pick(req.min_p, defaults, "min_p", 0.0),
        repetition_penalty=_pick(req.repetition_penalty, defaults, "repetition_penalty", 1.0),
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        logit_bias={int(k): v for k, v in req.logit_bias.items()} if req.logit_bias else None,
        seed=req.seed,
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        stop=req.stop,
        stop_token_ids=req.stop_token_ids,
        ignore_eos=req.ignore_eos,
        skip_special_tokens=req.skip_special_tokens,
        include_stop_str_in_output=req.include_stop_str_in_output,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
    )
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:
        raise from_value_error(e) from None


def check_sampling_limits(req: SamplingRequest) -> None:
    """OpenAI's ranges and our size caps, checked before anything is built from the request."""

    def in_range(name: str, value: float | None, lo: float, hi: float) -> None:
        if value is not None and not (math.isfinite(value) and lo <= value <= hi):
            raise bad_request(f"{name} must be in [{lo:g}, {hi:g}] (got {value})", param=name)

    in_range("temperature", req.temperature, 0.0, MAX_TEMPERATURE)
    if req.top_p is not None and not (math.isfinite(req.top_p) and 0 < req.top_p <= 1):
        raise bad_request(f"top_p must be in (0, 1] (got {req.top_p})", param="top_p")
    in_range("presence_penalty", req.presence_penalty, -2.0, 2.0)
    in_range("frequency_penalty", req.frequency_penalty, -2.0, 2.0)
    for name in ("min_p", "repetition_penalty"):
        value = getattr(req, name)
        if value is not None and not math.isfinite(value):
            raise bad_request(f"{name} must be a finite number (got {value})", param=name)
    stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if len(stop) > MAX_STOP:
        raise bad_request(f"stop may hold at most {MAX_STOP} strings (got {len(stop)})", param="stop")
    for s in stop:
        if len(s) > MAX_STOP_CHARS:
            raise bad_request(f"each stop string may be at most {MAX_STOP_CHARS} characters (got {len(s)})",
                              param="stop")
    if req.stop_token_ids and len(req.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise bad_request(f"stop_token_ids may hold at most {MAX_STOP_TOKEN_IDS} ids (got {len(req.stop_token_ids)})",
                          param="stop_token_ids")
    if req.logit_bias:
        if len(req.logit_bias) > MAX_LOGIT_BIAS:
            raise bad_request(f"logit_bias may hold at most {MAX_LOGIT_BIAS} entries (got {len(req.logit_bias)})",
                              param="logit_bias")
        for key, bias in req.logit_bias.items():
            if not (math.isfinite(bias) and -LOGIT_BIAS_RANGE <= bias <= LOGIT_BIAS_RANGE):
                raise bad_request(f"logit_bias values must be in [-{LOGIT_BIAS_RANGE:g}, {LOGIT_BIAS_RANGE:g}] "
                                  f"(got {bias} for {clip(key)!r})", param="logit_bias")


def _pick(value: Any, defaults: dict[str, Any], key: str, fallback: Any) -> Any:
    if value is not None:
        return value
    d = defaults.get(key)
    return fallback if d is None else d


def generation_defaults(engine: Any) -> dict[str, Any]:
    """Sampling defaults from the checkpoint's generation_config.json (as LLM does)."""
    gen = getattr(getattr(engine, "loaded", None), "generation_defaults", None) or {}
    out = {k: gen[k] for k in _SAMPLING_DEFAULT_KEYS if gen.get(k) is not None}
    if gen.get("do_sample") is False:
        out["temperature"] = 0.0
    return out


def check_context(state: ServerState, num_prompt_tokens: int, max_tokens: int | None, min_tokens: int,
                  what: str = "prompt") -> None:
    """OpenAI/vLLM behaviour: a prompt (plus the requested completion) that does not fit the
    context window is a 400, not a silently shortened completion."""
    limit = state.engine.max_model_len
    if num_prompt_tokens >= limit:
        raise bad_request(
            f"This model's maximum context length is {limit} tokens. However, your {what} is "
            f"{num_prompt_tokens} tokens, which leaves no room for a completion. "
            f"Please reduce the length of the {what}.",
            param="messages" if what == "messages" else "prompt", code="context_length_exceeded",
        )
    if max_tokens is not None and num_prompt_tokens + max_tokens > limit:
        raise bad_request(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the {what}, "
            f"{max_tokens} in the completion). Please reduce the length of the {what} or completion.",
            param="max_tokens", code="context_length_exceeded",
        )
    if min_tokens and num_prompt_tokens + min_tokens > limit:
        raise bad_request(
            f"min_tokens={min_tokens} cannot be reached: only {limit - num_prompt_tokens} tokens fit "
            f"after the {what}", param="min_tokens",
        )


def check_token_ids(state: ServerState, ids: list[int], param: str) -> None:
    vocab = state.engine.vocab_size
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise bad_request(f"{param} must hold token ids in [0, {vocab}) (got {bad})", param=param)


def check_stream_options(req: SamplingRequest) -> bool:
    """Whether to send a final usage chunk."""
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed with stream=true", param="stream_options")
    return bool(req.stream and req.stream_options and req.stream_options.include_usage)


# -- engine requests ----------------------------------------------------------------------------
async def add_requests(
    state: ServerState, items: list[tuple[str, dict[str, Any], SamplingParams]], request: Request | None = None,
) -> list[RequestStream]:
    """Add every request or none: a refusal aborts those already added and becomes a 400 (or a
    429 when the engine is overloaded). With `request`, nothing is added once its client has
    left (`ClientGone`), and each added request is aborted as soon as it leaves."""
    streams: list[RequestStream] = []
    watch = client_watch(request) if request is not None else None
    try:
        for rid, prompt, params in items:
            if watch is not None:
                if watch.gone:
                    raise ClientGone()
                watch.request_ids.append(rid)
            streams.append(await state.engine.add_request(rid, prompt, params))
        if watch is not None and watch.gone:
            raise ClientGone()
    except ValueError as e:
        abort_all(state, streams)
        raise from_value_error(e, default_param="prompt") from None
    except EngineOverloadedError as e:
        abort_all(state, streams)
        raise overloaded(state.metrics, e) from None
    except EngineDeadError as e:
        abort_all(state, streams)
        raise APIError(503, str(e)) from None
    except BaseException:
        abort_all(state, streams)
        raise
    return streams


def abort_all(state: ServerState, streams: list[RequestStream]) -> None:
    """Abort every stream that has not finished (the client left, or the request failed)."""
    for s in streams:
        if not s.finished:
            s.finished = True
            state.engine.abort(s.request_id)
            state.metrics.count_abort(s.n)


async def merge_streams(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several streams as they come, tagged with the stream's index."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                queue.put_nowait((i, out))
        except Exception as e:
            queue.put_nowait((i, e))
        queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


async def collect_final(
    request: Request, state: ServerState, streams: list[RequestStream], tracker_list: list[Any]
) -> list[RequestOutput] | None:
    """Run the streams to completion; None if the client disconnected first (then every
    stream is aborted, freeing its blocks)."""
    finals: list[RequestOutput | None] = [None] * len(streams)

    async def consume() -> None:
        async with aclosing(merge_streams(streams)) as outputs:
            async for i, out in outputs:
                tracker_list[i].observe(out)
                finals[i] = out

    work = asyncio.create_task(consume())
    client = client_watch(request)
    watch = client.task if client is not None else asyncio.create_task(wait_for_disconnect(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not work.done():
            work.cancel()
            abort_all(state, streams)
        watch.cancel()
    if not work.done() or work.cancelled():
        return None
    work.result()  # re-raise an engine error
    return [f for f in finals if f is not None]


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body was already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# -- server-sent events ------------------------------------------------------------------------------
def stream_error(state: ServerState, e: BaseException) -> str:
    """The error event for a failure after a stream started (its status is already 200)."""
    if isinstance(e, EngineDeadError):
        return APIError(503, str(e)).sse()
    if isinstance(e, EngineOverloadedError):
        return overloaded(state.metrics, e).sse()
    return APIError(500, f"{type(e).__name__}: {e}").sse()



SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SSE_DONE = "data: [DONE]\n\n"


def to_sse(chunk: BaseModel) -> str:
    """One `data:` event. A chunk's `usage` is left out unless set, and a chat delta shows only
    the fields it carries (as OpenAI sends them)."""
    data = chunk.model_dump()
    if data.get("usage") is None:
        data.pop("usage", None)
    for choice in data.get("choices", ()):
        delta = choice.get("delta")
        if isinstance(delta, dict):
            choice["delta"] = {k: v for k, v in delta.items() if v is not None}
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class SSEResponse(StreamingResponse):
    """A text/event-stream response that always closes its event generator, so the
    generator's cleanup (aborting its engine requests) runs as soon as the client leaves,
    wherever the generator was suspended."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str]) -> None:
        super().__init__(content, media_type=self.media_type, headers=SSE_HEADERS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
