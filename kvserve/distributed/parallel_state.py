"""This process's place in the tensor-parallel group, and the collectives the model uses.

One process per rank. The state is set once per process by `kvserve.distributed.launch`
(before the model is built) and read by the model's layers; at tensor_parallel_size 1 it is
`TPState()` (rank 0 of 1, no group) and every helper here is a no-op, so a single-device model
runs exactly the code it ran before tensor parallelism existed.

Two groups: `group` runs the model's collectives on the compute device (NCCL on CUDA, gloo on
CPU); `cpu_group` is always gloo and carries the per-step plan rank 0 broadcasts (pickled
Python objects, which NCCL cannot send without a device copy).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPState:
    rank: int = 0
    size: int = 1
    group: Any = None  # torch.distributed ProcessGroup of the model's collectives
    cpu_group: Any = None  # gloo group for the step plan
    one_shot: Any = None  # one_shot.OneShotAllReduce for small CUDA all-reduces, or None

    @property
    def enabled(self) -> bool:
        return self.size > 1


_STATE = TPState()


def get_tp() -> TPState:
    return _STATE


def set_tp(state: TPState) -> None:
    global _STATE
    _STATE = state


def reset_tp() -> None:
    set_tp(TPState())


@contextmanager
def single_rank() -> Iterator[None]:
    """Run as if alone (rank 0 of 1) inside the block: a model built and run here is whole on
    this rank and runs no collective (rank 0's draft model under tensor parallelism)."""
    saved = _STATE
    set_tp(TPState())
    try:
        yield
    finally:
        set_tp(saved)


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the ranks, in place (the row-parallel layers' one collective): through the
    one-shot symmetric-memory kernel when it is set up and `x` is small enough, else NCCL/gloo."""
    tp = _STATE
    if tp.size > 1 and not (tp.one_shot is not None and tp.one_shot(x)):
        dist.all_reduce(x, group=tp.group)
    return x


def row_parallel_linear(linear: Any, x: torch.Tensor) -> torch.Tensor:
    """`linear(x)` of a row-parallel projection: a partial sum under TP, to be reduced by the
    `all_reduce_rmsnorm` that comes next. On the fused path a one-row product also sends its
    output to every rank's all-reduce buffer as it is computed (`one_shot_norm.py`)."""
    tp = _STATE
    if tp.size > 1 and tp.one_shot is not None and tp.one_shot.norm is not None:
        out = tp.one_shot.norm.linear_push(linear, x)
        if out is not None:
            return out
    return linear(x)


def all_reduce_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, norm: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(sum + residual), sum + residual) where sum is `x` summed over the ranks; with
    `residual` None, (norm(sum), sum). `norm` is the layer's RMSNorm module. The pre-norm
    block's add-and-norm after a row-parallel projection: one kernel on the fused one-shot path
    (`one_shot_norm.py`), else the all-reduce followed by the norm. At TP=1 just the norm."""
    tp = _STATE
    if tp.size > 1:
        fused = tp.one_shot.norm if tp.one_shot is not None else None
        if fused is not None:
            done = fused(x, residual, norm.weight, norm.eps)
            if done is not None:
                return done
        x = all_reduce(x)
    if residual is None:
        return norm(x), x
    return norm.forward_with_residual(x, residual)


def gather_vocab(x: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[N, V/tp] logits of this rank's vocabulary shard -> [N, vocab_size] on every rank.

    An all-gather rather than a gather to rank 0: it is one NCCL collective that CUDA graphs
    capture, and for the few rows that sample its cost is the same.
    """
    tp = _STATE
    if tp.size == 1:
        return x
    n, v_local = x.shape
    out = torch.empty(tp.size * n, v_local, dtype=x.dtype, device=x.device)  # [tp * N, V/tp]
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x.contiguous(), group=tp.group)
    # Rank-major blocks of rows -> each row's vocabulary shards side by side.
    full = out.view(tp.size, n, v_local).permute(1, 0, 2).reshape(n, tp.size * v_local)
    return full[:, :vocab_size]


def vocab_shard(vocab_size: int, tp: TPState | None = None) -> tuple[int, int]:
    """(first row, rows per rank) of this rank's slice of a vocabulary-parallel table. Every
    rank holds the same number of rows (the last one padded) so logits gather evenly."""
    tp = tp or _STATE
    per = -(-vocab_size // tp.size)
    return tp.rank * per, per


def kv_head_shard(num_kv_heads: int, tp: TPState | None = None) -> tuple[int, int]:
    """(first KV head, KV heads) of this rank. With fewer KV heads than ranks each head is
    replicated on tp/num_kv_heads consecutive ranks: exactly the ranks whose query heads use it."""
    tp = tp or _STATE
    if num_kv_heads >= tp.size:
        per = num_kv_heads // tp.size
        return tp.rank * per, per
    return tp.rank // (tp.size // num_kv_heads), 1


def check_divisible(
    *, num_heads: int, num_kv_heads: int, intermediate_size: int, family: str, tp_size: int
) -> None:
    """Raise ValueError (naming tensor_parallel_size) if a model cannot be split `tp_size` ways."""
    if tp_size == 1:
        return
    name = f"tensor_parallel_size={tp_size}"
    if family not in ("llama", "moe", "gemma3", "phi3", "gpt_oss"):
        raise ValueError(
            f"{name}: tensor parallelism supports the Llama family, its MoE models (Qwen3-MoE, Mixtral), "
            f"Gemma 3, Phi-3 and gpt-oss only (not {family})"
        )
    if num_heads % tp_size:
        raise ValueError(f"{name} must divide the number of attention heads ({num_heads})")
    if num_kv_heads % tp_size and tp_size % num_kv_heads:
        raise ValueError(
            f"{name} must divide the number of KV heads ({num_kv_heads}) or be a multiple of it"
        )
    if intermediate_size % tp_size:
        raise ValueError(f"{name} must divide the MLP intermediate size ({intermediate_size})")
