"""`kvserve serve`: the OpenAI-compatible HTTP server (FastAPI + uvicorn)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    from kvserve.entrypoints.cli import add_engine_args

    p = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port to bind (default: %(default)s)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $KVSERVE_API_KEY, else none)")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="model name(s) clients use; the first is reported in responses (default: --model)")
    p.add_argument("--allow-request-chat-template", action="store_true",
                   help="let requests carry their own chat_template (runs client-supplied Jinja in a sandbox)")
    p.add_argument("--cors-origin", action="append", default=None, metavar="ORIGIN",
                   help="allow browser requests from ORIGIN (repeatable; '*' for any). CORS is off by default")
    p.add_argument("--max-request-body-mb", type=float, default=8.0,
                   help="larger request bodies get 413 (default: %(default)s)")
    p.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="on SIGINT/SIGTERM, seconds in-flight requests get to finish; those still running then "
                        "end with an error (default: %(default)s)")
    p.add_argument("--tool-call-parser", default=None, choices=["hermes", "llama3_json", "mistral"],
                   help="parse tool calls from the output of tool_choice='auto' requests in this model family's "
                        "format (Hermes/Qwen <tool_call>, Llama 3 JSON, Mistral [TOOL_CALLS]); without it "
                        "tool_choice='auto' with tools is refused (400). 'required' and named tools always work")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="accepted for vLLM compatibility: --tool-call-parser alone enables tool_choice='auto'")
    p.add_argument("--max-waiting-requests", type=int, default=None, metavar="N",
                   help="answer 429 + Retry-After while N requests already wait for the engine (default: no limit)")
    p.add_argument("--max-queue-time", type=float, default=None, metavar="S",
                   help="answer 429 + Retry-After to a request not scheduled within S seconds (default: no limit)")
    p.add_argument("--step-time-budget", type=float, default=None, metavar="S",
                   help="seconds one engine step should take at most, so aborts and new requests wait about "
                        "one step (default: 0.5 on CPU, off on CUDA; 0 = off)")
    p.add_argument("--uvicorn-log-level", default="info", help="uvicorn's log level (default: %(default)s)")
    p.add_argument("--access-log", action="store_true", help="log every HTTP request")
    add_engine_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvserve.entrypoints.cli import check_engine_args, engine_kwargs

    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in [0, 65535] (got {args.port})")
    if args.max_request_body_mb <= 0:
        raise ValueError(f"--max-request-body-mb must be > 0 (got {args.max_request_body_mb})")
    if args.shutdown_timeout < 0:
        raise ValueError(f"--shutdown-timeout must be >= 0 (got {args.shutdown_timeout})")
    # Everything that can fail fast does, before the model loads (seconds to minutes).
    check_port(args.host, args.port)
    print(f"kvserve: loading {args.model} ...", file=sys.stderr, flush=True)
    check_engine_args(args)

    import uvicorn

    from kvserve.engine.arg_utils import EngineArgs
    from kvserve.engine.async_engine import AsyncLLMEngine
    from kvserve.entrypoints.server import build_app
    from kvserve.entrypoints.server.uvicorn_server import HARD_STOP_MARGIN_S, GracefulServer

    api_key = args.api_key or os.environ.get("KVSERVE_API_KEY") or None
    names = args.served_model_name or [args.model]
    # The engine is built on its own thread, which then runs every step (see AsyncLLMEngine).
    async_engine = AsyncLLMEngine.from_engine_args(
        EngineArgs.from_kwargs(
            args.model, served_model_name=names[0], max_waiting_requests=args.max_waiting_requests,
            max_queue_time=args.max_queue_time, step_time_budget=args.step_time_budget, **engine_kwargs(args),
        )
    )
    app = build_app(
        async_engine, served_model_name=names, api_key=api_key,
        allow_request_chat_template=args.allow_request_chat_template, cors_origins=args.cors_origin,
        max_body_bytes=int(args.max_request_body_mb * (1 << 20)), tool_call_parser=args.tool_call_parser,
    )
    print(
        f"kvserve: serving {names[0]!r} on http://{args.host}:{args.port} "
        f"(max_model_len {async_engine.max_model_len}, API key {'required' if api_key else 'off'})",
        file=sys.stderr, flush=True,
    )
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.uvicorn_log_level.lower(),
        access_log=args.access_log, timeout_graceful_shutdown=args.shutdown_timeout + HARD_STOP_MARGIN_S,
        # One HTTP request's handling never blocks the loop; the engine steps in its own thread.
        loop="asyncio", http="h11", lifespan="on",
    )
    server = _server_class(GracefulServer)(config, async_engine, args.shutdown_timeout)
    server.run()
    return _exit_status(getattr(server, "signals", []))


def _server_class(base: type) -> type:
    """`base` (GracefulServer) that notes the signals it handled instead of re-raising them when
    it has shut down (uvicorn's re-raise lands in asyncio's own SIGINT handler while the loop
    still runs, which prints tracebacks), and exits at once, quietly, on a second Ctrl-C.
    `_exit_status` gives the process the signal's status afterwards."""
    import contextlib
    import signal
    import threading

    class QuietExitServer(base):  # type: ignore[misc, valid-type]
        signals: list[int]

        def handle_exit(self, sig: int, frame) -> None:
            if self.should_exit and sig == signal.SIGINT:
                # The second Ctrl-C: exit now. Letting uvicorn cancel the open requests' tasks
                # instead prints one CancelledError traceback per task.
                print("\nkvserve: second Ctrl-C: exiting now", file=sys.stderr, flush=True)
                sys.stdout.flush()
                os._exit(130)
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            self.signals = self._captured_signals = []
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            handled = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGBREAK] if hasattr(signal, "SIGBREAK") else [])
            original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    return QuietExitServer


def _exit_status(signals: list[int]) -> int:
    """0 after a clean stop; after SIGINT 130 (as for any Ctrl-C of kvserve); after SIGTERM the
    process ends by that signal (status 143 in a shell), as it would have without a handler."""
    import signal

    if not signals:
        return 0
    sig = signals[0]
    if sig == signal.SIGINT:
        return 130
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)
    return 128 + sig  # pragma: no cover - not reached where the signal's default action ends the process


def check_port(host: str, port: int) -> None:
    """Bind host:port once and let it go: a port in use (or an address this machine does not
    have) is reported now, not after the model has loaded. Port 0 (any free port) always works."""
    import errno
    import socket

    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ValueError(f"--host {host!r} cannot be resolved: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # As uvicorn binds: SO_REUSEADDR, so a port in TIME_WAIT after a restart is not "in use".
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ValueError(f"--port {port}: address {host}:{port} is already in use; pick another --port") from None
            if e.errno == errno.EADDRNOTAVAIL:
                raise ValueError(f"--host {host!r} is not an address of this machine") from None
            if e.errno == errno.EACCES:
                raise ValueError(f"--port {port}: permission denied (ports below 1024 need privileges)") from None
            raise
