"""GPT-2: learned absolute positions, pre-LayerNorm blocks, GELU (tanh) MLP, tied LM head.

HF checkpoints store GPT-2's projections as `Conv1D` with weight `[in, out]`; they are
transposed into `nn.Linear`'s `[out, in]` on load.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

import torch
import torch.nn as nn

from kvserve.attention.base import AttentionBackend, AttentionMetadata
from kvserve.core.config import ModelConfig
from kvserve.models.layers import gelu_new
from kvserve.models.loading import FusedWeightLoader

if TYPE_CHECKING:
    from kvserve.platform.base import LayerBuilder

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class GPT2Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.c_attn = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)  # fused q ‖ k ‖ v
        self.c_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.scale = cfg.head_dim**-0.5
        self.backend = backend

    def forward(self, x: torch.Tensor, kv_cache: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
        t, hidden = x.shape
        q, k, v = self.c_attn(x).split(hidden, dim=-1)  # each [T, hidden]
        shape = (t, self.num_heads, self.head_dim)
        o = self.backend.forward(q.view(shape), k.view(shape), v.view(shape), kv_cache, md, self.scale)
        return self.c_proj(o.reshape(t, hidden))


class GPT2MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.hidden_act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"unsupported activation_function {cfg.hidden_act!r} for GPT-2")
        self.c_fc = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.c_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(gelu_new(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.attn = GPT2Attention(cfg, backend)
        self.ln_2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = GPT2MLP(cfg)

    def forward(self, x: torch.Tensor, kv_cache: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache, md)
        return x + self.mlp(self.ln_2(x))


class GPT2LMHeadModel(nn.Module):
    def __init__(self, cfg: ModelConfig, builder: LayerBuilder) -> None:
        super().__init__()
        backend = builder.backend
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.wpe = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.h = nn.ModuleList(GPT2Block(cfg, backend) for _ in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        self.lm_head.weight = self.wte.weight

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_caches: list[torch.Tensor],
        md: AttentionMetadata,
    ) -> torch.Tensor:  # [T, hidden]
        h = self.wte(input_ids) + self.wpe(positions)
        for block, cache in zip(self.h, kv_caches):
            h = block(h, cache, md)
        return self.ln_f(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        loader = FusedWeightLoader(self, {}, lambda _frag: [])
        for name, tensor in weights:
            if name.startswith("transformer."):
                name = name[len("transformer."):]
            if name == "lm_head.weight" or name.endswith(".attn.bias") or name.endswith(".attn.masked_bias"):
                continue  # tied head; causal-mask buffers of old checkpoints
            if name.endswith(_CONV1D):
                tensor = tensor.t()
            loader.load(name, tensor)
        loader.finish(tied={"lm_head.weight"})
