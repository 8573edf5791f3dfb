"""Phi-3 / Phi-3.5 / Phi-4-mini (Phi3ForCausalLM): the Llama block with three differences.

- The checkpoint stores q/k/v as one `qkv_proj` and gate/up as one `gate_up_proj` tensor. They
  are split at load into their parts (rows [q | k | v], [gate | up]) and loaded like Llama's
  separate tensors, so every linear method (dense, GGML parts) and the fused parameters of
  `models/llama.py` apply unchanged.
- LongRoPE ("longrope", formerly "su") scaling: per-frequency divisors, `short_factor` for
  contexts up to `original_max_position_embeddings` and `long_factor` beyond, and cos/sin scaled
  by sqrt(1 + ln(factor) / ln(original_max)) (or the config's `attention_factor`). HF picks the
  factors per forward call from the largest position it sees; here each sequence of a step
  uses the long factors when its context (including this step's tokens, and for a prefill
  chunk its whole prompt) exceeds `original_max_position_embeddings`, which is HF's choice for
  a sequence run alone, with or without chunked prefill. Keys
  already cached keep the rotation they were stored with (as in HF's cache).
- Partial rotary embedding (`partial_rotary_factor`, 0.75 in Phi-4-mini): only the first
  `rotary_dim` features of each head rotate.

Phi-3-mini's configs also set a `sliding_window` (passed to the attention backend). Tensor
parallelism splits as for Llama (the fused tensors are read whole and each part cut to the
rank's rows at the split). The one-call CPU decoder stacks are not implemented for this family.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Iterable

import torch
import torch.nn as nn

from kvserve.attention.base import AttentionMetadata
from kvserve.core.config import ModelConfig
from kvserve.distributed import parallel_state as ps
from kvserve.models.layers import RMSNorm, RotaryEmbedding, StepRope
from kvserve.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP, set_attention_sizes

if TYPE_CHECKING:
    from kvserve.platform.base import LayerBuilder


class LongRope(RotaryEmbedding):
    """cos/sin of LongRoPE (or plain RoPE without `scaling`) for a step
    (`for_step(positions, dtype, long_rows)`), over the first `rotary_dim` features of a head."""

    def __init__(
        self, rotary_dim: int, theta: float, scaling: dict[str, Any] | None, max_positions: int, original_max: int
    ) -> None:
        nn.Module.__init__(self)
        self.rotary_dim, self.head_dim, self.theta, self.scaling = rotary_dim, rotary_dim, theta, scaling
        self.max_positions = max_positions
        self.original_max = original_max
        self.mscale = 1.0
        if scaling is not None:
            factor = scaling.get("factor") or max_positions / self.original_max
            mscale = scaling.get("attention_factor")
            if mscale is None:
                mscale = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(self.original_max))
            self.mscale = float(mscale)
        self.register_buffer("short_inv_freq", self._inv_freq("short_factor"), persistent=False)
        self.register_buffer("long_inv_freq", self._inv_freq("long_factor"), persistent=False)

    def _inv_freq(self, key: str) -> torch.Tensor:
        d = self.rotary_dim
        shape = torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d
        base = self.theta**shape
        if self.scaling is None:
            return 1.0 / base
        ext = torch.tensor(self.scaling[key], dtype=torch.float32, device="cpu")
        if ext.numel() != d // 2:
            raise ValueError(f"rope_scaling.{key} has {ext.numel()} entries; expected rotary_dim/2 = {d // 2}")
        return 1.0 / (ext * base)

    def reset_parameters(self) -> None:
        device = self.short_inv_freq.device
        self.short_inv_freq = self._inv_freq("short_factor").to(device)
        self.long_inv_freq = self._inv_freq("long_factor").to(device)

    def long_rows(self, md: AttentionMetadata, n: int) -> torch.Tensor | None:
        """[T] bool: the rows of sequences whose context exceeds the original length, or None.
        A prefill chunk counts its whole prompt (HF runs the prompt in one call and picks the
        long factors for all of it when the prompt is longer)."""
        lengths = md.seq_lens_cpu
        if md.prompt_lens_cpu is not None:
            lengths = [max(s, p) for s, p in zip(lengths, md.prompt_lens_cpu)]
        if self.scaling is None or max(lengths, default=0) <= self.original_max:
            return None
        qsl = md.query_start_loc_cpu
        flags = torch.zeros(n, dtype=torch.bool)
        for i, length in enumerate(lengths):
            if length > self.original_max:
                flags[qsl[i] : qsl[i + 1]] = True
        return flags

    def for_step(self, positions: torch.Tensor, dtype: torch.dtype, long_rows: torch.Tensor | None) -> StepRope:
        pos = positions.float()[:, None]
        freqs = pos * self.short_inv_freq[None, :]  # [T, d/2], fp32 like HF
        if long_rows is not None:
            freqs = torch.where(long_rows.to(pos.device)[:, None], pos * self.long_inv_freq[None, :], freqs)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T, 1, d]
        cos, sin = emb.cos(), emb.sin()
        if self.mscale != 1.0:
            cos, sin = cos * self.mscale, sin * self.mscale
        cos, sin = cos.to(dtype), sin.to(dtype)
        half = self.rotary_dim // 2
        return StepRope(cos=cos, sin_signed=torch.cat((-sin[..., :half], sin[..., half:]), dim=-1))


class Phi3Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, b: LayerBuilder, rotary_dim: int) -> None:
        super().__init__()
        set_attention_sizes(self, cfg)
        self.rotary_dim = rotary_dim
        self.scale = cfg.head_dim**-0.5
        self.qkv_proj = b.linear(cfg.hidden_size, [self.q_size, self.kv_size, self.kv_size], bias=cfg.attention_bias)
        self.o_proj = b.linear(self.q_size, cfg.hidden_size)
        self.sliding_window = cfg.sliding_window
        self.backend = b.backend
        self.ops = b.ops

    def forward(self, rope: StepRope, x: torch.Tensor, kv_cache: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
        t, d, r = x.shape[0], self.head_dim, self.rotary_dim
        if r == d:
            q, k, v, kv_written = self.ops.qkv_rope(
                self.qkv_proj, x, rope, (self.num_heads, self.num_kv_heads, d), None, None,
                kv_cache, md.slot_mapping, self.backend.fuses_kv_write,
            )
        else:  # partial rotary: rotate the first r features of each head, pass the rest
            qkv = self.qkv_proj(x)
            qk = qkv[:, : self.q_size + self.kv_size].view(t, self.num_heads + self.num_kv_heads, d)
            qk = torch.cat([self.ops.rotate(qk[..., :r], rope), qk[..., r:]], dim=-1)
            q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
            v, kv_written = qkv[:, self.q_size + self.kv_size :].view(t, self.num_kv_heads, d), False
        o = self.backend.forward(q, k, v, kv_cache, md, self.scale, self.sliding_window, kv_written=kv_written)
        return ps.row_parallel_linear(self.o_proj, o.reshape(t, self.q_size))  # partial under TP


class Phi3DecoderLayer(LlamaDecoderLayer):
    def __init__(self, cfg: ModelConfig, b: LayerBuilder, rotary_dim: int) -> None:
        nn.Module.__init__(self)
        self.self_attn = Phi3Attention(cfg, b, rotary_dim)
        self.mlp = LlamaMLP(cfg, b)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps, b.ops)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps, b.ops)


class Phi3ForCausalLM(LlamaForCausalLM):
    def __init__(self, cfg: ModelConfig, b: LayerBuilder) -> None:
        factor = float(cfg.raw.get("partial_rotary_factor") or (cfg.raw.get("rope_parameters") or {}).get(
            "partial_rotary_factor", 1.0))
        self.rotary_dim = int(cfg.head_dim * factor)
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= cfg.head_dim:
            raise ValueError(f"partial_rotary_factor {factor} gives an unusable rotary dimension {self.rotary_dim}")
        super().__init__(cfg, b)
        self.decode_stack_builder = None

    def build_rotary(self, cfg: ModelConfig, b: LayerBuilder) -> RotaryEmbedding:
        scaling = cfg.rope_scaling
        if scaling is not None and scaling["rope_type"] != "longrope":
            raise ValueError(f"unsupported rope_scaling type {scaling['rope_type']!r} for {cfg.architecture}")
        orig = (scaling or {}).get("original_max_position_embeddings") or cfg.raw.get(
            "original_max_position_embeddings") or cfg.max_position_embeddings
        return LongRope(self.rotary_dim, cfg.rope_theta, scaling, cfg.max_position_embeddings, int(orig))

    def build_layers(self, cfg: ModelConfig, b: LayerBuilder) -> nn.ModuleList:
        return nn.ModuleList(Phi3DecoderLayer(cfg, b, self.rotary_dim) for _ in range(cfg.num_layers))

    def _decode_stack(self, input_ids: torch.Tensor) -> Any:
        return None  # the one-call CPU stacks rotate whole heads with one RoPE

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor], md: AttentionMetadata
    ) -> torch.Tensor:
        h = self.embed_tokens.partial(input_ids) if self.tp.enabled else self.embed_tokens(input_ids)
        # Plain cos/sin tensors, built here (a platform's cos/sin table is keyed on one inv_freq);
        # the platform's ops still rotate with them.
        rope = self.rotary.for_step(positions, h.dtype, self.rotary.long_rows(md, input_ids.shape[0]))
        residual = None
        for layer, cache in zip(self.layers, kv_caches):
            h, residual = layer(rope, h, residual, cache, md)
        h, _ = ps.all_reduce_rmsnorm(h, residual, self.norm)  # the last MLP output is partial under TP
        return h

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(self._split_fused(weights))

    def _split_fused(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterable[tuple[str, torch.Tensor]]:
        """Fused checkpoint tensors (read whole: `weight_shard` gives them no slice) -> their
        parts, each cut to this rank's rows under TP (query heads, KV heads, MLP slice)."""
        c, tp = self.config, self.tp
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        first_kv, n_kv = ps.kv_head_shard(c.num_kv_heads, tp)
        q_rows = (tp.rank * q // tp.size, q // tp.size)
        kv_rows = (first_kv * c.head_dim, n_kv * c.head_dim)
        mlp = c.intermediate_size // tp.size
        mlp_rows = (tp.rank * mlp, mlp)
        for name, t in weights:
            if name.endswith(".qkv_proj.weight"):
                parts = zip(("q_proj", "k_proj", "v_proj"), _split_rows(t, [q, kv, kv]), (q_rows, kv_rows, kv_rows))
            elif name.endswith(".gate_up_proj.weight"):
                parts = zip(("gate_proj", "up_proj"), _split_rows(t, [c.intermediate_size] * 2), (mlp_rows, mlp_rows))
            else:
                yield name, t
                continue
            fused = name.rsplit(".", 2)[-2]
            for part, tensor, (start, n) in parts:
                if tp.enabled:
                    tensor = _split_rows(tensor, [start, n, tensor.shape[0] - start - n])[1]
                yield name.replace(f".{fused}.", f".{part}."), tensor


def _split_rows(t: Any, sizes: list[int]) -> list[Any]:
    if t.shape[0] != sum(sizes):
        raise ValueError(f"fused tensor has {t.shape[0]} rows; expected {sum(sizes)} ({sizes})")
    if isinstance(t, torch.Tensor):
        return list(t.split(sizes))
    out, start = [], 0  # a QuantizedTensor: whole rows of blocks
    for n in sizes:
        out.append(type(t)(t.qtype, t.data[start : start + n], t.cols))
        start += n
    return out
