"""Host-side step inputs: the runner's block table and double-buffered pinned staging memory.

A step's integer inputs are written into numpy views of pinned host tensors and sent to the
GPU with non-blocking copies (one per dtype); the sampled ids come back the same way. Two sets
of buffers alternate between steps, so the host can fill step N+1's inputs while step N's
copies may still be queued behind the GPU's work. Before a set is refilled, the event recorded
after its last use (its upload, or the download of the sampled ids after it) is waited on. At
most two steps are in flight (a step and the ahead step behind it) and the engine reads a step
before it launches the one two after it, so on rank 0 the wait returns at once; a
tensor-parallel worker, which reads nothing, waits there for its GPU to catch up.
"""

from __future__ import annotations

import numpy as np
import torch


class HostTables:
    """Block ids of every running request, one reusable row each ([rows, width] int32).

    A row is zeroed when handed out and then only appended to, so entries past a request's
    last block are always 0 (as `AttentionMetadata.block_tables` promises)."""

    def __init__(self, rows: int, width: int) -> None:
        self.table = np.zeros((rows, width), dtype=np.int32)
        self._free = list(range(rows - 1, -1, -1))

    def acquire(self) -> int:
        if not self._free:  # more live requests than expected (e.g. n > 1 fan-out): grow
            old = self.table.shape[0]
            self.table = np.concatenate([self.table, np.zeros_like(self.table)])
            self._free = list(range(2 * old - 1, old - 1, -1))
        row = self._free.pop()
        self.table[row] = 0
        return row

    def release(self, row: int) -> None:
        self._free.append(row)

    def set_blocks(self, row: int, start: int, block_ids: list[int]) -> None:
        if start + len(block_ids) > self.table.shape[1]:
            raise ValueError(
                f"a request holds {start + len(block_ids)} blocks, more than max_model_len allows "
                f"({self.table.shape[1]})"
            )
        self.table[row, start : start + len(block_ids)] = block_ids


class _Buffers:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pin = device.type == "cuda"
        self.i64 = self._alloc(1 << 14, torch.int64)
        self.i32 = self._alloc(1 << 14, torch.int32)
        # numpy views of the whole buffers, made once: slicing them is cheaper than slicing the
        # tensors and converting every step (that counts in a CPU decode step)
        self.np64, self.np32 = self.i64.numpy(), self.i32.numpy()
        self.tokens = self._alloc(1024, torch.int64)
        self.n64 = self.n32 = 0
        self.event: torch.cuda.Event | None = None

    def _alloc(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(n, dtype=dtype, pin_memory=self.pin)

    def host(self, n64: int, n32: int) -> tuple[np.ndarray, np.ndarray]:
        """Writable numpy views of the first n64 int64 and n32 int32 staging elements."""
        if n64 > self.i64.numel():
            self.i64 = self._alloc(max(n64, 2 * self.i64.numel()), torch.int64)
            self.np64 = self.i64.numpy()
        if n32 > self.i32.numel():
            self.i32 = self._alloc(max(n32, 2 * self.i32.numel()), torch.int32)
            self.np32 = self.i32.numpy()
        self.n64, self.n32 = n64, n32
        return self.np64[:n64], self.np32[:n32]

    def upload(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Device copies of what `host()` handed out (queued, not waited for)."""
        if self.device.type != "cuda":
            # CPU runs are synchronous: the step is done before this set is refilled.
            return self.i64[: self.n64], self.i32[: self.n32]
        d64 = torch.empty(self.n64, dtype=torch.int64, device=self.device)
        d32 = torch.empty(self.n32, dtype=torch.int32, device=self.device)
        d64.copy_(self.i64[: self.n64], non_blocking=True)
        d32.copy_(self.i32[: self.n32], non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record()
        return d64, d32

    def download(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """Queue the copy of the sampled ids [N] into pinned memory; the event marks its end."""
        if self.device.type != "cuda":
            return tokens, None
        n = tokens.numel()
        if n > self.tokens.numel():
            self.tokens = self._alloc(max(n, 2 * self.tokens.numel()), torch.int64)
        host = self.tokens[:n]
        host.copy_(tokens, non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record()
        return host, self.event


class StagingBuffers:
    """Two `_Buffers` used alternately, step after step."""

    def __init__(self, device: torch.device) -> None:
        self._sets = (_Buffers(device), _Buffers(device))
        self._i = 0

    def next(self) -> _Buffers:
        buf = self._sets[self._i]
        self._i ^= 1
        if buf.event is not None:
            # Its last step's copies are done once that step's ids were read: no real wait.
            buf.event.synchronize()
            buf.event = None
        return buf
