"""Model classes by HF `architectures` name (GGUF files are mapped onto the same names)."""

from __future__ import annotations

import torch.nn as nn

from typing import TYPE_CHECKING
from kvserve.core.config import ModelConfig
from kvserve.models.gemma3 import Gemma3ForCausalLM
from kvserve.models.gpt2 import GPT2LMHeadModel
from kvserve.models.gpt_oss import GptOssForCausalLM
from kvserve.models.llama import LlamaForCausalLM
from kvserve.models.moe import MoEForCausalLM
from kvserve.models.phi3 import Phi3ForCausalLM

if TYPE_CHECKING:
    from kvserve.platform.base import LayerBuilder

_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "GPT2LMHeadModel": GPT2LMHeadModel,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "Qwen3MoeForCausalLM": MoEForCausalLM,
    "MixtralForCausalLM": MoEForCausalLM,
    "GptOssForCausalLM": GptOssForCausalLM,
}


def register_model(architecture: str, cls: type[nn.Module]) -> None:
    _REGISTRY[architecture] = cls


def model_class(architecture: str) -> type[nn.Module]:
    try:
        return _REGISTRY[architecture]
    except KeyError:
        raise ValueError(
            f"unsupported architecture {architecture!r}; supported: {sorted(_REGISTRY)}"
        ) from None


def build_model(cfg: ModelConfig, builder: LayerBuilder) -> nn.Module:
    """The model for `cfg`, its layers built by the platform's `builder`."""
    return model_class(cfg.architecture)(cfg, builder)
