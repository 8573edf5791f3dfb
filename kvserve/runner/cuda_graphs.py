"""CUDA graphs for pure-decode steps, one per batch size of a ladder.

A decode step of a small model is hundreds of short kernels; launched one by one from Python
the GPU idles between them. Each graph replays a whole step (forward + logits) from static
input buffers: token ids, positions, cache slots, sequence lengths, block tables (and
`query_start_loc`, which is always 0..B for decodes). A batch of B decodes runs the graph of the
next ladder size >= B; the padding rows get slot -1 (no cache write, `has_padding=True`) and
sequence length 0 (the decode kernel writes zeros for them), and their logits are ignored.

Ladder: 1, 2, 4, 8, 16, then every 32 up to max_num_seqs (at most 512): padding wastes at most
31 rows of matmul work per step, and 256 sequences need 13 graphs. All graphs share one memory
pool (captured largest first, so smaller ones reuse its memory): only one runs at a time and
its output is consumed before the next replay.
"""

from __future__ import annotations

import bisect
import logging
import time
from typing import TYPE_CHECKING, Callable

import torch

from kvserve.attention.base import AttentionMetadata

if TYPE_CHECKING:
    from kvserve.runner.inputs import HostTables, _Buffers
    from kvserve.runner.model_runner import ModelRunner, _ReqState

logger = logging.getLogger(__name__)

# Above any context length: the eager warm-up then plans the same split count as the capture,
# which ignores context lengths (see TritonBackend._plan).
_PLAN_SEQ_LEN = 1 << 30


def ladder(max_bs: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8, 16) if s < max_bs] + list(range(32, max_bs, 32))
    return sizes + [max_bs]


class _EagerGraph:
    """Stand-in for a captured graph that reruns the step eagerly (CPU tests of the padding
    and static-buffer logic, where CUDA graphs do not exist)."""

    def __init__(self, fn: Callable[[], torch.Tensor]) -> None:
        self.fn = fn
        self.output = fn()

    def replay(self) -> None:
        self.output.copy_(self.fn())


class DecodeGraphs:
    def __init__(self, runner: ModelRunner, max_bs: int, eager: bool = False) -> None:
        self.runner = runner
        self.max_bs = max_bs
        self.sizes = ladder(max_bs)
        self.eager = eager
        dev = runner.device
        width = runner.max_blocks_per_seq
        self.width = width
        # Static inputs. ids | positions | slots in one int64 buffer so one copy fills them.
        self.i64 = torch.zeros(3 * max_bs, dtype=torch.int64, device=dev)
        self.seq_lens = torch.zeros(max_bs, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(max_bs + 1, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(max_bs, width, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph | _EagerGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def padded_size(self, n: int) -> int | None:
        i = bisect.bisect_left(self.sizes, n)
        return self.sizes[i] if i < len(self.sizes) else None

    def _metadata(self, bs: int) -> AttentionMetadata:
        m = self.max_bs
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs],
            slot_mapping=self.i64[2 * m : 2 * m + bs],
            max_query_len=1,
            max_seq_len=_PLAN_SEQ_LEN,
            query_start_loc_cpu=list(range(bs + 1)),
            seq_lens_cpu=[1] * bs,
            block_size=self.runner.block_size,
            is_pure_decode=True,
            has_padding=True,
        )

    def _step(self, bs: int) -> torch.Tensor:
        """Forward + logits for the first `bs` static rows: [bs, vocab] fp32."""
        m = self.max_bs
        r = self.runner
        hidden = r.model(self.i64[:bs], self.i64[m : m + bs], r.kv_caches, self._metadata(bs))
        return r.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        t0 = time.perf_counter()
        m = self.max_bs
        # Slot -1 everywhere: warm-up and capture never write the KV cache.
        self.i64.zero_()
        self.i64[2 * m :].fill_(-1)
        self.seq_lens.zero_()
        if self.eager:
            for bs in self.sizes:
                self.graphs[bs] = _EagerGraph(lambda bs=bs: self._step(bs))
                self.outputs[bs] = self.graphs[bs].output
            return
        pool = torch.cuda.graph_pool_handle()
        free_before = torch.cuda.mem_get_info()[0]
        for bs in reversed(self.sizes):
            self._step(bs)  # warm-up: compiles kernels, creates cuBLAS workspaces, rope table
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._step(bs)
            self.graphs[bs] = graph
            self.outputs[bs] = out
        torch.cuda.synchronize()
        logger.info(
            "captured %d decode CUDA graphs (batch sizes %s) in %.1fs using %.2f GiB",
            len(self.sizes), self.sizes, time.perf_counter() - t0,
            (free_before - torch.cuda.mem_get_info()[0]) / 2**30,
        )

    def load_inputs(
        self, buf: _Buffers, states: list[_ReqState], bs: int, tables: HostTables, block_size: int
    ) -> None:
        """Fill the static inputs for `len(states)` decodes padded to `bs` (copies queued)."""
        n = len(states)
        m = self.max_bs
        starts = [st.num_computed_tokens for st in states]
        width = max(p // block_size for p in starts) + 1
        i64, i32 = buf.host(3 * m, bs + n * width)
        i64[:n] = [st.token_ids[p] for st, p in zip(states, starts)]
        i64[n:bs] = 0
        pos = i64[m : m + n]
        pos[:] = starts
        i64[m + n : m + bs] = 0
        rows = [st.row for st in states]
        blocks = tables.table[rows, pos // block_size]
        i64[2 * m : 2 * m + n] = blocks * block_size + pos % block_size
        i64[2 * m + n : 2 * m + bs] = -1
        i32[:n] = pos + 1
        i32[n:bs] = 0
        i32[bs:].reshape(n, width)[:] = tables.table[rows, :width]
        src64, src32 = buf.i64[: 3 * m], buf.i32[: bs + n * width]
        self.i64.copy_(src64, non_blocking=True)
        self.seq_lens[:bs].copy_(src32[:bs], non_blocking=True)
        slab = src32[bs:].view(n, width)
        if width == self.width:
            self.block_tables[:n].copy_(slab, non_blocking=True)
        else:
            # Pinned -> contiguous device copy, then a strided device copy into the static table.
            self.block_tables[:n, :width].copy_(slab.to(self.i64.device, non_blocking=True))

    def replay(self, bs: int) -> torch.Tensor:
        self.graphs[bs].replay()
        return self.outputs[bs]
