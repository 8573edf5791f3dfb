"""CUDA graphs for pure-decode steps, one per batch size of a ladder.

A decode step of a small model is hundreds of short kernels; launched one by one from Python
the GPU idles between them. Each graph replays a whole step (forward + logits) from static
input buffers: token ids, positions, cache slots, sequence lengths, block tables (and
`query_start_loc`, which is always 0..B for decodes). A batch of B decodes runs the graph of the
next ladder size >= B; the padding rows get slot -1 (no cache write, `has_padding=True`) and
sequence length 0 (the decode kernel writes zeros for them), and their logits are ignored.

A step is captured as several graphs, cut before layers 1, 2, 4, 8, ... and replayed one after
another: the host's launch of a graph costs time in proportion to its kernels (hundreds per
step), and the GPU starts on the first small graph while the host still launches the rest, so a
batch-1 decode no longer waits for the launch of the whole step after every sampled token.
`KVSERVE_GRAPH_SPLIT=0` captures one graph per step instead; so does an engine with asynchronous
scheduling, whose host launches a step while the previous one runs (the pieces only add launch
gaps then).

Ladder: 1, 2, 4, 8, 16, then every 32 up to max_num_seqs (at most 512): padding wastes at most
31 rows of matmul work per step, and 256 sequences need 13 graphs. All graphs share one memory
pool (captured largest first, so smaller ones reuse its memory): only one runs at a time and
its output is consumed before the next replay.

Speculative decoding: a verify step enters each of a request's k + 1 positions as a one-token
row of the same block table (spec_decode/verify_step.py), so a verify step of B requests is a
decode step of B(k + 1) rows and replays the graph of that row count: the K/V of all rows is
written before attention reads, so each row sees the drafts before it. With `verify_width`
(k + 1) the ladder also holds b(k + 1) for each ladder size b (a graph per batch size and
verify width; shorter drafts after a back-off pad to the next size) and reaches `max_rows`,
the most rows a step of `max_bs` requests with drafts can have.

Verify rows of one request read the same keys: the graphs a verify step replays pass
`AttentionMetadata.verify_groups` (a static input, filled per step from which rows belong to
one request), so the attention backend reads each K/V tile once for all of a request's rows
(`attention/triton/verify.py`) and plans its splits for the requests, not the rows. Those are
the ladder's verify sizes that are not plain decode sizes, and for the plain decode sizes from
k + 1 to 32 rows a second, grouped graph (`replay(bs, verify=True)`): plain decode steps keep
the per-row kernel and its split plan. Larger plain sizes (rarely a verify step's, and with
one split per row there) stay per row. Set `KVSERVE_VERIFY_ATTN=rows` to keep the per-row
kernel everywhere (for comparisons).
"""

from __future__ import annotations

import bisect
import gc
import logging
import os
import time
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from kvserve.attention.base import AttentionMetadata

if TYPE_CHECKING:
    from kvserve.runner.inputs import HostTables, _Buffers
    from kvserve.runner.model_runner import ModelRunner, _ReqState

logger = logging.getLogger(__name__)

# Above any context length: the eager warm-up then plans the same split count as the capture,
# which ignores context lengths (see TritonBackend._plan).
_PLAN_SEQ_LEN = 1 << 30


def ladder(max_bs: int, verify_width: int = 1, max_rows: int | None = None) -> list[int]:
    """Graph row counts: the decode ladder up to `max_bs`, plus, when verify steps have
    `verify_width` rows per request, each size times that width up to `max_rows`."""
    sizes = [s for s in (1, 2, 4, 8, 16) if s < max_bs] + list(range(32, max_bs, 32)) + [max_bs]
    if verify_width > 1:
        top = max_rows if max_rows is not None else max_bs * verify_width
        sizes = sorted({*sizes, *(b * verify_width for b in sizes if b * verify_width <= top), top})
    return sizes


def verify_attn_grouped() -> bool:
    """`KVSERVE_VERIFY_ATTN`: "grouped" (default) or "rows" (see the module docstring)."""
    value = os.environ.get("KVSERVE_VERIFY_ATTN", "grouped")
    if value not in ("grouped", "rows"):
        raise ValueError(f"KVSERVE_VERIFY_ATTN must be 'grouped' or 'rows', got {value!r}")
    return value == "grouped"


def verify_groups(req_rows: np.ndarray, width: int) -> np.ndarray:
    """`AttentionMetadata.verify_groups` of a step whose row i belongs to request `req_rows[i]`:
    runs of equal consecutive entries (a request's verify rows) form groups of at most `width`
    rows; a group's first row holds its row count, the others -(their offset from it)."""
    n = len(req_rows)
    if n == 0:
        return np.zeros(0, dtype=np.int32)
    req_rows = np.asarray(req_rows)
    idx = np.arange(n)
    start = np.ones(n, dtype=bool)
    start[1:] = req_rows[1:] != req_rows[:-1]
    starts = np.flatnonzero(start)
    run = np.cumsum(start) - 1  # run id of each row
    offset = idx - starts[run]  # offset within its run
    run_len = np.diff(np.append(starts, n))[run]
    within = offset % width  # offset within its group (runs cut every `width` rows)
    group_len = np.minimum(width, run_len - (offset - within))
    return np.where(within == 0, group_len, -within).astype(np.int32)


# Plain decode sizes up to this many rows get a grouped twin for verify steps (module docstring).
TWIN_MAX_ROWS = 32


class _EagerGraph:
    """Stand-in for a captured graph that reruns the step eagerly (CPU tests of the padding
    and static-buffer logic, where CUDA graphs do not exist)."""

    def __init__(self, fn: Callable[[], torch.Tensor]) -> None:
        self.fn = fn
        self.output = fn()

    def replay(self) -> None:
        self.output.copy_(self.fn())


class _SplitGraph:
    """One decode step captured as several graphs, replayed in capture order."""

    def __init__(self, graphs: list[torch.cuda.CUDAGraph]) -> None:
        self.parts = graphs

    def replay(self) -> None:
        for g in self.parts:
            g.replay()


class DecodeGraphs:
    def __init__(
        self, runner: ModelRunner, max_bs: int, eager: bool = False, split: bool | None = None,
        verify_width: int = 1, max_rows: int | None = None, group_verify: bool | None = None,
    ) -> None:
        """`max_bs`: the most decoding requests; `verify_width` (k + 1) and `max_rows` (the
        most rows of a verify step) add the verify steps' sizes (see the module docstring).
        `group_verify`: verify sizes attend a request's rows together (default:
        `KVSERVE_VERIFY_ATTN`)."""
        self.runner = runner
        if split is None:
            split = os.environ.get("KVSERVE_GRAPH_SPLIT", "1") != "0"
        self.split = split
        if group_verify is None:
            group_verify = verify_attn_grouped()
        self.verify_width = verify_width
        self.group_verify = group_verify and verify_width > 1
        self._plain_sizes = set(ladder(max_bs))  # plain decode graphs: never grouped
        self.twin_sizes: list[int] = []  # plain sizes with a grouped twin (set by capture)
        self.sizes = ladder(max_bs, verify_width, max_rows)
        max_bs = self.sizes[-1]  # from here on: rows (the static buffers hold the largest graph)
        self.max_bs = max_bs
        self.eager = eager
        dev = runner.device
        width = runner.max_blocks_per_seq
        self.width = width
        # Static inputs, all in one device buffer so that one copy fills them:
        # [ids | positions | slots] int64 (3 x max_bs), seq_lens int32 (max_bs, padded to 16 B),
        # verify groups int32 (likewise), block tables int32 [max_bs, width]. Each host-to-device
        # copy costs the host tens of microseconds on the lent H100s (more than the bytes), on
        # the critical path of a decode.
        n64, n_sl = 3 * max_bs, -(-max_bs // 4) * 4
        self._o32 = 2 * n64  # in int32 units
        self._ogr = self._o32 + n_sl
        self._obt = self._ogr + n_sl
        total32 = self._obt + max_bs * width
        self.static = torch.zeros(total32, dtype=torch.int32, device=dev)
        self.i64 = self.static[: self._o32].view(torch.int64)
        self.seq_lens = self.static[self._o32 : self._o32 + max_bs]
        self.groups = self.static[self._ogr : self._ogr + max_bs]
        self.block_tables = self.static[self._obt :].view(max_bs, width)
        self.query_start_loc = torch.arange(max_bs + 1, dtype=torch.int32, device=dev)
        # Two pinned host mirrors of `static`, used alternately.
        pin = dev.type == "cuda"
        self._host = [torch.zeros(total32, dtype=torch.int32, pin_memory=pin) for _ in range(2)]
        self._host_np = [h.numpy() for h in self._host]
        self._host_i = 0
        # Per mirror: recorded after its last copy was queued. A mirror is refilled only once
        # that copy ran (two steps may be in flight under asynchronous scheduling).
        self._host_events: list[torch.cuda.Event | None] = [None, None]
        self.graphs: dict[int, _SplitGraph | _EagerGraph] = {}
        self.verify_graphs: dict[int, _SplitGraph | _EagerGraph] = {}  # the grouped twins
        self._stream = torch.cuda.Stream(dev) if dev.type == "cuda" else None
        self.outputs: dict[int, torch.Tensor] = {}
        self.verify_outputs: dict[int, torch.Tensor] = {}
        self.capture_s = 0.0

    def release(self) -> None:
        """Free every captured graph and its outputs."""
        for g in (*self.graphs.values(), *self.verify_graphs.values()):
            for part in getattr(g, "parts", ()):
                part.reset()
        for d in (self.graphs, self.outputs, self.verify_graphs, self.verify_outputs):
            d.clear()

    def padded_size(self, n: int) -> int | None:
        i = bisect.bisect_left(self.sizes, n)
        return self.sizes[i] if i < len(self.sizes) else None

    def grouped(self, bs: int, verify: bool = False) -> bool:
        """The graph of `bs` rows that a verify step (`verify`) or a plain decode step replays
        attends verify rows by request (see the module docstring)."""
        if not self.group_verify:
            return False
        return bs not in self._plain_sizes or (verify and bs in self.verify_graphs)

    def _metadata(self, bs: int, grouped: bool | None = None) -> AttentionMetadata:
        m = self.max_bs
        if grouped is None:
            grouped = self.grouped(bs)
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
            verify_groups=self.groups[:bs] if grouped else None,
            verify_width=self.verify_width if grouped else 1,
        )

    def _step(self, bs: int, grouped: bool | None = None) -> torch.Tensor:
        """Forward + logits for the first `bs` static rows: [bs, vocab] fp32."""
        m = self.max_bs
        r = self.runner
        hidden = r.model(self.i64[:bs], self.i64[m : m + bs], r.kv_caches, self._metadata(bs, grouped))
        return r.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        t0 = time.perf_counter()
        m = self.max_bs
        # Slot -1 everywhere: warm-up and capture never write the KV cache.
        self.i64.zero_()
        self.i64[2 * m :].fill_(-1)
        self.seq_lens.zero_()
        self.groups.fill_(1)
        twins = [bs for bs in self.sizes if self.group_verify and bs in self._plain_sizes
                 and self.verify_width <= bs <= TWIN_MAX_ROWS]
        self.twin_sizes = twins
        if self.eager:
            for bs in self.sizes:
                self.graphs[bs] = _EagerGraph(lambda bs=bs: self._step(bs))
                self.outputs[bs] = self.graphs[bs].output
            for bs in twins:
                self.verify_graphs[bs] = _EagerGraph(lambda bs=bs: self._step(bs, True))
                self.verify_outputs[bs] = self.verify_graphs[bs].output
            return
        pool = torch.cuda.graph_pool_handle()
        free_before = torch.cuda.mem_get_info()[0]
        # A garbage collection inside a capture can free CUDA memory or events of an earlier
        # engine (cudaFree / cudaEventQuery are not allowed while a stream captures), which
        # invalidates the capture ("operation failed due to a previous error during capture").
        # So collect first and keep the collector off until every graph is captured.
        gc.collect()
        torch.cuda.synchronize()
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            for bs in reversed(self.sizes):
                self._step(bs)  # warm-up: compiles kernels, creates cuBLAS workspaces, rope table
                torch.cuda.synchronize()
                self.graphs[bs], self.outputs[bs] = self._capture_split(bs, pool)
            for bs in reversed(twins):
                self._step(bs, True)
                torch.cuda.synchronize()
                self.verify_graphs[bs], self.verify_outputs[bs] = self._capture_split(bs, pool, True)
        finally:
            if was_enabled:
                gc.enable()
        torch.cuda.synchronize()
        self.capture_s = time.perf_counter() - t0
        logger.info(
            "captured %d decode CUDA graphs (batch sizes %s; grouped verify twins %s) in %.1fs using %.2f GiB",
            len(self.sizes) + len(twins), self.sizes, twins, time.perf_counter() - t0,
            (free_before - torch.cuda.mem_get_info()[0]) / 2**30,
        )

    def _split_points(self) -> list[int]:
        """Layers before which a new graph starts: 1, 2, 4, 8, ... (see the module docstring)."""
        layers = getattr(self.runner.model, "layers", None)
        if not self.split or not isinstance(layers, torch.nn.ModuleList):
            return []
        points, i = [], 1
        while i < len(layers):
            points.append(i)
            i *= 2
        return points

    def _capture_split(self, bs: int, pool, grouped: bool | None = None) -> tuple[_SplitGraph, torch.Tensor]:
        """Capture one step as consecutive graphs cut before the layers of `_split_points`
        (forward pre-hooks end one capture and begin the next on the same stream and pool)."""
        graphs = [torch.cuda.CUDAGraph()]

        def cut(_module, _args) -> None:
            graphs[-1].capture_end()
            graphs.append(torch.cuda.CUDAGraph())
            graphs[-1].capture_begin(pool=pool)

        layers = getattr(self.runner.model, "layers", None)
        hooks = [layers[i].register_forward_pre_hook(cut) for i in self._split_points()]
        try:
            with torch.cuda.stream(self._stream):
                graphs[0].capture_begin(pool=pool)
                out = self._step(bs, grouped)
                graphs[-1].capture_end()
        finally:
            for h in hooks:
                h.remove()
        torch.cuda.synchronize()
        return _SplitGraph(graphs), out

    def load_inputs(
        self, buf: _Buffers, states: list[_ReqState], bs: int, tables: HostTables, block_size: int,
        ahead: bool = False, starts: list[int] | None = None, verify: bool = False,
    ) -> None:
        """Fill the static inputs for `len(states)` decodes padded to `bs`: written into a pinned
        mirror of the static buffer and sent with one copy (queued). `buf` is unused. `ahead`:
        the input ids are not on the host yet; the caller writes them into `i64[:n]` on the
        device after this copy (they are zeros here). `starts`: each row's position (a verify
        step: a request's rows at consecutive positions), else each state's computed length.
        `verify`: a verify step, replayed with `replay(bs, verify=True)`."""
        n = len(states)
        m = self.max_bs
        i = self._host_i
        host_t, host = self._host[i], self._host_np[i]
        self._host_i ^= 1
        if self._host_events[i] is not None:
            self._host_events[i].synchronize()  # its previous copy ran (at once in practice)
            self._host_events[i] = None
        if starts is None:
            starts = [st.num_computed_tokens for st in states]
        width = max(starts) // block_size + 1
        i64 = host[: self._o32].view(np.int64)
        if ahead:
            i64[:n] = 0
        else:
            i64[:n] = [st.token_ids[p] for st, p in zip(states, starts)]
        i64[n:bs] = 0
        pos = i64[m : m + n]
        pos[:] = starts
        i64[m + n : m + bs] = 0
        rows = [st.row for st in states]
        blocks = tables.table[rows, pos // block_size]
        i64[2 * m : 2 * m + n] = blocks * block_size + pos % block_size
        i64[2 * m + n : 2 * m + bs] = -1
        sl = host[self._o32 : self._o32 + bs]
        sl[:n] = pos + 1
        sl[n:] = 0  # padding rows: no keys
        gr = host[self._ogr : self._ogr + bs]
        gr[n:] = 1
        # A request's verify rows are consecutive states of one request (verify_step.py).
        gr[:n] = verify_groups(np.asarray(rows), self.verify_width) if self.grouped(bs, verify) else 1
        # Rows past `n` and columns past `width` keep stale ids: the kernels never read them
        # (a row reads only the blocks under its sequence length).
        bt = host[self._obt :].reshape(m, self.width)
        bt[:n, :width] = tables.table[rows, :width]
        end = self._obt + n * self.width
        self.static[:end].copy_(host_t[:end], non_blocking=True)
        if self._stream is not None:
            self._host_events[i] = torch.cuda.Event()
            self._host_events[i].record()

    def replay(self, bs: int, verify: bool = False) -> torch.Tensor:
        """Run the graph of `bs` rows (a verify step's grouped twin where there is one)."""
        if verify and bs in self.verify_graphs:
            self.verify_graphs[bs].replay()
            return self.verify_outputs[bs]
        self.graphs[bs].replay()
        return self.outputs[bs]
