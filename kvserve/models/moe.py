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
so the work is the active experts' only. A platform with a fused MoE op runs the experts
through it instead (`Ops.fused_moe`; CUDA: the Triton kernels of `kernels/triton_moe.py`, no
host sync, so decode steps are captured in CUDA graphs). The routing goes through the platform
too (`Ops.route_experts`: the torch ops above; on CUDA by default one Triton kernel,
`kernels/triton_moe_decode.py`, whose expert kernels also run the decode batches of up to a few
tokens; `KVSERVE_MOE_DECODE=torch` keeps the torch ops and the pairs kernels). A platform may also
take the post-attention add-and-norm into the routing (`Ops.moe_norm_route`; CUDA with
`KVSERVE_MOE_DECODE=fused-router`: norm, router projection and routing in one launch): the layer
(`MoEDecoderLayer`) then hands the attention block's output and the residual to
`SparseMoE.forward_with_norm`; with `fused-chain` the expert kernels also apply the next layer's
input norm (`Ops.fused_moe_norm`; `MoEForCausalLM.forward` tells each layer the norm after it). Qwen3-MoE layers in
`mlp_only_layers`, or off the `decoder_sparse_step` grid, keep a dense MLP.

Tensor parallelism: every rank routes the same way (the router is replicated) and holds a slice
of every expert (gate/up rows, down columns: `inter / tp` each), so the layer's output is a
partial sum that the next norm all-reduces, as for a dense MLP.

GGUF files (llama.cpp's "qwen3moe", and "llama" with experts for Mixtral) store each layer's
experts stacked; `loader/gguf_experts.py` yields one tensor per expert, so quantized experts keep
their GGML blocks through the same linear methods. Not implemented: quantized experts in the
fused GPU kernel (gpt-oss, `models/gpt_oss.py`, has its own MXFP4 expert path): they run the
expert loop, which asks the host which experts were hit, so such a model decodes without CUDA
graphs (`supports_cuda_graphs`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from kvserve.attention.base import AttentionMetadata
from kvserve.core.config import ModelConfig
from kvserve.distributed import parallel_state as ps
from kvserve.models.layers import StepRope
from kvserve.models.llama import LlamaDecoderLayer, LlamaForCausalLM

if TYPE_CHECKING:
    from kvserve.platform.base import LayerBuilder


class ExpertMLP(nn.Module):
    """One expert's gated-SiLU MLP of this rank's slice (`inter` = the expert's width / tp)."""

    def __init__(self, hidden: int, inter: int, b: LayerBuilder) -> None:
        super().__init__()
        self.gate_up_proj = b.linear(hidden, [inter, inter])
        self.down_proj = b.linear(inter, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj.silu_and_mul(x))


def expert_loop(experts: nn.ModuleList, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The MoE output without a fused kernel: each expert that received tokens (ascending, as
    HF's loop) runs on its rows; outputs are weighted and scatter-added. x [T, H], weights and
    ids [T, k] -> [T, H]."""
    out = torch.zeros_like(x)
    hit = torch.bincount(ids.flatten(), minlength=len(experts)).nonzero().flatten().tolist()
    ids_t = ids.t()  # [k, T]: rows taken slot-major, as HF's expert loop takes them
    for e in hit:
        slot, rows = torch.where(ids_t == e)
        y = experts[e](x.index_select(0, rows)) * weights[rows, slot, None]
        out.index_add_(0, rows, y.to(out.dtype))
    return out


class SparseMoE(nn.Module):
    def __init__(self, cfg: ModelConfig, b: LayerBuilder, num_experts: int, top_k: int, inter: int, renorm: bool) -> None:
        super().__init__()
        if cfg.hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {cfg.hidden_act!r} for {cfg.architecture}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok must be in [1, {num_experts}] (got {top_k})")
        self.num_experts, self.top_k, self.renorm = num_experts, top_k, renorm
        tp = ps.get_tp().size
        if inter % tp:
            raise ValueError(f"tensor_parallel_size={tp} must divide the experts' MLP width ({inter})")
        self.ops = b.ops  # the platform's fused MoE op, where it has one
        self.gate = b.dense_linear(cfg.hidden_size, num_experts)  # the router (every rank routes alike)
        self.experts = nn.ModuleList(ExpertMLP(cfg.hidden_size, inter // tp, b) for _ in range(num_experts))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([T, k] weights in x's dtype, [T, k] expert ids)."""
        return self.ops.route_experts(self.gate(x), self.top_k, self.renorm, x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden]; a partial sum under TP
        weights, ids = self.route(x)
        return self.experts_forward(x, weights, ids)

    def experts_forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        fused = self.ops.fused_moe(self, x, weights, ids)
        if fused is not None:
            return fused
        return expert_loop(self.experts, x, weights, ids)

    def forward_with_norm(
        self, x: torch.Tensor, residual: torch.Tensor, norm: nn.Module, next_norm: nn.Module | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None] | None:
        """From the attention block's output `x`, the norm before this MLP included, where the
        platform does the add-and-norm, router and routing as one op (`Ops.moe_norm_route`):
        (this layer's output, x + residual, None), or, where the platform also takes the next
        block's add-and-norm `next_norm` into the experts (`Ops.fused_moe_norm`), (None, the
        residual after this layer, next_norm(that residual)). None where the platform has no
        such op. One process only (no partial sums)."""
        routed = self.ops.moe_norm_route(self, x, residual, norm)
        if routed is None:
            return None
        h, residual, weights, ids = routed
        if next_norm is not None:
            chained = self.ops.fused_moe_norm(self, h, weights, ids, residual, next_norm)
            if chained is not None:
                normed, residual = chained
                return None, residual, normed
        return self.experts_forward(h, weights, ids), residual, None


class MoEDecoderLayer(LlamaDecoderLayer):
    """Llama's decoder layer whose sparse MLP may take the post-attention add-and-norm into its
    routing op (`SparseMoE.forward_with_norm`) and the next block's add-and-norm into its expert
    kernels. Called with `next_norm` (`MoEForCausalLM.forward`, one process) it returns
    (output or None, residual, next_norm's output or None): with `normed` given, `x` is None and
    `normed` is this layer's input norm already applied (by the layer before). Without
    `next_norm` it is exactly Llama's layer: (output, residual)."""

    def forward(
        self,
        rope: StepRope,
        x: torch.Tensor | None,
        residual: torch.Tensor | None,
        kv_cache: torch.Tensor,
        md: AttentionMetadata,
        normed: torch.Tensor | None = None,
        next_norm: nn.Module | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        chain = next_norm is not None
        if normed is None and (not isinstance(self.mlp, SparseMoE) or ps.get_tp().enabled):
            out = super().forward(rope, x, residual, kv_cache, md)
            return (*out, None) if chain else out
        if normed is None:
            h, residual = ps.all_reduce_rmsnorm(x, residual, self.input_layernorm)
        else:
            h = normed
        h = self.self_attn(rope, h, kv_cache, md)
        done = self.mlp.forward_with_norm(h, residual, self.post_attention_layernorm, next_norm) \
            if isinstance(self.mlp, SparseMoE) else None
        if done is None:
            h, residual = ps.all_reduce_rmsnorm(h, residual, self.post_attention_layernorm)
            done = self.mlp(h), residual, None
        return done if chain else done[:2]


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
        self.expert_inter = inter
        layers = nn.ModuleList()
        for i in range(cfg.num_layers):
            layer = MoEDecoderLayer(cfg, b)
            if num_experts > 0 and i not in dense and (i + 1) % step == 0:
                layer.mlp = SparseMoE(cfg, b, num_experts, top_k, inter, renorm)
            layers.append(layer)
        return layers

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_caches: list[torch.Tensor],
        md: AttentionMetadata,
    ) -> torch.Tensor:  # [T, hidden]
        """Llama's forward, except that each layer is told the norm after it (the next layer's
        input norm, or the final norm), which a sparse layer's expert kernels may apply
        (`MoEDecoderLayer`); under tensor parallelism exactly Llama's."""
        if self.tp.enabled:
            return super().forward(input_ids, positions, kv_caches, md)
        h: torch.Tensor | None = self.embed_tokens(input_ids)
        rope = self.rotary.for_step(positions, h.dtype)
        residual = normed = None
        n = len(self.layers)
        for i, (layer, cache) in enumerate(zip(self.layers, kv_caches)):
            after = self.layers[i + 1].input_layernorm if i + 1 < n else self.norm
            h, residual, normed = layer(rope, h, residual, cache, md, normed=normed, next_norm=after)
        if normed is not None:
            return normed
        h, _ = ps.all_reduce_rmsnorm(h, residual, self.norm)
        return h

    def _decode_stack(self, input_ids: torch.Tensor) -> Any:
        return None  # the one-call CPU stacks implement dense MLPs only

    @property
    def supports_cuda_graphs(self) -> bool:
        """Decode steps capture only where every sparse layer runs the fused kernel (its experts
        stacked by the platform after loading); the expert loop syncs with the host."""
        return all(getattr(layer.mlp, "stacked_experts", None) is not None
                   for layer in self.layers if isinstance(layer.mlp, SparseMoE))

    def weight_shard(self, name: str, shape: tuple[int, ...]) -> tuple[int, int, int] | None:
        """Llama's slices, except that an expert's gate/up rows are split by the experts' width
        (each rank holds a slice of every expert); the router is whole on every rank."""
        mapped = self.checkpoint_name(name) or ""
        if self.tp.enabled and ".experts." in mapped and mapped.endswith(("gate_proj.weight", "up_proj.weight")):
            per = self.expert_inter // self.tp.size
            return 0, self.tp.rank * per, per
        return super().weight_shard(name, shape)

    @classmethod
    def checkpoint_name(cls, name: str) -> str | None:
        for old, new in cls._RENAMES:
            name = name.replace(old, new)
        return LlamaForCausalLM.checkpoint_name(name)

