"""Mixture-of-experts Llama-family models: Qwen3-MoE (Qwen3MoeForCausalLM) and Mixtral
(MixtralForCausalLM).

The attention block is Llama's (`models/llama.py`; Qwen3-MoE with its q/k norm). The MLP of a
sparse layer is a router (a dense [experts, hidden] projection, kept unquantized: it picks the
experts) and `num_experts` gated-SiLU expert MLPs, each built by the platform's `LayerBuilder`
like any projection (so GGML / q8_0 / bf16 linear methods apply to expert weights unchanged):

    probs = softmax(router(x)) in fp32;  top-k experts per token;  optionally renormalize the k
    weights to sum to 1 (`norm_topk_prob`; Mixtral always does);  out = sum_k w_k * expert_k(x)

CPU path: loop over the experts that received tokens (ascending, as HF does), gather their rows
(`index_select`), run the expert on them, and scatter-add the weighted result (`index_add_`),
so the work is the active experts' only. Qwen3-MoE layers in `mlp_only_layers`, or off the
`decoder_sparse_step` grid, keep a dense MLP.

Not implemented: tensor parallelism for these families (the engine refuses
tensor_parallel_size > 1), MoE GGUF files, a fused GPU MoE kernel, gpt-oss.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from kvserve.core.config import ModelConfig
from kvserve.models.llama import LlamaDecoderLayer, LlamaForCausalLM

if TYPE_CHECKING:
    from kvserve.platform.base import LayerBuilder


class ExpertMLP(nn.Module):
    def __init__(self, hidden: int, inter: int, b: LayerBuilder) -> None:
        super().__init__()
        self.gate_up_proj = b.linear(hidden, [inter, inter])
        self.down_proj = b.linear(inter, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj.silu_and_mul(x))


class SparseMoE(nn.Module):
    def __init__(self, cfg: ModelConfig, b: LayerBuilder, num_experts: int, top_k: int, inter: int, renorm: bool) -> None:
        super().__init__()
        if cfg.hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {cfg.hidden_act!r} for {cfg.architecture}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok must be in [1, {num_experts}] (got {top_k})")
        self.num_experts, self.top_k, self.renorm = num_experts, top_k, renorm
        self.gate = b.dense_linear(cfg.hidden_size, num_experts)  # the router
        self.experts = nn.ModuleList(ExpertMLP(cfg.hidden_size, inter, b) for _ in range(num_experts))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([T, k] weights in x's dtype, [T, k] expert ids)."""
        probs = torch.softmax(self.gate(x), dim=-1, dtype=torch.float)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renorm:
            weights /= weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden]
        weights, ids = self.route(x)
        out = torch.zeros_like(x)
        hit = torch.bincount(ids.flatten(), minlength=self.num_experts).nonzero().flatten().tolist()
        ids_t = ids.t()  # [k, T]: rows taken slot-major, as HF's expert loop takes them
        for e in hit:
            slot, rows = torch.where(ids_t == e)
            y = self.experts[e](x.index_select(0, rows)) * weights[rows, slot, None]
            out.index_add_(0, rows, y.to(out.dtype))
        return out


class MoEForCausalLM(LlamaForCausalLM):
    """Qwen3-MoE and Mixtral: Llama attention, sparse MoE MLPs."""

    # Mixtral's checkpoint names -> the Qwen-style names the fused mapping knows.
    _RENAMES = (
        (".block_sparse_moe.", ".mlp."), (".w1.", ".gate_proj."), (".w3.", ".up_proj."), (".w2.", ".down_proj."),
    )

    def __init__(self, cfg: ModelConfig, b: LayerBuilder) -> None:
        super().__init__(cfg, b)
        self.decode_stack_builder = None

    def build_layers(self, cfg: ModelConfig, b: LayerBuilder) -> nn.ModuleList:
        raw = cfg.raw
        mixtral = cfg.architecture == "MixtralForCausalLM"
        # transformers >= 5 writes Qwen3-MoE's num_experts as num_local_experts, like Mixtral's.
        num_experts = int(raw.get("num_local_experts") or raw.get("num_experts") or 0)
        top_k = int(raw.get("num_experts_per_tok", 2))
        inter = int(cfg.intermediate_size if mixtral else raw.get("moe_intermediate_size") or cfg.intermediate_size)
        renorm = True if mixtral else bool(raw.get("norm_topk_prob", False))
        step = 1 if mixtral else int(raw.get("decoder_sparse_step", 1) or 1)
        dense = set(raw.get("mlp_only_layers") or [])
        layers = nn.ModuleList()
        for i in range(cfg.num_layers):
            layer = LlamaDecoderLayer(cfg, b)
            if num_experts > 0 and i not in dense and (i + 1) % step == 0:
                layer.mlp = SparseMoE(cfg, b, num_experts, top_k, inter, renorm)
            layers.append(layer)
        return layers

    def _decode_stack(self, input_ids: torch.Tensor) -> Any:
        return None  # the one-call CPU stacks implement dense MLPs only

    @classmethod
    def checkpoint_name(cls, name: str) -> str | None:
        for old, new in cls._RENAMES:
            name = name.replace(old, new)
        return LlamaForCausalLM.checkpoint_name(name)

