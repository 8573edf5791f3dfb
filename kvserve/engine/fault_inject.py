"""A test hook that makes engine steps fail or slow down on purpose (`KVSERVE_FAULT_INJECT`).

Tests and operators use it to check what clients see when a step raises (a 500 with the OpenAI
error body, or an error event then `[DONE]` on a stream), what `/health` says afterwards, and
how the server behaves on slow hardware. It is off unless the variable is set, and costs
nothing then.

`KVSERVE_FAULT_INJECT` holds comma-separated `key=value` settings:

- `step_error=STEPS`: these engine steps (1-based, counted from server start) raise
  `InjectedFault` after their forward pass ran. STEPS is one or more `/`-separated items, each
  `N` (step N), `N-M` (steps N to M) or `N-` (step N and every later one): `step_error=3`,
  `step_error=1-2/4-6`, `step_error=5-`. Three failed steps in a row stop the engine (see
  `AsyncLLMEngine`);
- `token_delay_ms=D`: every step also sleeps D ms per token it computes (a slow device: with
  the step time budget this makes long prompts prefill in several chunks).

The hook wraps the model runner's `execute_async` of one engine instance (rank 0); nothing else
in the engine knows about it.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

ENV_VAR = "KVSERVE_FAULT_INJECT"


class InjectedFault(RuntimeError):
    """The failure `KVSERVE_FAULT_INJECT` asked for."""


@dataclass
class FaultInjector:
    step_error: list[tuple[int, float]] | None = None  # (first, last) step ranges
    token_delay_ms: float = 0.0
    steps: int = 0  # steps launched so far

    @classmethod
    def parse(cls, spec: str) -> FaultInjector:
        """Parse `KVSERVE_FAULT_INJECT`'s value; ValueError naming the bad setting."""
        out = cls()
        for item in filter(None, (part.strip() for part in spec.split(","))):
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep:
                raise ValueError(f"{ENV_VAR}: expected key=value, got {item!r}")
            try:
                if key == "step_error":
                    out.step_error = [_parse_range(r) for r in value.split("/")]
                elif key == "token_delay_ms":
                    out.token_delay_ms = float(value)
                    if not (math.isfinite(out.token_delay_ms) and out.token_delay_ms >= 0):
                        raise ValueError
                else:
                    raise KeyError(key)
            except KeyError:
                raise ValueError(
                    f"{ENV_VAR}: unknown setting {key!r} (known: step_error, token_delay_ms)"
                ) from None
            except ValueError:
                raise ValueError(f"{ENV_VAR}: bad value for {key}: {value!r}") from None
        return out

    @classmethod
    def from_env(cls) -> FaultInjector | None:
        spec = os.environ.get(ENV_VAR, "").strip()
        return cls.parse(spec) if spec else None

    def install(self, engine: Any) -> None:
        """Wrap `engine.runner.execute_async` (this engine instance only)."""
        runner = engine.runner
        launch = runner.execute_async

        def execute_async(so: Any, *args: Any, **kwargs: Any) -> Any:
            self.steps += 1
            pending = launch(so, *args, **kwargs)
            if self.token_delay_ms:
                time.sleep(self.token_delay_ms * so.total_num_scheduled_tokens / 1000)
            if self.step_error and any(lo <= self.steps <= hi for lo, hi in self.step_error):
                pending.result()  # the step's work is done; it fails on its way back
                raise InjectedFault(f"fault injected by {ENV_VAR} in step {self.steps}")
            return pending

        runner.execute_async = execute_async
        logger.warning("%s is set: engine faults are injected (%s)", ENV_VAR, self)


def _parse_range(text: str) -> tuple[int, float]:
    lo, dash, hi = text.strip().partition("-")
    first = int(lo)
    last = (math.inf if not hi.strip() else int(hi)) if dash else first
    if first < 1 or last < first:
        raise ValueError(text)
    return first, last
