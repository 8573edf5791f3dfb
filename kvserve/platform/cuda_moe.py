"""The fused MoE path on CUDA: each sparse layer's expert weights stacked into two tensors after
loading, so the Triton kernels (`kvserve/kernels/triton_moe.py`) index an expert by its id on
the GPU and a decode step never asks the host which experts were picked.

    w13 [E, 2I, H]: every expert's fused gate ‖ up rows;   w2 [E, H, I]: its down projection

Each expert's own `Linear` weights become views into the stacks (the memory is not doubled; a
layer's experts are copied once, one layer at a time), so the expert loop, tensor-parallel
slicing and parameter counts see the same tensors. Layers whose experts are not plain 16/32-bit
dense projections without bias (quantized formats) are left alone and keep the expert loop.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn as nn

from kvserve.models.linear import Linear

logger = logging.getLogger(__name__)

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)

# KVSERVE_MOE_DECODE's values: "fused" (the default), "fused-router" (opt-in: "fused" with the
# post-attention norm, the router projection and the routing in one launch), "fused-chain"
# ("fused-router", and the down kernel also does the next layer's add-and-norm) and "torch";
# "default" is "torch"'s old name (it was the default until an H200 run, 2026-12-07, timed
# "fused" faster) and still selects it.
MOE_DECODE_MODES = ("fused", "fused-router", "fused-chain", "torch", "default")


def moe_decode_mode() -> str:
    """`KVSERVE_MOE_DECODE`: "fused" (the default: the one-launch router of
    `kernels/triton_moe_decode.py` for every batch, and its PDL expert kernels for the decode
    batches the pairs path would take), "fused-router" ("fused", and for batches of up to
    `triton_moe_decode.NORM_ROUTE_MAX_ROWS` rows without tensor parallelism the post-attention
    add-and-RMSNorm, the router projection and the routing as one launch, `norm_route`),
    "fused-chain" ("fused-router", and where the decode expert kernels run, their down kernel
    also does the next layer's input add-and-RMSNorm, or the final norm) or "torch" (the routing
    as torch ops and the `triton_moe` pairs kernels; "default", its name before "fused" became
    the default, is accepted and returns "torch"). Read when the CUDA ops
    are built (one engine); any other value is an error naming the variable. Batches past
    `triton_moe.use_pairs` take the sorted path in every mode."""
    value = os.environ.get("KVSERVE_MOE_DECODE", "fused")
    if value not in MOE_DECODE_MODES:
        raise ValueError(f"KVSERVE_MOE_DECODE must be 'fused' (the default), 'fused-router', 'fused-chain', 'torch' "
                         f"or 'default' (an old name of 'torch') (got {value!r})")
    return "torch" if value == "default" else value


def moe_decode_tiles() -> tuple[tuple[int, int, int] | None, tuple[int, int, int, int] | None]:
    """`KVSERVE_MOE_DECODE_TILES`: tile configs of the decode expert kernels instead of
    `triton_moe_decode.gate_up_config` / `down_config`, as `BN,BK,WARPS/BN,BK,WARPS,PRE` (gate/up,
    then down; either side may be empty: its default), e.g. `4,1024,8/4,256,8,3`; unset or empty:
    both defaults. For A/B runs of `benchmarks/gpu_moe_bench.py --only sweep-decode` winners in the
    engine; read when the CUDA ops are built. A malformed value is an error naming the variable."""
    value = os.environ.get("KVSERVE_MOE_DECODE_TILES", "").strip()
    if not value:
        return None, None
    parts = value.split("/")
    if len(parts) != 2:
        raise ValueError(f"KVSERVE_MOE_DECODE_TILES must be 'BN,BK,WARPS/BN,BK,WARPS,PRE' (got {value!r})")

    def ints(text: str, n: int) -> tuple[int, ...] | None:
        if not text.strip():
            return None
        try:
            vals = tuple(int(v) for v in text.split(","))
        except ValueError:
            vals = ()
        pow2 = all(v > 0 and v & (v - 1) == 0 for v in vals[:3])
        if len(vals) != n or not pow2 or vals[2] > 16 or (n == 4 and not 0 <= vals[3] <= 4):
            raise ValueError(f"KVSERVE_MOE_DECODE_TILES: {text!r} is not {n} integers (BLOCK_N, BLOCK_K and "
                             f"warps powers of 2, warps <= 16{', PRE 0-4' if n == 4 else ''}) (got {value!r})")
        return vals

    return ints(parts[0], 3), ints(parts[1], 4)  # type: ignore[return-value]


def _plain(layer: object) -> bool:
    from kvserve.platform.cuda_quant import CudaQuantLinearMethod

    w = getattr(layer, "weight", None)
    return (
        isinstance(layer, Linear) and not isinstance(layer.method, CudaQuantLinearMethod) and layer.bias is None
        and isinstance(w, torch.Tensor) and w.dtype in _FLOATS and w.is_cuda
        and tuple(w.shape) == (layer.out_features, layer.in_features)
    )


def _stack(layers: list[Linear]) -> torch.Tensor:
    """[E, out, in] copy of the layers' weights; each layer's weight becomes its slice."""
    stacked = torch.stack([layer.weight for layer in layers])
    for i, layer in enumerate(layers):
        layer.weight = nn.Parameter(stacked[i], requires_grad=False)
    return stacked


def stack_experts(model: nn.Module) -> int:
    """Give every sparse layer whose experts qualify `stacked_experts = (w13, w2)` (what
    `CudaTritonOps.fused_moe` runs on); the number of such layers."""
    done = 0
    for module in model.modules():
        experts = getattr(module, "experts", None)
        if not isinstance(experts, nn.ModuleList) or len(experts) == 0:
            continue
        gate_up = [getattr(ex, "gate_up_proj", None) for ex in experts]
        down = [getattr(ex, "down_proj", None) for ex in experts]
        if not all(_plain(layer) for layer in gate_up + down):
            continue
        if len({(l.weight.shape, l.weight.dtype) for l in gate_up}) != 1 or len({l.weight.shape for l in down}) != 1:
            continue
        if gate_up[0].out_sizes != [down[0].in_features] * 2:
            continue
        module.stacked_experts = (_stack(gate_up), _stack(down))
        done += 1
    if done:
        logger.info("fused MoE: %d sparse layers' experts stacked for the Triton grouped GEMM", done)
    return done
