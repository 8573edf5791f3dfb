"""The FastAPI app: routes, API-key check, CORS, error handlers, engine lifecycle.

`build_app(engine, ...)` takes an `AsyncLLMEngine` (not yet started); the app starts its engine
thread on startup and stops it on shutdown.
"""

from __future__ import annotations

import hmac
import logging
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from kvserve.engine.async_engine import AsyncLLMEngine
from kvserve.entrypoints.server.chat import create_chat_completion, render_messages
from kvserve.entrypoints.server.completions import create_completion
from kvserve.entrypoints.server.dashboard import Dashboard, add_dashboard_routes
from kvserve.entrypoints.server.errors import APIError, bad_request, install_error_handlers
from kvserve.entrypoints.server.metrics import ServerMetrics
from kvserve.entrypoints.server.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from kvserve.entrypoints.server.serving import (
    ClientGone,
    ServerState,
    check_token_ids,
    generation_defaults,
    parse_request,
    stop_client_watch,
)

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 8 << 20


class _APIKeyMiddleware:
    """401 for any /v1 route without `Authorization: Bearer <key>` (constant-time compare; the
    key is never logged)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.key = api_key.encode("utf-8")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or not _is_v1(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        given = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    given = token.strip()
                break
        if not hmac.compare_digest(given, self.key):
            err = APIError(401, "Invalid or missing API key: send it as 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")
            await err.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _is_v1(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def build_app(
    engine: AsyncLLMEngine,
    served_model_name: str | list[str] | None = None,
    api_key: str | None = None,
    allow_request_chat_template: bool = False,
    cors_origins: list[str] | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    tool_call_parser: str | None = None,
) -> FastAPI:
    names = [served_model_name] if isinstance(served_model_name, str) else list(served_model_name or [])
    if not names:
        names = [engine.model_name]
    metrics = ServerMetrics(engine, names[0])
    state = ServerState(
        engine=engine, served_model_names=names, metrics=metrics,
        allow_request_chat_template=allow_request_chat_template, max_body_bytes=max_body_bytes,
        generation_defaults=generation_defaults(engine.engine), model_root=str(engine.model_name),
        tool_call_parser=tool_call_parser,
    )
    if tool_call_parser is not None:
        from kvserve.structured.tool_parsers import get_tool_parser

        get_tool_parser(tool_call_parser)  # an unknown name fails at start-up

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        logger.info("serving %s (max_model_len %d)", ", ".join(names), engine.max_model_len)
        try:
            yield
        finally:
            await engine.shutdown()

    app = FastAPI(title="kvserve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.kvserve = state
    install_error_handlers(app)

    @app.exception_handler(ClientGone)
    async def _client_gone(_: Request, __: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it
    if api_key:
        app.add_middleware(_APIKeyMiddleware, api_key=api_key)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_credentials=False,
                           allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["*"])
    _add_routes(app, state)
    add_dashboard_routes(app, Dashboard(engine, names[0]))
    return app


def _add_routes(app: FastAPI, state: ServerState) -> None:
    engine = state.engine

    @app.get("/health")
    async def health() -> Response:
        if not engine.is_running:
            raise APIError(503, f"engine is not running: {engine.dead_error or 'not started'}")
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        cards = [ModelCard(id=name, root=state.model_root, max_model_len=engine.max_model_len)
                 for name in state.served_model_names]
        return JSONResponse(ModelList(data=cards).model_dump())

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        try:
            return await create_completion(request, state)
        finally:
            stop_client_watch(request)  # a streamed response watches the connection itself

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        try:
            return await create_chat_completion(request, state)
        finally:
            stop_client_watch(request)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        req = await parse_request(request, state, TokenizeRequest)
        state.check_model(req.model)
        tok = engine.tokenizer
        if tok is None:
            raise bad_request("this model has no tokenizer")
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("send exactly one of 'prompt' or 'messages'", param="prompt")
        if req.messages is not None:
            text, _ = await render_messages(
                state, req.messages, chat_template=req.chat_template,
                chat_template_kwargs=req.chat_template_kwargs, add_generation_prompt=req.add_generation_prompt,
                continue_final_message=req.continue_final_message, tools=req.tools,
            )
            add_special = bool(req.add_special_tokens)  # the template already holds them
        else:
            text = req.prompt or ""
            add_special = True if req.add_special_tokens is None else req.add_special_tokens
        ids = await state.encode(text, add_special_tokens=add_special)
        strs = tok.convert_ids_to_tokens(ids) if req.return_token_strs else None
        resp = TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len, tokens=ids, token_strs=strs)
        return JSONResponse(resp.model_dump())

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        req = await parse_request(request, state, DetokenizeRequest)
        state.check_model(req.model)
        if engine.tokenizer is None:
            raise bad_request("this model has no tokenizer")
        check_token_ids(state, req.tokens, "tokens")
        text = engine.tokenizer.decode(req.tokens, skip_special_tokens=False)
        return JSONResponse(DetokenizeResponse(prompt=text).model_dump())
