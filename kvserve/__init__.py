"""kvserve: an LLM inference engine with a paged KV cache and continuous batching."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "EngineArgs", "LLMEngine"]

if TYPE_CHECKING:
    from kvserve.core.sampling_params import SamplingParams
    from kvserve.engine.arg_utils import EngineArgs
    from kvserve.engine.llm_engine import LLMEngine
    from kvserve.engine.outputs import CompletionOutput, RequestOutput
    from kvserve.entrypoints.llm import LLM


def __getattr__(name: str):
    # Lazy: `import kvserve` stays cheap (the CLI's --help must not import torch).
    if name == "SamplingParams":
        from kvserve.core.sampling_params import SamplingParams as v
    elif name == "LLM":
        from kvserve.entrypoints.llm import LLM as v
    elif name in ("RequestOutput", "CompletionOutput"):
        from kvserve.engine import outputs

        v = getattr(outputs, name)
    elif name == "EngineArgs":
        from kvserve.engine.arg_utils import EngineArgs as v
    elif name == "LLMEngine":
        from kvserve.engine.llm_engine import LLMEngine as v
    else:
        raise AttributeError(f"module 'kvserve' has no attribute {name!r}")
    return v
