"""OpenAI-compatible HTTP server (`kvserve serve`): FastAPI app, protocol models, metrics."""

from __future__ import annotations

from kvserve.entrypoints.server.app import build_app

__all__ = ["build_app"]
