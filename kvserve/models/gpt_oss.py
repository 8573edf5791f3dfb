"""gpt-oss (GptOssForCausalLM: gpt-oss-20b / 120b), from bf16/fp32 safetensors or the MXFP4
checkpoints OpenAI ships.

The block is Llama's pre-norm layout (`models/llama.py`: its embedding, head, fused q/k/v and
loading), with these differences:

- Attention: q/k/v and o projections with biases; one learned **sink** logit per query head,
  which joins every row's softmax denominator and attends to no value (passed to the attention
  backend as `sinks`); layers alternate sliding-window (`sliding_window`, 128) and full attention
  (`cfg.layer_types`); softmax scale head_dim^-0.5.
- RoPE is YaRN (factor 32 over 4096 positions): the frequencies come from `rope_inv_freq`, and
  YaRN's cos/sin multiplier m is folded into the softmax scale as m^2 (both q and k carry one m,
  so the scores are the same; the platform's RoPE kernels and cos/sin tables stay plain).
- The MLP of every layer is a mixture of experts. Router: logits = x W^T + b; the top-k logits
  per token, softmaxed among themselves, weight the k experts (on CUDA through the platform's
  `route_experts`: one launch, the same weights up to fp32 rounding). Expert e:
      gate, up = x G_e^T + g_e, x U_e^T + u_e         (HF interleaves gate/up columns; split at load)
      h = (clamp(up, -limit, limit) + 1) * gate' * sigmoid(alpha * gate'),  gate' = min(gate, limit)
      y = h D_e^T + d_e
  The forward runs the experts that received tokens, each on its rows (as `models/moe.py`).
- Expert weights in MXFP4 (`*_blocks` / `*_scales`, `quantization_config.quant_method ==
  "mxfp4"`) stay 4-bit: repacked at load to `kernels/mxfp4.py`'s form and multiplied by
  `platform/mxfp4_linear.py` (dequantized per call, only for the experts a step selects). On
  CUDA `prepare_cuda` repacks each layer's experts into `kernels/triton_mxfp4_moe.py`'s aligned
  layout (still 4-bit) and the MoE runs its fused kernels (GEMV path for decode, grouped above;
  the default, `KVSERVE_MXFP4_MOE=packed`: batch-1 decode 3.456 ms/token at gpt-oss-20b shapes on
  an NVIDIA H200 against 8.683 with `KVSERVE_MXFP4_MOE=legacy`, the first kernel on the 17-byte
  blocks, still selectable).
  Unquantized checkpoints' experts take the platform's linear method like any projection.

Tensor parallelism: heads, KV heads and sinks split as for Llama; the router is replicated and
every rank holds a slice of every expert (gate/up rows, down columns: `intermediate / tp`); the
MoE output is a partial sum the next norm all-reduces, and o/down biases are added once (rank 0).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import torch
import torch.nn as nn

from kvserve.attention.base import AttentionMetadata
from kvserve.core.config import ModelConfig
from kvserve.distributed import parallel_state as ps
from kvserve.kernels import mxfp4
from kvserve.models.layers import RMSNorm, RotaryEmbedding, StepRope, WeightLoadError, yarn_attention_factor
from kvserve.models.linear import DenseLinearMethod, Linear, QuantizedTensor
from kvserve.models.llama import LlamaDecoderLayer, LlamaForCausalLM, set_attention_sizes
from kvserve.models.moe import expert_loop

if TYPE_CHECKING:
    from kvserve.platform.base import LayerBuilder

SLIDING = "sliding_attention"
_PER_EXPERT = re.compile(r"\.experts\.\d+\.(gate_proj|up_proj|down_proj)\.(weight|bias)$")


class GptOssAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, b: LayerBuilder, sliding: bool, scale: float) -> None:
        super().__init__()
        set_attention_sizes(self, cfg)
        self.scale = scale
        self.qkv_proj = b.linear(cfg.hidden_size, [self.q_size, self.kv_size, self.kv_size], bias=cfg.attention_bias)
        self.o_proj = b.linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.sinks = nn.Parameter(torch.empty(self.num_heads), requires_grad=False)  # [Hq] this rank's heads
        self.sliding_window = cfg.sliding_window if sliding else None
        self.backend = b.backend
        self.ops = b.ops

    def forward(self, rope: StepRope, x: torch.Tensor, kv_cache: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
        q, k, v, kv_written = self.ops.qkv_rope(
            self.qkv_proj, x, rope, (self.num_heads, self.num_kv_heads, self.head_dim), None, None,
            kv_cache, md.slot_mapping, self.backend.fuses_kv_write,
        )
        o = self.backend.forward(
            q, k, v, kv_cache, md, self.scale, self.sliding_window, kv_written=kv_written, sinks=self.sinks
        )
        return ps.row_parallel_linear(self.o_proj, o.reshape(x.shape[0], self.q_size))  # partial under TP


class GptOssExpert(nn.Module):
    """One expert's clamped-SwiGLU MLP (this rank's slice: `inter` = the expert's width / tp)."""

    def __init__(self, hidden: int, inter: int, b: LayerBuilder, alpha: float, limit: float, quantized: bool) -> None:
        super().__init__()
        make = b.mxfp4_linear if quantized else b.linear
        self.gate_up_proj = make(hidden, [inter, inter], bias=True)  # [gate ‖ up]
        self.down_proj = make(inter, hidden, bias=True)
        self.inter, self.alpha, self.limit = inter, alpha, limit

    def act(self, gu: torch.Tensor) -> torch.Tensor:  # [n, 2 * inter] (gate ‖ up) -> [n, inter]
        gate = gu[:, : self.inter].clamp(max=self.limit)
        up = gu[:, self.inter :].clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [n, hidden] -> [n, hidden]
        return self.down_proj(self.act(self.gate_up_proj(x)))


class GptOssMoE(nn.Module):
    def __init__(self, cfg: ModelConfig, b: LayerBuilder, quantized: bool) -> None:
        super().__init__()
        raw = cfg.raw
        self.num_experts = int(raw.get("num_local_experts") or raw.get("num_experts") or 0)
        self.top_k = int(raw.get("num_experts_per_tok", 4))
        if self.num_experts < 1:
            raise ValueError(f"num_local_experts must be >= 1 (got {self.num_experts})")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"num_experts_per_tok must be in [1, {self.num_experts}] (got {self.top_k})")
        tp = ps.get_tp().size
        if cfg.intermediate_size % tp:
            raise ValueError(f"tensor_parallel_size={tp} must divide the experts' MLP width ({cfg.intermediate_size})")
        alpha, limit = float(raw.get("swiglu_alpha", 1.702)), float(raw.get("swiglu_limit", 7.0))
        method = DenseLinearMethod()  # the router picks the experts: always dense, every rank alike
        method.ops = b.ops
        self.router = Linear(cfg.hidden_size, self.num_experts, True, method)
        self.ops = b.ops
        self.experts = nn.ModuleList(
            GptOssExpert(cfg.hidden_size, cfg.intermediate_size // tp, b, alpha, limit, quantized)
            for _ in range(self.num_experts)
        )
        self.alpha, self.limit = alpha, limit
        # CUDA with MXFP4 experts: the legacy kernel's stack of every expert's 17-byte blocks (the
        # per-expert layers keep views; KVSERVE_MXFP4_MOE=legacy), built on the first CUDA forward;
        # False where it does not apply.
        self.stacked: tuple[torch.Tensor, ...] | None | bool = None
        # The default: the experts repacked into the aligned layout (`triton_mxfp4_moe.pack`) by
        # `prepare_cuda` after loading (or on the first CUDA forward); False where it does not apply.
        self.packed: Any = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden]; a partial sum under TP
        logits = self.router(x)  # [T, E]
        if x.is_cuda:
            # The platform's routing (CUDA: one Triton launch, `triton_moe_decode.route`, instead of
            # topk + softmax as torch ops): softmax over all experts in fp32, the k largest,
            # renormalized, which is the softmax among the selected k (exp(l_i) / sum over the k).
            weights, ids = self.ops.route_experts(logits, self.top_k, True, logits.dtype)
        else:
            top, ids = torch.topk(logits, self.top_k, dim=-1)  # [T, k]
            weights = torch.softmax(top, dim=-1, dtype=top.dtype)  # among the selected k only
        if x.is_cuda:
            from kvserve.kernels import triton_mxfp4_moe as tm

            if tm.MOE_IMPL == "legacy" and not self.packed:
                stacked = self._stack()
                if stacked:
                    return tm.moe_mxfp4(x, ids, weights, *stacked, self.experts[0].act)
            elif self.prepare_cuda():
                return tm.fused_moe_mxfp4(x, ids, weights, self.packed, self.alpha, self.limit)
        return expert_loop(self.experts, x, weights, ids)

    def prepare_cuda(self) -> bool:
        """Repack every expert's MXFP4 blocks into `triton_mxfp4_moe.PackedExperts` on their
        device, one expert at a time, and release the per-expert 17-byte copies (the memory stays
        4.25 bits a weight; the per-expert layers are not called again on this path). True when
        the packed experts exist; once per layer, idempotent."""
        if self.packed is None:
            self.packed = False
            gu0 = self.experts[0].gate_up_proj
            if self.all_mxfp4() and not self.stacked and gu0.parts[0].data.is_cuda:
                from kvserve.kernels.triton_mxfp4_moe import pack_experts

                ex = self.experts
                gu = [e.gate_up_proj._buffers.get("qweight0", e.gate_up_proj.parts[0].data) for e in ex]
                dn = [e.down_proj._buffers.get("qweight0", e.down_proj.parts[0].data) for e in ex]
                gu_b = torch.stack([e.gate_up_proj.bias for e in ex])
                dn_b = torch.stack([e.down_proj.bias for e in ex])
                for e in ex:  # the lists hold the blocks now; pack_experts drops them one by one
                    for layer in (e.gate_up_proj, e.down_proj):
                        layer.parts[0].data = layer.parts[0].data.new_empty(0)
                        layer._buffers.pop("qweight0", None)
                self.packed = pack_experts(gu, gu_b, dn, dn_b, gu0.in_features, self.experts[0].inter, release=True)
        return bool(self.packed)

    def all_mxfp4(self) -> bool:
        """Every expert's projections are one MXFP4 part each (the grouped kernel applies)."""
        return all(
            isinstance(p.parts, list) and len(p.parts) == 1 and p.parts[0].qtype == mxfp4.MXFP4
            for ex in self.experts for p in (ex.gate_up_proj, ex.down_proj)
        )

    def _stack(self) -> tuple[torch.Tensor, ...] | None:
        """(gate/up blocks [E, 2I, H/32*17], their biases [E, 2I], down blocks [E, H, I/32*17],
        down biases [E, H]) when every expert is one MXFP4 part each; else None. The per-expert
        layers are re-pointed at views of the stacked tensors (no second copy)."""
        if self.stacked is None:
            self.stacked = False
            projs = [(ex.gate_up_proj, ex.down_proj) for ex in self.experts]
            if self.all_mxfp4():
                stacked = []
                for i in range(2):
                    layers = [pair[i] for pair in projs]
                    w = torch.stack([layer.parts[0].data for layer in layers])
                    for e, layer in enumerate(layers):
                        layer.parts[0].data = w[e]
                        layer.register_buffer("qweight0", w[e], persistent=False)
                    stacked += [w, torch.stack([layer.bias for layer in layers])]
                self.stacked = tuple(stacked)
        return self.stacked or None


class GptOssDecoderLayer(LlamaDecoderLayer):
    def __init__(self, cfg: ModelConfig, b: LayerBuilder, sliding: bool, scale: float, quantized: bool) -> None:
        nn.Module.__init__(self)
        self.self_attn = GptOssAttention(cfg, b, sliding, scale)
        self.mlp = GptOssMoE(cfg, b, quantized)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps, b.ops)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps, b.ops)


class GptOssForCausalLM(LlamaForCausalLM):
    def __init__(self, cfg: ModelConfig, b: LayerBuilder) -> None:
        qc = cfg.raw.get("quantization_config") or {}
        method = qc.get("quant_method")
        if method not in (None, "mxfp4"):
            raise ValueError(f"quantization_config.quant_method {method!r} is not supported for gpt-oss (only mxfp4)")
        self.mxfp4 = method == "mxfp4"
        super().__init__(cfg, b)
        self.decode_stack_builder = None

    def build_rotary(self, cfg: ModelConfig, b: LayerBuilder) -> RotaryEmbedding:
        return RotaryEmbedding(
            cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, max_positions=cfg.max_position_embeddings, ops=b.ops
        )

    def build_layers(self, cfg: ModelConfig, b: LayerBuilder) -> nn.ModuleList:
        # YaRN scales cos and sin by m: q.k gains m^2, which the softmax scale carries instead.
        scale = cfg.head_dim**-0.5 * yarn_attention_factor(cfg.rope_scaling) ** 2
        types = cfg.layer_types or (SLIDING,) * cfg.num_layers
        return nn.ModuleList(GptOssDecoderLayer(cfg, b, t == SLIDING, scale, self.mxfp4) for t in types)

    def _decode_stack(self, input_ids: torch.Tensor) -> Any:
        return None  # the one-call CPU stacks implement the dense Llama block only

    def prepare_cuda(self) -> None:
        """After loading on CUDA: repack every layer's MXFP4 experts for the Triton kernels."""
        from kvserve.kernels import triton_mxfp4_moe as tm

        if tm.MOE_IMPL != "legacy":
            for layer in self.layers:
                layer.mlp.prepare_cuda()

    @property
    def supports_cuda_graphs(self) -> bool:
        """MXFP4 experts run the Triton kernels (no host sync, so decode graphs capture);
        the per-expert loop of dense experts asks the host which experts were hit."""
        return all(layer.mlp.all_mxfp4() for layer in self.layers)

    def weight_shard(self, name: str, shape: tuple[int, ...]) -> tuple[int, int, int] | None:
        """Llama's slices, plus this rank's sinks; expert tensors (3-D/4-D, all experts at once)
        and the router are read whole (`_split_experts` cuts each expert to its slice)."""
        if not self.tp.enabled:
            return None
        if name.endswith("self_attn.sinks"):
            per = self.config.num_heads // self.tp.size
            return 0, self.tp.rank * per, per
        if ".mlp." in name:
            return None
        return super().weight_shard(name, shape)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(self._split_experts(weights))

    def _split_experts(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, Any]]:
        """gpt-oss's stacked expert tensors -> one (name, tensor) per expert projection, in the
        Llama names the fused loader knows (`experts.{e}.gate_proj.weight`, ...): gate/up
        de-interleaved (HF's columns alternate gate, up), [in, out] transposed to [out, in],
        each cut to this rank's slice; MXFP4 blocks/scales paired and kept 4-bit."""
        c, tp = self.config, self.tp
        inter = c.intermediate_size
        per = inter // tp.size
        lo = tp.rank * per
        pending: dict[str, torch.Tensor] = {}
        for name, t in weights:
            if ".mlp.experts." not in name:
                yield name, t
                continue
            prefix, leaf = name.rsplit(".", 1)  # "model.layers.i.mlp.experts", "gate_up_proj_blocks"
            per_expert = _PER_EXPERT.search(name)
            if per_expert is not None:  # already one expert's, gate and up split (a GGUF file)
                proj, kind = per_expert.groups()
                if proj == "down_proj":
                    t = t if kind == "bias" or per == t.shape[1] else t.narrow(1, lo, per)
                else:
                    t = QuantizedTensor(t.qtype, t.data[lo : lo + per], t.cols) if isinstance(t, QuantizedTensor) else t[lo : lo + per]
                yield name, t
            elif leaf.endswith(("_blocks", "_scales")):
                proj = leaf.rsplit("_", 1)[0]
                other = f"{prefix}.{proj}_{'scales' if leaf.endswith('_blocks') else 'blocks'}"
                if other not in pending:
                    pending[name] = t
                    continue
                mate = pending.pop(other)
                blocks, scales = (t, mate) if leaf.endswith("_blocks") else (mate, t)
                packed = mxfp4.from_gpt_oss(blocks, scales)  # [E, out, G * 17]
                cols = blocks.shape[-2] * mxfp4.BLOCK
                for e in range(packed.shape[0]):
                    w = QuantizedTensor(mxfp4.MXFP4, packed[e], cols)  # [out, in]
                    yield from self._expert_parts(prefix, e, proj, w, lo, per)
            elif leaf in ("gate_up_proj", "down_proj"):  # dense [E, in, out]
                for e in range(t.shape[0]):
                    yield from self._expert_parts(prefix, e, leaf, t[e].t(), lo, per)
            elif leaf == "gate_up_proj_bias":  # [E, 2 * inter], interleaved
                for e in range(t.shape[0]):
                    yield f"{prefix}.{e}.gate_proj.bias", t[e, 0::2][lo : lo + per]
                    yield f"{prefix}.{e}.up_proj.bias", t[e, 1::2][lo : lo + per]
            elif leaf == "down_proj_bias":  # [E, hidden]: row-parallel, added once (Llama's loader)
                for e in range(t.shape[0]):
                    yield f"{prefix}.{e}.down_proj.bias", t[e]
            else:
                raise WeightLoadError(f"unexpected gpt-oss expert tensor {name!r}")
        if pending:
            raise WeightLoadError(f"MXFP4 blocks without their scales (or scales without blocks): {sorted(pending)}")

    def _expert_parts(self, prefix: str, e: int, proj: str, w: Any, lo: int, per: int) -> Iterator[tuple[str, Any]]:
        """[out, in] weight of expert e's `proj` (dense or QuantizedTensor) -> its parts."""
        if proj == "gate_up_proj":
            yield f"{prefix}.{e}.gate_proj.weight", _rows(w, 0, lo, per)
            yield f"{prefix}.{e}.up_proj.weight", _rows(w, 1, lo, per)
        elif proj == "down_proj":
            yield f"{prefix}.{e}.down_proj.weight", w if per == w.shape[1] else w.narrow(1, lo, per)
        else:
            raise WeightLoadError(f"unexpected gpt-oss expert projection {proj!r}")


def _rows(w: Any, parity: int, lo: int, per: int) -> Any:
    """Rows parity, parity + 2, ... (gate or up of HF's interleaving), then [lo, lo + per)."""
    if isinstance(w, QuantizedTensor):
        return QuantizedTensor(w.qtype, w.data[parity::2][lo : lo + per], w.cols)
    return w[parity::2][lo : lo + per]
