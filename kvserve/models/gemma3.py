"""Gemma 3 (text): Gemma3ForCausalLM, e.g. gemma-3-270m / 1b, and GGUF files of them.

What differs from Llama (`models/llama.py`, whose loading, tied head and fused q/k/v and
gate/up parameters it reuses):

- Layers alternate sliding-window (local) and full (global) attention (`cfg.layer_types`: five
  local layers, then one global, by default). Each kind has its own RoPE base (10k local, 1M
  global; RoPE scaling, where a checkpoint has it, applies to global layers only), so a step
  computes two sets of cos/sin. The attention backend gets the layer's window (None for global
  layers), so the paged KV cache keeps every token and a local layer reads only the last
  `sliding_window` keys.
- RMSNorm scales by (1 + weight): the loader adds 1 to every norm weight once (HF checkpoints
  store `weight`, llama.cpp stores `weight + 1`, which `loader/gguf.py` turns back into HF's
  form), so the platform's ordinary RMSNorm ops and kernels apply. In fp32 that is HF's
  arithmetic exactly; in 16-bit dtypes (1 + weight) is rounded once to the dtype.
- q and k get a per-head RMSNorm before RoPE; the softmax scale is query_pre_attn_scalar^-0.5.
- Each block is sandwiched: norm -> attention -> norm, added to the residual; norm -> MLP ->
  norm, added. The MLP is GeGLU: gelu_tanh(gate) * up.
- The embedding is multiplied by sqrt(hidden_size) rounded to the model dtype (as HF does), and
  is tied to the LM head (a GGUF's quantized table stays quantized and serves as the head).
- Optional final logit soft-capping: cap * tanh(logits / cap).

Tensor parallelism splits heads, KV heads, the MLP and the vocabulary as for Llama; each
post-norm all-reduces the partial output before it (`ps.all_reduce_rmsnorm`). On the CPU a
GGML-quantized fp32 model runs its decode steps (up to 64 rows) in the one-call C decoder stack
(`platform/ggml_stack.py`, Gemma's norms, GELU-tanh, windows and RoPE sets in
`csrc/quant/decoder_stack_f32.c`); the bf16 stack implements the Llama block only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

import torch
import torch.nn as nn

from kvserve.attention.base import AttentionMetadata
from kvserve.core.config import ModelConfig
from kvserve.distributed import parallel_state as ps
from kvserve.models.layers import RMSNorm, RotaryEmbedding, StepRope
from kvserve.models.llama import LlamaForCausalLM, set_attention_sizes

if TYPE_CHECKING:
    from kvserve.platform.base import LayerBuilder

SLIDING = "sliding_attention"
GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh")


class Gemma3Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, b: LayerBuilder, sliding: bool) -> None:
        super().__init__()
        set_attention_sizes(self, cfg)
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else cfg.head_dim**-0.5
        self.qkv_proj = b.linear(cfg.hidden_size, [self.q_size, self.kv_size, self.kv_size], bias=cfg.attention_bias)
        self.o_proj = b.linear(self.q_size, cfg.hidden_size, bias=cfg.attention_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, b.ops)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, b.ops)
        self.sliding_window = cfg.sliding_window if sliding else None
        self.backend = b.backend
        self.ops = b.ops

    def forward(self, rope: StepRope, x: torch.Tensor, kv_cache: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
        q, k, v, kv_written = self.ops.qkv_rope(
            self.qkv_proj, x, rope, (self.num_heads, self.num_kv_heads, self.head_dim), self.q_norm, self.k_norm,
            kv_cache, md.slot_mapping, self.backend.fuses_kv_write,
        )
        o = self.backend.forward(q, k, v, kv_cache, md, self.scale, self.sliding_window, kv_written=kv_written)
        return ps.row_parallel_linear(self.o_proj, o.reshape(x.shape[0], self.q_size))  # partial under TP


class Gemma3MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, b: LayerBuilder) -> None:
        super().__init__()
        if cfg.hidden_act not in GELU_TANH:
            raise ValueError(f"unsupported hidden_activation {cfg.hidden_act!r} for {cfg.architecture}")
        inter = cfg.intermediate_size // ps.get_tp().size
        self.gate_up_proj = b.linear(cfg.hidden_size, [inter, inter])
        self.down_proj = b.linear(inter, cfg.hidden_size)
        self.ops = b.ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # a partial sum under TP
        return ps.row_parallel_linear(self.down_proj, self.ops.gelu_tanh_and_mul(self.gate_up_proj(x)))


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, b: LayerBuilder, layer_type: str) -> None:
        super().__init__()
        self.is_sliding = layer_type == SLIDING
        self.self_attn = Gemma3Attention(cfg, b, self.is_sliding)
        self.mlp = Gemma3MLP(cfg, b)
        h, eps = cfg.hidden_size, cfg.norm_eps
        self.input_layernorm = RMSNorm(h, eps, b.ops)
        self.post_attention_layernorm = RMSNorm(h, eps, b.ops)
        self.pre_feedforward_layernorm = RMSNorm(h, eps, b.ops)
        self.post_feedforward_layernorm = RMSNorm(h, eps, b.ops)

    def forward(
        self,
        rope: StepRope,
        x: torch.Tensor,  # the previous layer's MLP output (the embedding for layer 0)
        residual: torch.Tensor | None,
        kv_cache: torch.Tensor,
        md: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Under TP the attention and MLP outputs are partial sums: the post-norm after each
        # all-reduces them (`ps.all_reduce_rmsnorm` with no residual); the adds that follow see
        # full rows. Layer 0's input is the embedding, partial under TP (a vocabulary shard).
        if residual is None:
            h, residual = ps.all_reduce_rmsnorm(x, None, self.input_layernorm)
        else:  # the previous layer's last residual add, with this layer's input norm
            h, residual = self.input_layernorm.forward_with_residual(x, residual)
        h, _ = ps.all_reduce_rmsnorm(self.self_attn(rope, h, kv_cache, md), None, self.post_attention_layernorm)
        h, residual = self.pre_feedforward_layernorm.forward_with_residual(h, residual)
        h, _ = ps.all_reduce_rmsnorm(self.mlp(h), None, self.post_feedforward_layernorm)
        return h, residual


class Gemma3ForCausalLM(LlamaForCausalLM):
    def __init__(self, cfg: ModelConfig, b: LayerBuilder) -> None:
        super().__init__(cfg, b)  # embedding, layers (build_layers), norm, global RoPE, tied head
        self.local_rotary = RotaryEmbedding(
            cfg.head_dim, cfg.local_rope_theta or 10_000.0, None, max_positions=cfg.max_position_embeddings, ops=b.ops
        )
        # sqrt(hidden) in the model dtype (HF: `embed_scale.to(weight.dtype)`): set at first use.
        self._embed_scale: torch.Tensor | None = None

    def build_layers(self, cfg: ModelConfig, b: LayerBuilder) -> nn.ModuleList:
        types = cfg.layer_types or (SLIDING,) * cfg.num_layers
        return nn.ModuleList(Gemma3DecoderLayer(cfg, b, t) for t in types)

    def embed_scale(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        s = self._embed_scale
        if s is None or s.dtype != dtype or s.device != device:
            s = torch.tensor(self.config.hidden_size**0.5, dtype=torch.float32, device=device).to(dtype)
            self._embed_scale = s
        return s

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_caches: list[torch.Tensor],
        md: AttentionMetadata,
    ) -> torch.Tensor:  # [T, hidden]
        stack = self._decode_stack(input_ids)  # a few decode rows: every layer in one C call
        if stack is not None and stack.applies(input_ids, kv_caches, md):
            return stack(input_ids, positions, md)
        h = self.embed_tokens.partial(input_ids) if self.tp.enabled else self.embed_tokens(input_ids)
        h = h * self.embed_scale(h.dtype, h.device)  # a partial row scales to its exact share
        ropes = {
            True: self.local_rotary.for_step(positions, h.dtype),
            False: self.rotary.for_step(positions, h.dtype),
        }
        residual = None
        for layer, cache in zip(self.layers, kv_caches):
            h, residual = layer(ropes[layer.is_sliding], h, residual, cache, md)
        h, _ = self.norm.forward_with_residual(h, residual)
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)
        cap = self.config.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        # Gemma's RMSNorm multiplies by (1 + weight): store the factor itself.
        super().load_weights((n, t + 1 if n.endswith("norm.weight") else t) for n, t in weights)
