"""The Llama family: Llama 2/3, Mistral, Qwen2 (qkv bias), Qwen3 (q/k RMSNorm), SmolLM2.

Input is a flat, unpadded batch of tokens from many sequences; attention goes through the
backend seam with the step's metadata. Checkpoint q/k/v and gate/up projections are loaded
into fused `qkv_proj` and `gate_up_proj` parameters.

Tensor parallelism (`kvserve.distributed`): qkv_proj and gate_up_proj are column-parallel (each
rank holds its query heads, its KV heads and its slice of the MLP), o_proj and down_proj are
row-parallel with one all-reduce each, the embedding and LM head are split by vocabulary. Each
all-reduce is done by the RMSNorm after it (`parallel_state.all_reduce_rmsnorm`), in one kernel
on GPUs of one host. Every projection is a `Linear` of the local shape built by the platform's
`LayerBuilder` (which picks its weight format and kernel); the loader slices the checkpoint.
Nothing here depends on the device: the builder's ops and linear methods carry the kernels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch
import torch.nn as nn

from kvserve.attention.base import AttentionMetadata
from kvserve.core.config import ModelConfig
from kvserve.distributed import parallel_state as ps
from kvserve.distributed.layers import VocabParallelEmbedding
from kvserve.models.layers import RMSNorm, RotaryEmbedding, StepRope
from kvserve.models.linear import QuantizedTensor
from kvserve.models.loading import FusedWeightLoader

if TYPE_CHECKING:
    from kvserve.platform.base import LayerBuilder


def set_attention_sizes(mod: nn.Module, cfg: ModelConfig) -> None:
    """This rank's attention sizes on `mod` (every family's attention module): num_heads,
    num_kv_heads (query heads split across tensor-parallel ranks, KV heads split or
    replicated), head_dim, q_size and kv_size (their widths in the fused qkv projection)."""
    mod.num_heads = cfg.num_heads // ps.get_tp().size
    mod.num_kv_heads = ps.kv_head_shard(cfg.num_kv_heads)[1]
    mod.head_dim = cfg.head_dim
    mod.q_size = mod.num_heads * cfg.head_dim
    mod.kv_size = mod.num_kv_heads * cfg.head_dim


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, b: LayerBuilder) -> None:
        super().__init__()
        self.tp_size = ps.get_tp().size
        set_attention_sizes(self, cfg)
        self.scale = cfg.head_dim**-0.5
        self.qkv_proj = b.linear(cfg.hidden_size, [self.q_size, self.kv_size, self.kv_size], bias=cfg.attention_bias)
        self.o_proj = b.linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, b.ops) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, b.ops) if cfg.qk_norm else None
        self.sliding_window = cfg.sliding_window
        self.backend = b.backend
        self.ops = b.ops

    def forward(
        self,
        rope: StepRope,
        x: torch.Tensor,  # [T, hidden]
        kv_cache: torch.Tensor,
        md: AttentionMetadata,
    ) -> torch.Tensor:
        t = x.shape[0]
        q, k, v, kv_written = self.ops.qkv_rope(
            self.qkv_proj, x, rope, (self.num_heads, self.num_kv_heads, self.head_dim), self.q_norm, self.k_norm,
            kv_cache, md.slot_mapping, self.backend.fuses_kv_write,
        )
        o = self.backend.forward(q, k, v, kv_cache, md, self.scale, self.sliding_window, kv_written=kv_written)
        return ps.row_parallel_linear(self.o_proj, o.reshape(t, self.q_size))  # [T, hidden]: partial under TP


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, b: LayerBuilder) -> None:
        super().__init__()
        if cfg.hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {cfg.hidden_act!r} for {cfg.architecture}")
        self.tp_size = ps.get_tp().size
        inter = cfg.intermediate_size // self.tp_size
        self.gate_up_proj = b.linear(cfg.hidden_size, [inter, inter], bias=cfg.mlp_bias)
        self.down_proj = b.linear(inter, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # a partial sum under TP
        return ps.row_parallel_linear(self.down_proj, self.gate_up_proj.silu_and_mul(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, b: LayerBuilder) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, b)
        self.mlp = LlamaMLP(cfg, b)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps, b.ops)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps, b.ops)

    def forward(
        self,
        rope: StepRope,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: torch.Tensor,
        md: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Under TP, `x` and the attention's output are partial sums: each is all-reduced
        # together with the add-and-norm that follows it (one kernel where it can be).
        h, residual = ps.all_reduce_rmsnorm(x, residual, self.input_layernorm)
        h = self.self_attn(rope, h, kv_cache, md)
        h, residual = ps.all_reduce_rmsnorm(h, residual, self.post_attention_layernorm)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    # checkpoint name fragment -> (fused parameter fragment, shard index)
    fused_mapping = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: ModelConfig, b: LayerBuilder) -> None:
        super().__init__()
        self.config = cfg
        self.tp = ps.get_tp()
        ps.check_divisible(
            num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
            intermediate_size=cfg.intermediate_size, family=cfg.family, tp_size=self.tp.size,
        )
        if self.tp.enabled:
            self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
            vocab_rows = self.embed_tokens.per_rank
        elif b.quantized:  # the table stays in the checkpoint's block format
            from kvserve.platform.ggml_linear import GGMLEmbedding

            self.embed_tokens = GGMLEmbedding(cfg.vocab_size, cfg.hidden_size, b.dtype, quantize_to=b.head_method and 8)
            vocab_rows = cfg.vocab_size
        else:
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
            vocab_rows = cfg.vocab_size
        self.layers = self.build_layers(cfg, b)
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, b.ops)
        self.rotary = self.build_rotary(cfg, b)
        if cfg.tie_word_embeddings and not hasattr(self.embed_tokens, "as_head"):
            self.lm_head = b.dense_linear(cfg.hidden_size, vocab_rows)  # shares the dense table
        else:
            self.lm_head = b.lm_head(cfg.hidden_size, vocab_rows)
        self.tie_weights()
        # A whole decode step in one call (CPU: the bf16 or GGML C decoder stack), offered by the
        # platform after loading (`decode_stack_builder`). None until the first decode-sized step
        # builds it; False where it does not apply, or to force the op-by-op path.
        self.decode_stack_builder: Callable[[nn.Module], Any] | None = None
        self.cpu_decoder: Any = None

    def build_rotary(self, cfg: ModelConfig, b: LayerBuilder) -> RotaryEmbedding:
        return RotaryEmbedding(
            cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, max_positions=cfg.max_position_embeddings, ops=b.ops
        )

    def build_layers(self, cfg: ModelConfig, b: LayerBuilder) -> nn.ModuleList:
        """The decoder layers (a family built on this class overrides it)."""
        return nn.ModuleList(LlamaDecoderLayer(cfg, b) for _ in range(cfg.num_layers))

    def tie_weights(self) -> None:
        """Share the embedding with the LM head (again after `to_empty`, which unties)."""
        if not self.config.tie_word_embeddings:
            return
        as_head = getattr(self.embed_tokens, "as_head", None)
        if as_head is not None:  # a quantized table: the head multiplies by its blocks
            if self.embed_tokens.data is not None:
                as_head(self.lm_head)
        else:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_caches: list[torch.Tensor],
        md: AttentionMetadata,
    ) -> torch.Tensor:  # [T, hidden]
        stack = self._decode_stack(input_ids)  # a few decode rows: every layer in one call
        if stack is not None and stack.applies(input_ids, kv_caches, md):
            return stack(input_ids, positions, md)
        # Under TP the embedding's rows are partial (this rank's vocabulary shard): the first
        # layer's norm all-reduces them, as every layer does its inputs.
        h = self.embed_tokens.partial(input_ids) if self.tp.enabled else self.embed_tokens(input_ids)
        rope = self.rotary.for_step(positions, h.dtype)
        residual = None
        for layer, cache in zip(self.layers, kv_caches):
            h, residual = layer(rope, h, residual, cache, md)
        h, _ = ps.all_reduce_rmsnorm(h, residual, self.norm)
        return h

    def _decode_stack(self, input_ids: torch.Tensor) -> Any:
        """The one-call decoder stack for a step of these rows, built on first use, or None."""
        if self.cpu_decoder is False or self.decode_stack_builder is None:
            return None
        if self.cpu_decoder is None:
            self.cpu_decoder = self.decode_stack_builder(self) or False
        stack = self.cpu_decoder
        return stack if stack and input_ids.shape[0] <= stack.max_rows else None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()  # [N, vocab] ([N, vocab / tp] under TP)
        if self.tp.enabled:
            # Collective: every rank calls this for the same rows (see ModelRunner).
            logits = ps.gather_vocab(logits, self.config.vocab_size)
        return logits

    def shard_sizes(self, fused: str) -> list[int]:
        """Rows of each checkpoint tensor inside a fused parameter (this rank's shard)."""
        c, tp = self.config, self.tp.size
        if fused == "qkv_proj":
            kv = ps.kv_head_shard(c.num_kv_heads, self.tp)[1] * c.head_dim
            return [c.num_heads // tp * c.head_dim, kv, kv]
        return [c.intermediate_size // tp] * 2

    def weight_shard(self, name: str, shape: tuple[int, ...]) -> tuple[int, int, int] | None:
        """The slice (dim, start, length) of checkpoint tensor `name` this rank loads, or None
        for the whole tensor. The loader applies it while reading, so no rank ever holds the
        full model. Lengths may run past the end (the last vocabulary shard): clamp them."""
        tp = self.tp
        if not tp.enabled or len(shape) == 0:
            return None
        c = self.config
        mapped = self.checkpoint_name(name) or ""
        leaf = mapped.rsplit(".", 2)[-2] if mapped.count(".") >= 1 else mapped
        if mapped in ("embed_tokens.weight", "lm_head.weight"):
            start, per = ps.vocab_shard(c.vocab_size, tp)
            return 0, start, per
        if leaf == "q_proj":
            per = c.num_heads // tp.size * c.head_dim
            return 0, tp.rank * per, per
        if leaf in ("k_proj", "v_proj"):
            first, n = ps.kv_head_shard(c.num_kv_heads, tp)
            return 0, first * c.head_dim, n * c.head_dim
        if leaf in ("gate_proj", "up_proj"):
            per = c.intermediate_size // tp.size
            return 0, tp.rank * per, per
        if leaf in ("o_proj", "down_proj") and mapped.endswith(".weight"):
            per = shape[1] // tp.size  # input features: this rank's heads / MLP slice
            return 1, tp.rank * per, per
        return None  # norms, and row-parallel biases (added once: see load_weights)

    @staticmethod
    def checkpoint_name(name: str) -> str | None:
        """Map a checkpoint tensor name onto this module's naming (None = not a parameter)."""
        if "rotary_emb.inv_freq" in name:
            return None
        if name.startswith("model."):
            name = name[len("model."):]
        return name

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        loader = FusedWeightLoader(self, self.fused_mapping, self.shard_sizes)
        tied = self.config.tie_word_embeddings
        for name, tensor in weights:
            mapped = self.checkpoint_name(name)
            if tied and mapped == "lm_head.weight":
                continue  # the head is the embedding; a stored copy is redundant
            if mapped is None:
                continue
            if self.tp.rank > 0 and mapped.endswith(("o_proj.bias", "down_proj.bias")):
                tensor = torch.zeros_like(tensor)  # the all-reduce sums one copy of the bias
            if self.tp.enabled and mapped in ("embed_tokens.weight", "lm_head.weight"):
                tensor = _pad_rows(tensor, self.embed_tokens.per_rank)
            if mapped == "embed_tokens.weight" and hasattr(self.embed_tokens, "as_head"):
                self.embed_tokens.load(tensor)  # kept in its block format
                loader.filled.add((mapped, -1))
                continue
            loader.load(mapped, tensor)
        loader.finish(tied={"lm_head.weight"} if tied else set())
        self.tie_weights()


def _pad_rows(t: torch.Tensor | QuantizedTensor, rows: int) -> torch.Tensor | QuantizedTensor:
    """The last vocabulary shard is short when tp does not divide the vocabulary: zero rows
    (never looked up, their logits are cut off after the gather)."""
    if t.shape[0] == rows:
        return t
    if isinstance(t, QuantizedTensor):
        return t.pad_rows(rows)
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])
