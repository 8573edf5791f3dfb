"""uvicorn with a shutdown that ends every in-flight request with a result or an error."""

from __future__ import annotations

import logging
import threading
from types import FrameType

import uvicorn

from kvserve.engine.async_engine import AsyncLLMEngine

logger = logging.getLogger(__name__)

HARD_STOP_MARGIN_S = 5.0


class GracefulServer(uvicorn.Server):
    """On the first SIGINT/SIGTERM uvicorn stops accepting connections and waits for open ones.
    We also give in-flight requests `grace` seconds, then stop the engine: whatever still runs
    ends with an error (an SSE error event + [DONE], or a 503) instead of a cut connection.
    uvicorn's own timeout (set `HARD_STOP_MARGIN_S` later) cancels anything left after that;
    a second SIGINT exits at once."""

    def __init__(self, config: uvicorn.Config, engine: AsyncLLMEngine, grace: float) -> None:
        super().__init__(config)
        self._engine = engine
        self._grace = grace
        self._draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        if self._draining:
            return
        self._draining = True
        logger.info("shutting down: in-flight requests get %.1f s to finish", self._grace)
        timer = threading.Timer(self._grace, self._engine.stop)
        timer.daemon = True
        timer.start()
