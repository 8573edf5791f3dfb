"""The whole decoder stack of a CPU bf16 decode step in one C call (`csrc/decoder_stack_bf16.c`).

Batch-1 decode on a CPU reads every weight once per token; everything else is overhead. Op by
op, a Llama layer's decode makes eight C-kernel calls from Python (norm, qkv, RoPE, attention,
o, norm, gate/up, down), each with its ctypes marshalling, an output allocation and an OpenMP
team start: about 5 ms per token over 30 layers of SmolLM2, a third of the step. Here one
call runs every layer inside one OpenMP region. Its phases are the very code of the one-op
kernels, so the tokens are bit-identical to the op-by-op path.

It applies to a Llama-family model in bf16 on a CPU with the kernels (AVX512-BF16), without
tensor parallelism, q/k norm or MLP biases (qkv and o biases are supported), head_dim <= 128,
with every projection on the bf16 oneDNN method holding its plain weight for the GEMV kernel
(`platform/cpu_linear.py`); and to steps of at most
`cpu_kernels.MAX_ROWS` decode rows whose layers all use the torch_ref backend (a trace that
wraps one layer's backend sends the step down the op-by-op path). Everything else runs the
modules as usual.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from kvserve.attention.base import AttentionMetadata
from kvserve.attention.torch_ref import TorchRefBackend
from kvserve.models import cpu_kernels

logger = logging.getLogger(__name__)

# Column order of the per-layer pointer table (the enum in decoder_stack_bf16.c).
_INPUT_NORM, _QKV_W, _QKV_B, _O_W, _O_B, _POST_NORM, _GATE_UP_W, _DOWN_W, _K_CACHE, _V_CACHE = range(10)
_NUM_PTRS = 10


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def decode_step_fits(
    input_ids: torch.Tensor, md: AttentionMetadata, max_rows: int, attn: list[nn.Module]
) -> bool:
    """A step a one-call decoder stack can run: all decodes, each with a cached context, at most
    `max_rows` of them, with the runner's contiguous int32 / int64 inputs, and every layer still
    on the torch_ref backend the stack stands in for (a trace wraps one layer's backend)."""
    if (
        input_ids.shape[0] > max_rows
        or not md.is_pure_decode
        or md.has_padding
        or min(md.seq_lens_cpu) < 2  # a one-token prompt is a prefill to the backend
    ):
        return False
    tables, lens, slots = md.block_tables, md.seq_lens, md.slot_mapping
    if not (
        input_ids.dtype == torch.int64 and input_ids.is_contiguous()
        and tables.dtype == torch.int32 and tables.is_contiguous() and lens.dtype == torch.int32
        and lens.is_contiguous() and slots.dtype == torch.int64 and slots.is_contiguous()
    ):
        return False
    return all(type(a.backend) is TorchRefBackend for a in attn)


class DecoderStack:
    """A model's layers as one C call. `build` returns None (saying why at debug level) where
    the stack does not apply; `applies` checks one step; calling it runs the step."""

    max_rows = cpu_kernels.MAX_ROWS

    def __init__(self, model: nn.Module) -> None:
        cfg = model.config
        self.rotary = model.rotary
        self.num_layers = len(model.layers)
        self.hidden, self.inter = cfg.hidden_size, cfg.intermediate_size
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.eps = cfg.norm_eps
        attn0 = model.layers[0].self_attn
        self.scale, self.window = attn0.scale, attn0.sliding_window or 0
        self.attn = [layer.self_attn for layer in model.layers]
        self.final_norm = model.norm.weight
        self.embed = model.embed_tokens.weight  # [vocab, hidden]
        # [layers, 10] int64: weight pointers now, cache pointers once the caches are known.
        # The model's parameters keep the weights alive; the table is rebuilt if caches change.
        self.table = torch.zeros((self.num_layers, _NUM_PTRS), dtype=torch.int64)
        for i, layer in enumerate(model.layers):
            a, mlp = layer.self_attn, layer.mlp
            row = self.table[i]
            row[_INPUT_NORM] = _ptr(layer.input_layernorm.weight)
            row[_QKV_W], row[_QKV_B] = _ptr(a.qkv_proj.weight), _ptr(a.qkv_proj.bias)
            row[_O_W], row[_O_B] = _ptr(a.o_proj.weight), _ptr(a.o_proj.bias)
            row[_POST_NORM] = _ptr(layer.post_attention_layernorm.weight)
            row[_GATE_UP_W], row[_DOWN_W] = _ptr(mlp.gate_up_proj.weight), _ptr(mlp.down_proj.weight)
        self._caches_key: tuple[int, ...] | None = None
        self._lib = cpu_kernels.library()
        n = self._lib.kv_decoder_stack_scratch(
            cpu_kernels.MAX_ROWS, self.hidden, self.num_heads, self.num_kv_heads, self.head_dim, self.inter
        )
        self.scratch = torch.empty(n, dtype=torch.bfloat16)
        self.num_steps = 0  # steps run by this stack (tests, stats)

    @classmethod
    def build(cls, model: nn.Module) -> DecoderStack | None:
        reason = cls._unsupported(model)
        if reason is not None:
            logger.debug("one-call CPU decoder stack not used: %s", reason)
            return None
        return cls(model)

    @staticmethod
    def _unsupported(model: nn.Module) -> str | None:
        """Why the stack can't run this model, or None."""
        cfg = model.config
        if cfg.family != "llama":
            return f"the {cfg.family} family"
        if any(p.dtype != torch.bfloat16 or p.device.type != "cpu" for p in model.parameters()):
            return "not a bf16 CPU model"
        if cpu_kernels.library() is None:
            return "no CPU C kernels"
        if model.tp.enabled:
            return "tensor parallelism"
        if cfg.qk_norm or cfg.mlp_bias:
            return "q/k norm or MLP bias"
        if cfg.head_dim > 128 or cfg.head_dim % 2:
            return f"head_dim {cfg.head_dim}"
        windows = {layer.self_attn.sliding_window for layer in model.layers}
        if len(windows) != 1:
            return "per-layer sliding windows"
        for layer in model.layers:
            linears = (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)
            if not all(getattr(m, "gemv", None) is not None and m.weight is not None for m in linears):
                return "linears are not prepacked with plain weights for the GEMV kernel"
        return None

    def applies(self, input_ids: torch.Tensor, kv_caches: list[torch.Tensor], md: AttentionMetadata) -> bool:
        """This step is one the stack can run (`decode_step_fits`) and the caches are bf16."""
        if not decode_step_fits(input_ids, md, cpu_kernels.MAX_ROWS, self.attn):
            return False
        key = tuple(c.data_ptr() for c in kv_caches)
        if key != self._caches_key:
            return self._set_caches(kv_caches, key)
        return True

    def _set_caches(self, kv_caches: list[torch.Tensor], key: tuple[int, ...]) -> bool:
        shape = (self.num_kv_heads, self.head_dim)
        if len(kv_caches) != self.num_layers or not all(
            c.dtype == torch.bfloat16 and c.is_contiguous() and tuple(c.shape[3:]) == shape for c in kv_caches
        ):
            return False
        for i, c in enumerate(kv_caches):
            self.table[i, _K_CACHE] = c.data_ptr()
            self.table[i, _V_CACHE] = c[1].data_ptr()
        self.block_size = kv_caches[0].shape[2]
        self._caches_key = key
        return True

    def __call__(
        self,
        input_ids: torch.Tensor,  # [M] int64
        positions: torch.Tensor,  # [M] int64
        md: AttentionMetadata,
    ) -> torch.Tensor:  # [M, hidden]: the final norm's output, as the model's forward returns
        rope = self.rotary.for_step(positions, torch.bfloat16)  # cos and sin_signed [M, 1, D] bf16
        m = input_ids.shape[0]
        out = torch.empty((m, self.hidden), dtype=torch.bfloat16)
        # [M, width] block tables, [M] lengths and slots: the step's sequences are its decodes, in order
        tables, lens, slots = md.block_tables, md.seq_lens, md.slot_mapping
        # (rope's cos and sin_signed are fresh contiguous tensors from RotaryEmbedding.for_step)
        rc = self._lib.kv_decoder_stack_bf16(
            self.table.data_ptr(), self.num_layers, input_ids.data_ptr(), self.embed.data_ptr(),
            self.embed.shape[0], self.final_norm.data_ptr(), out.data_ptr(), rope.cos.data_ptr(),
            rope.sin_signed.data_ptr(), tables.data_ptr(), tables.stride(0), lens.data_ptr(), slots.data_ptr(),
            self.scratch.data_ptr(), m, self.hidden, self.num_heads, self.num_kv_heads, self.head_dim,
            self.inter, self.block_size, self.scale, self.window, self.eps,
        )
        if rc == -2:
            raise IndexError(f"token id out of range in {input_ids.tolist()}")
        if rc != 0:
            raise MemoryError("decoder stack: scratch allocation failed")
        self.num_steps += 1
        return out
