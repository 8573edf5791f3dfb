"""The CPU platform's whole-decode-step hook for GGML-quantized Llama-family and Gemma 3
models: every layer of a decode step of a few rows in one C call (`kernels/cpu_quant_stack.py`),
reading the same block bytes as the op-by-op projections (`platform/ggml_linear.py`).

It applies to a model whose projections are all on the GGML method with quantized parts, in
fp32, without tensor parallelism or MLP biases (a Llama-family model: without q/k norm, one
window for all layers; Gemma 3: its q/k norms, four norms a layer, GELU-tanh, local and global
layers with their own window and RoPE base, the scaled embedding), and to steps of at most
`MAX_ROWS` (64) decode rows whose layers all use the torch_ref backend with fp32 caches (a
trace that wraps a layer's backend sends the step down the op-by-op path). Everything else runs
the modules.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from kvserve.attention.base import AttentionMetadata
from kvserve.models.cpu_decoder import decode_step_fits
from kvserve.platform.ggml_linear import GGMLLinearMethod

logger = logging.getLogger(__name__)

# Decode steps of up to this many rows run as one call (the C stack's limit): the op-by-op
# path's per-op Python and OpenMP start-up costs stay a large share of a step even at 32 rows
# (32 requests of the built-in model, same process, alternating: 32-63 vs 10-20 output tok/s
# on a busy 2-core AVX2 machine).
MAX_ROWS = 64


class GGMLDecoderStack:
    max_rows = MAX_ROWS
    # Rows of one sequence (a speculative verify step's positions) are safe: the C stack
    # writes their K/V before attention reads the cache, and splits them as one-row decodes
    # (the rows' items that start together read each K/V tile once for all of them).
    verify_rows_ok = True

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.attn = [layer.self_attn for layer in model.layers]
        self._stack = None
        self._caches_key: tuple[int, ...] | None = None
        self.num_steps = 0  # steps run by this stack (tests, stats)

    @classmethod
    def build(cls, model: nn.Module) -> GGMLDecoderStack | None:
        reason = cls._unsupported(model)
        if reason is not None:
            logger.debug("one-call GGML decoder stack not used: %s", reason)
            return None
        return cls(model)

    @staticmethod
    def _unsupported(model: nn.Module) -> str | None:
        from kvserve.kernels import cpu_quant_stack

        cfg = model.config
        gemma = cfg.family == "gemma3"
        if cfg.family not in ("llama", "gemma3"):
            return f"the {cfg.family} family"
        if getattr(model, "tp", None) is None or model.tp.enabled:
            return "tensor parallelism"
        if (cfg.qk_norm and not gemma) or cfg.mlp_bias:
            return "q/k norm or MLP bias"
        if gemma and getattr(cfg, "attn_logit_softcapping", None):
            return "attention logit soft-capping"
        if cpu_quant_stack.library() is None:
            return "no quantized CPU kernels"
        if model.norm.weight.dtype != torch.float32:
            return "not an fp32 model"
        # Gemma: its local layers' window and its global layers' None (the C stack's two plans)
        if len({layer.self_attn.sliding_window for layer in model.layers}) > (2 if gemma else 1):
            return "per-layer sliding windows"
        for layer in model.layers:
            for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
                if not isinstance(m.method, GGMLLinearMethod) or any(p.qtype == 0 for p in m.parts):
                    return "a projection is not GGML-quantized"
        return None

    def applies(self, input_ids: torch.Tensor, kv_caches: list[torch.Tensor], md: AttentionMetadata) -> bool:
        """This step is one the stack can run (`decode_step_fits`) and the caches are fp32."""
        if not decode_step_fits(input_ids, md, MAX_ROWS, self.attn):
            return False
        key = tuple(c.data_ptr() for c in kv_caches)
        if key != self._caches_key:
            return self._build_stack(kv_caches, key)
        return True

    def _build_stack(self, kv_caches: list[torch.Tensor], key: tuple[int, ...]) -> bool:
        from kvserve.kernels.cpu_quant_stack import QuantDecoderStack, QuantLinear, StackLayer

        m = self.model
        if len(kv_caches) != len(m.layers) or not all(
            c.dtype == torch.float32 and c.is_contiguous() for c in kv_caches
        ):
            return False
        gemma = m.config.family == "gemma3"
        layers = []
        for layer, cache in zip(m.layers, kv_caches):
            a, mlp = layer.self_attn, layer.mlp
            inter = mlp.gate_up_proj.out_sizes[0]
            gate, up = _split_rows(mlp.gate_up_proj, inter)
            # Gemma: the norm weights already hold (1 + weight) (`Gemma3ForCausalLM.load_weights`)
            extra = {} if not gemma else dict(
                pre_ff_norm=layer.pre_feedforward_layernorm.weight, post_ff_norm=layer.post_feedforward_layernorm.weight,
                q_norm=a.q_norm.weight, k_norm=a.k_norm.weight, window=a.sliding_window or 0,
                local_rope=layer.is_sliding,
            )
            layers.append(StackLayer(
                input_norm=layer.input_layernorm.weight, qkv=_quant_linear(a.qkv_proj), o=_quant_linear(a.o_proj),
                post_norm=layer.post_attention_layernorm.weight, gate=gate, up=up,
                down=_quant_linear(mlp.down_proj), kv_cache=cache, **extra,
            ))
        embed = m.embed_tokens
        a0 = m.layers[0].self_attn
        model_kw = {} if not gemma else dict(
            local_inv_freq=m.local_rotary.inv_freq.float().contiguous(),
            embed_scale=float(m.embed_scale(torch.float32, torch.device("cpu"))),  # sqrt(H) in fp32, as HF
            activation="gelu_tanh", sandwich_norms=True,
        )
        try:
            self._stack = QuantDecoderStack(
                layers, embed=embed.data, embed_qtype=embed.qtype, final_norm=m.norm.weight,
                inv_freq=m.rotary.inv_freq.float().contiguous(), num_heads=a0.num_heads,
                num_kv_heads=a0.num_kv_heads, head_dim=a0.head_dim, eps=m.config.norm_eps, scale=a0.scale,
                sliding_window=None if gemma else a0.sliding_window, max_rows=MAX_ROWS, **model_kw,
            )
        except ValueError as e:  # a shape the C stack does not take: the op-by-op path runs
            logger.info("one-call GGML decoder stack not used: %s", e)
            self.model.cpu_decoder = False
            return False
        self._caches_key = key
        return True

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
        out = self._stack(input_ids, positions.contiguous(), md.block_tables, md.seq_lens, md.slot_mapping)
        self.num_steps += 1
        return out


def _quant_linear(layer) -> QuantLinear:  # noqa: F821 - imported lazily
    from kvserve.kernels.cpu_quant_stack import QuantLinear

    bias = None if layer.bias is None else layer.bias.detach().float().contiguous()
    return QuantLinear(parts=[(p.qtype, p.data, layer.in_features) for p in layer.parts], bias=bias)


def _split_rows(layer, rows: int):
    """(gate, up) QuantLinears of a fused gate/up projection: its parts cut at output row
    `rows` (a merged part is split into two row views, no copy)."""
    from kvserve.kernels.cpu_quant_stack import QuantLinear

    gate, up = [], []
    for p in layer.parts:
        lo, hi = p.offset, p.offset + p.rows
        if hi <= rows:
            gate.append((p.qtype, p.data, layer.in_features))
        elif lo >= rows:
            up.append((p.qtype, p.data, layer.in_features))
        else:
            gate.append((p.qtype, p.data[: rows - lo], layer.in_features))
            up.append((p.qtype, p.data[rows - lo :], layer.in_features))
    return QuantLinear(parts=gate), QuantLinear(parts=up)
