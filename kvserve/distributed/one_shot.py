"""One-shot all-reduce over PyTorch symmetric memory, for the small all-reduces of decode.

A decode step of a TP model makes two all-reduces per layer of a few KiB each (one row of the
hidden state per sequence). NCCL's ring/tree algorithms pay several microseconds of protocol
per call whatever the size, and at batch 1 those calls are a large part of a step once the
weight reads are split over the ranks. On GPUs of one host linked by NVLink/P2P, PyTorch's
symmetric memory (`torch.distributed._symmetric_memory`) maps one buffer of every rank into
every other rank's address space, and its `one_shot_all_reduce_copy_out` kernel does the whole
collective in one launch: copy the local input into this rank's buffer, a barrier over the
ranks' signal pads, then each rank reads and sums every peer's buffer directly, then a second
barrier so the buffer can be reused by the next call. One buffer per process, reused by every
call (the trailing barrier makes that safe); the kernel is a plain launch on the current
stream, so CUDA graphs capture it like any other kernel.

Used for tensors up to `max_bytes`; larger ones (prefill) and every other case go to NCCL.
Set `KVSERVE_TP_ALL_REDUCE=nccl` to use NCCL for everything. Start-up checks that all ranks
share one host and that symmetric memory works there (allocation, rendezvous, and a test sum
against the known answer); the ranks agree over the gloo group, so either all of them use it or
none does (a rank on the one-shot path and a rank on NCCL would wait for each other forever).
NVLink multicast (`multimem_*` ops) is deliberately not used.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

ENV = "KVSERVE_TP_ALL_REDUCE"  # "auto" (default) or "nccl"
NORM_ENV = "KVSERVE_TP_FUSED_NORM"  # "1" (default) or "0": all-reduce and RMSNorm as two kernels
# The buffer (per rank) and so the largest tensor sent this way. Decode graphs reach
# max_num_seqs rows: 256 rows of a 4096-wide bf16 hidden state are 2 MiB.
DEFAULT_MAX_BYTES = 2 << 20
_ALIGN = 16  # bytes: the kernel's vector width; input and buffer must share it


class OneShotAllReduce:
    """`__call__(x)` sums `x` over the ranks in place and returns True, or returns False
    (untouched) when `x` is not eligible, leaving the caller to use NCCL."""

    def __init__(self, group: Any, device: torch.device, max_bytes: int) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        self.group_name = group.group_name
        self.max_bytes = max_bytes
        enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
        if enable is not None and not hasattr(enable, "__deprecated__"):
            # Older PyTorch registers a group's store here, once per name: a new engine's
            # group reuses the name "0" of an earlier, destroyed one, so drop a stale entry.
            getattr(symm_mem, "_group_name_to_store", {}).pop(self.group_name, None)
            enable(self.group_name)
        self.buffer = symm_mem.empty(max_bytes, dtype=torch.uint8, device=device)
        symm_mem.rendezvous(self.buffer, group=self.group_name)
        self._op = torch.ops.symm_mem.one_shot_all_reduce_copy_out
        # All-reduce + residual add + RMSNorm in one kernel (one_shot_norm.py), set by create()
        # once every rank has it working; None: all-reduce here, then the separate norm.
        self.norm: Any = None

    def eligible(self, x: torch.Tensor) -> bool:
        # Every rank must decide the same for the same call, or one would wait in NCCL for a
        # peer waiting in this kernel: each test depends only on the shape, dtype, strides and
        # view offset (the caching allocator's blocks are 512-byte aligned), all equal on every
        # rank because every rank runs the same code on the same shapes.
        nbytes = x.numel() * x.element_size()
        return (
            x.is_cuda
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and 0 < nbytes <= self.max_bytes
            and nbytes % _ALIGN == 0
            and x.data_ptr() % _ALIGN == 0
            and x.is_contiguous()
        )

    def __call__(self, x: torch.Tensor) -> bool:
        if not self.eligible(x):
            return False
        # This rank's buffer viewed as x's shape and dtype (the kernel wants equal sizes).
        buf = self.buffer[: x.numel() * x.element_size()].view(x.dtype).view(x.shape)
        self._op(buf, x, "sum", self.group_name, x)
        return True


def _same_host(cpu_group: Any) -> bool:
    names: list[Any] = [None] * dist.get_world_size(cpu_group)
    dist.all_gather_object(names, socket.gethostname(), group=cpu_group)
    return len(set(names)) == 1


def _agree(ok: bool, cpu_group: Any) -> bool:
    """True only if every rank says True (a MIN over the gloo group)."""
    t = torch.tensor([1 if ok else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=cpu_group)
    return bool(t.item())


# Set once a group of this process used symmetric memory. PyTorch keeps per-process state
# keyed by group name, and a later engine's group (a new store, the same name "0") would
# rendezvous against the stale one while its freshly spawned peers use the new one: a hang.
# So a second TP engine in one process (tests do that) stays on NCCL.
_USED_IN_THIS_PROCESS = False


def decide(cpu_group: Any) -> tuple[bool, str | None]:
    """(use symmetric memory, why not): the same answer on every rank. Collective over the
    gloo group; every rank runs the same collectives in the same order whatever it finds
    locally (a rank that skipped one would leave its peers waiting in it)."""
    choice = os.environ.get(ENV, "auto").strip().lower()
    if choice not in ("auto", "nccl"):
        raise ValueError(f"{ENV}={choice!r}: expected 'auto' or 'nccl'")
    _norm_choice()  # checked here too: before any collective
    same_host = _same_host(cpu_group)
    reason = None
    if choice == "nccl":
        reason = f"{ENV}=nccl"
    elif _USED_IN_THIS_PROCESS:
        reason = "an earlier engine of this process set symmetric memory up (it is set up once per process)"
    elif not same_host:
        reason = "the ranks are on different hosts"
    else:
        try:
            import torch.distributed._symmetric_memory  # noqa: F401

            if not hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy_out"):
                reason = "this PyTorch has no symm_mem.one_shot_all_reduce_copy_out"
        except (ImportError, AttributeError, RuntimeError) as e:
            reason = f"symmetric memory is unavailable ({e})"
    if not _agree(reason is None, cpu_group):
        return False, reason or "another rank cannot use symmetric memory"
    return True, None


def create(group: Any, cpu_group: Any, device: torch.device, max_bytes: int = DEFAULT_MAX_BYTES):
    """The one-shot all-reduce for this rank, or None (NCCL only) with one log line saying why.
    Collective: every rank of the group must call it, in the same order as the other start-up
    collectives."""
    global _USED_IN_THIS_PROCESS
    if device.type != "cuda":
        return None
    ok, reason = decide(cpu_group)
    if not ok:
        logger.info("tensor parallel: all-reduce on NCCL (%s)", reason)
        return None
    _USED_IN_THIS_PROCESS = True
    ar = None
    try:
        ar = OneShotAllReduce(group, device, max_bytes)
        # A test sum with a known answer: rank r contributes r + 1 everywhere.
        size = dist.get_world_size(group)
        x = torch.full((4, 1024), float(dist.get_rank(group) + 1), dtype=torch.bfloat16, device=device)
        if not ar(x):
            raise RuntimeError("the test tensor was not eligible")
        torch.cuda.synchronize(device)
        if not bool((x == size * (size + 1) / 2).all()):
            raise RuntimeError("test all-reduce gave a wrong sum")
    except Exception as e:  # noqa: BLE001 - any failure means: use NCCL
        reason = f"symmetric memory failed here: {type(e).__name__}: {e}"
        ar = None
    if not _agree(ar is not None, cpu_group):
        logger.warning("tensor parallel: all-reduce on NCCL (%s)", reason or "symmetric memory failed on another rank")
        return None
    ar.norm = _create_norm(group, cpu_group, device, max_bytes)
    logger.info("tensor parallel: one-shot all-reduce over symmetric memory for tensors up to %d KiB%s",
                max_bytes >> 10, ", fused with the following RMSNorm" if ar.norm is not None else "")
    return ar


def _norm_choice() -> bool:
    """KVSERVE_TP_FUSED_NORM: True for "1" (default), False for "0"; anything else is an error."""
    choice = os.environ.get(NORM_ENV, "1").strip()
    if choice not in ("0", "1"):
        raise ValueError(f"{NORM_ENV}={choice!r}: expected '1' or '0'")
    return choice == "1"


def _create_norm(group: Any, cpu_group: Any, device: torch.device, max_bytes: int):
    """The fused all-reduce + RMSNorm (one_shot_norm.py), or None. Collective, in stages that
    every rank runs and agrees on (set-up, compile, a test call against the known answer), so
    that no rank launches the kernel, which waits for its peers' rows, unless all can."""
    if not _agree(_norm_choice(), cpu_group):
        logger.info("tensor parallel: all-reduce and RMSNorm stay separate (%s=0)", NORM_ENV)
        return None
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    x = torch.full((2, 1000), float(rank + 1), dtype=torch.bfloat16, device=device)
    res = torch.ones_like(x)
    w = torch.ones(1000, dtype=torch.bfloat16, device=device)
    made: list[Any] = []

    def set_up() -> None:
        from kvserve.distributed.one_shot_norm import AllReduceRMSNorm

        made.append(AllReduceRMSNorm(group.group_name, size, device, max_bytes))

    def test_call() -> None:
        want = size * (size + 1) / 2 + 1
        for _ in range(4):  # every buffer slot, and one reuse
            out, summed = made[0](x, res, w, 1e-6)
        torch.cuda.synchronize(device)
        if not bool((summed == want).all()) or not bool(((out.float() - 1).abs() < 1e-2).all()):
            raise RuntimeError("test all-reduce + RMSNorm gave a wrong result")

    for stage in (set_up, lambda: made[0].compile(x, res, w), test_call):
        reason = None
        try:
            stage()
        except Exception as e:  # noqa: BLE001 - any failure: the unfused path
            reason = f"{type(e).__name__}: {e}"
        if not _agree(reason is None, cpu_group):
            logger.warning("tensor parallel: all-reduce and RMSNorm stay separate (%s)", reason or "another rank")
            return None
    return made[0]
