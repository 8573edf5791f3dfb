"""SchedulerOutput -> input tensors -> forward -> sampled tokens.

The runner keeps its own copy of each running request's token ids and block table (a row of a
host-side table), updated from the scheduler's deltas, so a step's input costs O(scheduled
tokens) to build. Every input tensor of a step is built on the host first, in pinned memory,
and sent with non-blocking copies before the forward is launched.

`execute_async` launches a step and returns at once (on CUDA the forward, the logits and the
sampling are only queued); `PendingStep.result()` waits for the sampled ids, the step's one
host sync. Pure-decode steps replay a captured CUDA graph (`cuda_graphs.py`); prefill and mixed
steps run eagerly.

Ahead steps (asynchronous scheduling): `execute_async(so, ahead=True)` launches a pure-decode
step while the previous step is still running, without waiting for it. Each row's input token
is the one the previous step sampled: it is gathered on the device from that step's sampled-id
tensor, after the host-to-device copy of the other inputs; the host copy of the request's token
ids gets it later, when the previous step's `result()` runs.

Tensor parallelism: only rank 0 samples; it broadcasts each step's sampled ids on the device
over the model group, and the other ranks read them back lazily (the same `PendingStep`), so
every rank can feed an ahead step and extend its copies of the requests. A plain greedy step
(`_plain_greedy`) needs no broadcast: every rank takes the argmax of the same gathered logits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from kvserve.attention.base import AttentionBackend, AttentionMetadata
from kvserve.core.config import CacheConfig, ModelConfig
from kvserve.core.sampling_params import SamplingParams
from kvserve.core.scheduler import SchedulerOutput
from kvserve.distributed import parallel_state as ps
from kvserve.runner.inputs import HostTables, StagingBuffers
from kvserve.runner.sampler import Sampler, SamplingBatch, compute_logprobs, greedy_tokens

logger = logging.getLogger(__name__)

LogprobEntry = tuple[float, int, list[int], list[float]]


@dataclass(slots=True)
class _ReqState:
    token_ids: list[int]
    num_prompt_tokens: int
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    row: int  # this request's row in the host block table


@dataclass
class RunnerOutput:
    sampled: dict[str, list[int]] = field(default_factory=dict)
    # req_id -> per sampled token: (logprob, rank, top ids, top logprobs)
    logprobs: dict[str, list[LogprobEntry]] = field(default_factory=dict)
    # req_id -> for prompt positions 1.. of this step's chunk: same tuples
    prompt_logprobs: dict[str, list[LogprobEntry]] = field(default_factory=dict)
    # Requests whose grammar (structured output) completed with this step's token.
    grammar_finished: set[str] = field(default_factory=set)


class PendingStep:
    """A launched step. `result()` waits for its sampled ids (once) and records them."""

    def __init__(
        self,
        runner: ModelRunner | None,
        out: RunnerOutput,
        reqs: list[str] | None = None,
        tokens: torch.Tensor | None = None,  # [N] on the host (pinned) or the CPU device
        done: torch.cuda.Event | None = None,
        logprob_job: tuple[torch.Tensor, torch.Tensor, list[int], list[int | None]] | None = None,
    ) -> None:
        self._runner, self._out, self._reqs, self._tokens = runner, out, reqs, tokens
        self._done, self._logprob_job = done, logprob_job
        self._finished = runner is None
        self._ids: list[int] | None = None  # the sampled ids, once read
        self._grammars_fed = False

    def _read_ids(self) -> list[int]:
        if self._ids is None:
            if self._done is not None:
                self._done.synchronize()  # the step's one wait: sampled ids are in pinned memory
            self._ids = self._tokens.tolist()
        return self._ids

    def feed_grammars(self) -> None:
        """Hand this step's sampled ids to the requests' grammars now (waiting for them): an
        ahead step's masks need them before `result()` runs. Completion is recorded in the
        output (under the mask a stop token is sampled only where the grammar may end)."""
        if self._grammars_fed or self._runner is None or not self._runner.grammars:
            self._grammars_fed = True
            return
        self._grammars_fed = True
        grammars = self._runner.grammars
        for rid, tok in zip(self._reqs, self._read_ids()):
            grammar = grammars.get(rid)
            if grammar is not None and grammar.defer(tok):  # taken at the next fill
                self._out.grammar_finished.add(rid)

    def result(self) -> RunnerOutput:
        if self._finished:
            return self._out
        self._finished = True
        runner, out = self._runner, self._out
        runner._pending.remove(self)
        ids = self._read_ids()
        self.feed_grammars()
        states = runner.states
        for rid, tok in zip(self._reqs, ids):
            st = states.get(rid)
            if st is not None:  # None: finished meanwhile (an ahead step's plan dropped it)
                st.token_ids.append(tok)
            out.sampled[rid] = [tok]
        if self._logprob_job is not None:  # only when a request asked for logprobs
            raw, toks, rows, ks = self._logprob_job
            for i, entry in zip(rows, compute_logprobs(raw, toks, ks)):
                out.logprobs[self._reqs[i]] = [entry]
        return out


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        model_config: ModelConfig,
        cache_config: CacheConfig,
        num_blocks: int,
        dtype: torch.dtype,
        device: torch.device,
        backend: AttentionBackend,
        eos_token_ids: set[int],
        seed: int = 0,
        max_num_seqs: int = 256,
        max_model_len: int | None = None,
        use_cuda_graphs: bool = True,
        split_graphs: bool | None = None,  # None: KVSERVE_GRAPH_SPLIT decides (cuda_graphs.py)
        verify_graphs: tuple[int, int] | None = None,  # speculation: (k + 1, most rows of a step)
    ) -> None:
        self.model = model
        self.config = model_config
        self.block_size = cache_config.block_size
        self.device = device
        self.dtype = dtype
        self.backend = backend
        self.eos_token_ids = frozenset(eos_token_ids)
        shape = (2, num_blocks, self.block_size, model_config.num_kv_heads, model_config.head_dim)
        self.kv_caches = [_zeros(shape, dtype, device) for _ in range(model_config.num_layers)]
        self.states: dict[str, _ReqState] = {}
        # Seeded requests keep their generator across preemptions, so a recomputed request
        # continues its random stream where it left off.
        self.generators: dict[str, torch.Generator] = {}
        # Prompt positions whose logprobs were already reported, per request: a preempted
        # request recomputes its prompt, and must not report those positions twice.
        self.prompt_lp_done: dict[str, int] = {}
        # Structured output (driver only): the engine's grammar cache, set when the first
        # constrained request arrives, and each constrained request's matcher, kept across
        # preemptions (it depends on the output tokens only) and dropped when it finishes.
        self.structured = None
        self.grammars: dict[str, object] = {}
        shared = torch.Generator(device=device)
        shared.manual_seed(seed)
        self.sampler = Sampler(shared)
        self.max_model_len = max_model_len or model_config.max_position_embeddings
        self.max_blocks_per_seq = -(-self.max_model_len // self.block_size) + 1
        self.tables = HostTables(max_num_seqs + 1, self.max_blocks_per_seq)
        self.staging = StagingBuffers(device)
        # Launched steps whose ids are not read back yet, oldest first (at most two: a step
        # and the ahead step launched behind it).
        self._pending: list[PendingStep] = []
        # The last launched step's sampled ids on the device, and the request of each row:
        # the inputs of an ahead step.
        self._last_tokens: tuple[list[str], torch.Tensor] | None = None
        # Tensor parallelism: only rank 0 (the driver) samples; the other ranks run the same
        # forward and logits (collectives) and receive the sampled ids (`_sample`).
        self.is_driver = True
        self.num_graph_steps = 0  # decode steps served by a CUDA graph (tests, stats)
        self.num_ahead_steps = 0  # steps launched before the previous one's ids were back
        self.graphs = None
        self.warmup_s = 0.0  # start-up kernel compilation (runner/warmup.py)
        if device.type == "cuda" and backend.name == "triton":
            from kvserve.runner.warmup import warm_up_kernels

            self.warmup_s = warm_up_kernels(model, self.kv_caches, self.block_size, self.max_model_len, device)
        # A model whose forward syncs with the host (gpt-oss with dense experts) runs eagerly.
        if use_cuda_graphs and device.type == "cuda" and backend.name == "triton" and getattr(
            model, "supports_cuda_graphs", True
        ):
            from kvserve.runner.cuda_graphs import DecodeGraphs

            width, rows = verify_graphs or (1, None)
            self.graphs = DecodeGraphs(
                self, min(max_num_seqs, 512), split=split_graphs, verify_width=width, max_rows=rows
            )
            self.graphs.capture()

    @staticmethod
    def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return cfg.num_layers * 2 * block_size * cfg.num_kv_heads * cfg.head_dim * elem

    # -- state ------------------------------------------------------------------------------
    def _drop(self, rid: str) -> None:
        st = self.states.pop(rid, None)
        if st is not None:
            self.tables.release(st.row)

    def _update_states(self, so: SchedulerOutput) -> None:
        for rid in so.finished_req_ids:
            self._drop(rid)
            self.generators.pop(rid, None)
            self.prompt_lp_done.pop(rid, None)
            self.grammars.pop(rid, None)
        for rid in so.preempted_req_ids:
            self._drop(rid)
        for nr in so.new_requests:
            self._drop(nr.req_id)
            row = self.tables.acquire()
            self.tables.set_blocks(row, 0, nr.block_ids)
            self.states[nr.req_id] = _ReqState(
                list(nr.token_ids), nr.num_prompt_tokens, nr.sampling_params,
                list(nr.block_ids), nr.num_computed_tokens, row,
            )
            sp = nr.sampling_params
            if sp.seed is not None and nr.req_id not in self.generators:
                g = torch.Generator(device=self.device)
                g.manual_seed(sp.seed)
                self.generators[nr.req_id] = g
            if sp.structured_outputs is not None and self.is_driver and nr.req_id not in self.grammars:
                self.grammars[nr.req_id] = self.structured.new_matcher(sp.structured_outputs)
        for cr in so.cached_requests:
            st = self.states[cr.req_id]
            if 0 <= cr.num_kept_blocks < len(st.block_ids):  # a verify step released blocks
                del st.block_ids[cr.num_kept_blocks :]
                self.tables.table[st.row, cr.num_kept_blocks :] = 0
            if cr.new_block_ids:
                self.tables.set_blocks(st.row, len(st.block_ids), cr.new_block_ids)
                st.block_ids.extend(cr.new_block_ids)
            st.num_computed_tokens = cr.num_computed_tokens

    def release_graphs(self) -> None:
        """Free the captured decode graphs (later decode steps run eagerly). Tensor-parallel
        shutdown calls it before destroying the NCCL group, which waits for graphs that
        captured its collectives."""
        if self.graphs is not None:
            self.graphs.release()
            self.graphs = None

    # -- one step ---------------------------------------------------------------------------
    def execute(self, so: SchedulerOutput) -> RunnerOutput:
        return self.execute_async(so).result()

    @torch.inference_mode()
    def execute_async(self, so: SchedulerOutput, ahead: bool = False) -> PendingStep:
        """Launch one step. `ahead`: `so` is a pure-decode plan made while the last launched
        step was still running (`Scheduler.schedule_ahead`); every row's input is the token
        that step sampled for the request, taken from the device, and nothing waits for it."""
        if ahead:
            # Steps before the last one are long done on rank 0 (the engine read them); a
            # worker reads them here, which also bounds how far it runs ahead of its GPU.
            while len(self._pending) > 1:
                self._pending[0].result()
        else:
            while self._pending:  # earlier steps' tokens are inputs of this one
                self._pending[0].result()
        prev = self._last_tokens
        self._last_tokens = None
        self._update_states(so)
        if so.is_empty:
            return PendingStep(None, RunnerOutput())
        if ahead:
            return self._execute_ahead(so, prev)
        if so.spec_token_ids:
            from kvserve.spec_decode.verify_step import execute_verify

            return PendingStep(None, execute_verify(self, so))
        # Decodes first, so the backend finds them in one contiguous run.
        order = sorted(so.num_scheduled_tokens, key=lambda r: so.num_scheduled_tokens[r] != 1)
        states = [self.states[r] for r in order]
        nums = [so.num_scheduled_tokens[r] for r in order]
        starts = [st.num_computed_tokens for st in states]
        num_tokens = sum(nums)
        pure_decode = num_tokens == len(order)
        out = RunnerOutput()
        sample_reqs: list[str] = []
        sample_rows: list[int] = []  # row of the hidden state whose logits are sampled
        prompt_lp: list[tuple[str, int, int, int]] = []  # (req, first row, its position, num rows)
        row0 = 0
        for rid, st, n, start in zip(order, states, nums, starts):
            end = start + n
            if st.sampling_params.prompt_logprobs is not None and start < st.num_prompt_tokens:
                # Positions first .. upto-1 predict prompt tokens first+1 .. upto (the chunk's
                # last row included: it predicts the next chunk's first token).
                first = max(start, self.prompt_lp_done.get(rid, 0))
                upto = min(end, st.num_prompt_tokens - 1)
                if upto > first:
                    prompt_lp.append((rid, row0 + first - start, first, upto - first))
                    self.prompt_lp_done[rid] = upto
            if end == len(st.token_ids):
                sample_rows.append(row0 + n - 1)
                sample_reqs.append(rid)
            row0 += n

        graph_bs = None
        # Graphs compute logits for every row: only when each row is a sampled decode (a
        # one-token prefill chunk in mid-prompt is query length 1 but samples nothing).
        if pure_decode and len(sample_reqs) == len(order) and not prompt_lp and self.graphs is not None:
            graph_bs = self.graphs.padded_size(len(order))
        if graph_bs is not None:
            self.num_graph_steps += 1
            buf = self.staging.next()
            self.graphs.load_inputs(buf, states, graph_bs, self.tables, self.block_size)
            logits = self.graphs.replay(graph_bs)[: len(order)]  # [N, V]: every decode samples
        else:
            buf = self.staging.next()
            ids_t, pos_t, md, sample_idx = self._eager_inputs(buf, states, nums, starts, num_tokens, sample_rows)
            hidden = self.model(ids_t, pos_t, self.kv_caches, md)  # [T, hidden]
            for rid, r0, first, n in prompt_lp:
                st = self.states[rid]
                lp_logits = self.model.compute_logits(hidden[r0 : r0 + n])
                if not self.is_driver:
                    continue
                targets = torch.tensor(st.token_ids[first + 1 : first + 1 + n], device=self.device)
                out.prompt_logprobs[rid] = compute_logprobs(
                    lp_logits, targets, [st.sampling_params.prompt_logprobs] * n
                )
            logits = None
            if sample_rows:
                if len(sample_rows) == num_tokens:
                    logits = self.model.compute_logits(hidden)
                else:
                    logits = self.model.compute_logits(hidden.index_select(0, sample_idx))  # [N, V]
        if not sample_reqs:
            return PendingStep(None, out)
        return self._sample(out, buf, logits, sample_reqs)

    def _execute_ahead(self, so: SchedulerOutput, prev: tuple[list[str], torch.Tensor] | None) -> PendingStep:
        order = list(so.num_scheduled_tokens)
        if prev is None or any(so.num_scheduled_tokens[r] != 1 for r in order):
            raise RuntimeError("an ahead step must follow a sampling step and decode one token per request")
        prev_reqs, prev_tokens = prev
        where = {rid: i for i, rid in enumerate(prev_reqs)}
        idx = [where[rid] for rid in order]  # KeyError: the scheduler planned a row not sampled
        states = [self.states[r] for r in order]
        n = len(order)
        self.num_ahead_steps += 1
        buf = self.staging.next()
        graph_bs = self.graphs.padded_size(n) if self.graphs is not None else None
        if graph_bs is not None:
            self.num_graph_steps += 1
            self.graphs.load_inputs(buf, states, graph_bs, self.tables, self.block_size, ahead=True)
            self.graphs.i64[:n].copy_(self._gather(prev_tokens, idx, buf))  # after the static copy
            logits = self.graphs.replay(graph_bs)[:n]  # [N, V]
        else:
            starts = [st.num_computed_tokens for st in states]
            ids_t, pos_t, md, _ = self._eager_inputs(
                buf, states, [1] * n, starts, n, list(range(n)), ahead_ids=(prev_tokens, idx)
            )
            hidden = self.model(ids_t, pos_t, self.kv_caches, md)  # [N, hidden]
            logits = self.model.compute_logits(hidden)  # [N, V]
        return self._sample(RunnerOutput(), buf, logits, order, ahead=True)

    def _gather(self, tokens: torch.Tensor, idx: list[int], buf) -> torch.Tensor:
        """tokens[idx] on the device: a slice when the rows are consecutive (the usual case:
        the same requests in the same order), else an index_select with the index uploaded
        through the staging buffer `buf`."""
        n = len(idx)
        if _consecutive(idx):
            return tokens[idx[0] : idx[0] + n]
        i64, _ = buf.host(n, 0)
        i64[:] = idx
        d64, _ = buf.upload()
        return tokens.index_select(0, d64)

    def _eager_inputs(
        self,
        buf,
        states: list[_ReqState],
        nums: list[int],
        starts: list[int],
        num_tokens: int,
        sample_rows: list[int],
        ahead_ids: tuple[torch.Tensor, list[int]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        """`ahead_ids` (an all-decode ahead step): the input ids are `tokens[idx]`, gathered on
        the device after the upload instead of read from the host copies."""
        bs = self.block_size
        num_seqs = len(states)
        ends = [s + n for s, n in zip(starts, nums)]
        width = max(-(-e // bs) for e in ends)
        gather = None
        if ahead_ids is not None:
            idx = ahead_ids[1]
            if not _consecutive(idx):
                gather = idx  # uploaded after the slots; else the ids are a slice
        n_gather = len(gather) if gather is not None else 0
        i64, i32 = buf.host(3 * num_tokens + n_gather, (num_seqs + 1) + num_seqs + len(sample_rows) + num_seqs * width)
        ids, pos = i64[:num_tokens], i64[num_tokens : 2 * num_tokens]
        slots = i64[2 * num_tokens : 3 * num_tokens]
        qsl = i32[: num_seqs + 1]
        table = self.tables.table
        if num_tokens == num_seqs:
            # All decodes: one token per sequence, at position `start`. Plain Python over the
            # rows: a handful of numpy calls cost more than these loops in a batch-1 CPU step.
            if ahead_ids is None:
                ids[:] = [st.token_ids[s] for st, s in zip(states, starts)]
            else:
                ids[:] = 0  # filled on the device below
                if gather is not None:
                    i64[3 * num_tokens :] = gather
            pos[:] = starts
            slots[:] = [int(table[st.row, s // bs]) * bs + s % bs for st, s in zip(states, starts)]
            qsl[:] = range(num_seqs + 1)
        else:
            flat: list[int] = []
            for st, s, e in zip(states, starts, ends):
                flat.extend(st.token_ids[s:e])
            ids[:] = flat
            qsl[0] = 0
            np.cumsum(nums, out=qsl[1:])
            rows_np = np.fromiter((st.row for st in states), dtype=np.int64, count=num_seqs)
            nums_np = np.asarray(nums, dtype=np.int64)
            # Position of each token: its index in the step minus its sequence's first row, plus
            # the sequence's computed prefix.
            pos[:] = np.arange(num_tokens) - np.repeat(qsl[:-1].astype(np.int64) - np.asarray(starts), nums_np)
            blocks = table[np.repeat(rows_np, nums_np), pos // bs]
            slots[:] = blocks * bs + pos % bs
        o = num_seqs + 1
        i32[o : o + num_seqs] = ends
        o += num_seqs
        i32[o : o + len(sample_rows)] = sample_rows
        o += len(sample_rows)
        i32[o : o + num_seqs * width].reshape(num_seqs, width)[:] = table[[st.row for st in states], :width]
        d64, d32 = buf.upload()
        if ahead_ids is not None:
            tokens, idx = ahead_ids
            if gather is None:
                d64[:num_tokens].copy_(tokens[idx[0] : idx[0] + num_tokens])
            else:
                d64[:num_tokens].copy_(tokens.index_select(0, d64[3 * num_tokens :]))
        o = 2 * num_seqs + 1
        md = AttentionMetadata(
            query_start_loc=d32[: num_seqs + 1],
            seq_lens=d32[num_seqs + 1 : o],
            block_tables=d32[o + len(sample_rows) : o + len(sample_rows) + num_seqs * width].view(num_seqs, width),
            slot_mapping=d64[2 * num_tokens : 3 * num_tokens],
            max_query_len=max(nums),
            max_seq_len=max(ends),
            query_start_loc_cpu=qsl.tolist(),
            seq_lens_cpu=ends,
            block_size=bs,
            is_pure_decode=num_tokens == num_seqs,
            prompt_lens_cpu=None if num_tokens == num_seqs else [st.num_prompt_tokens for st in states],
        )
        return d64[:num_tokens], d64[num_tokens : 2 * num_tokens], md, d32[o : o + len(sample_rows)]

    def _sample(self, out: RunnerOutput, buf, logits: torch.Tensor, reqs: list[str], ahead: bool = False) -> PendingStep:
        """Queue sampling and the copy of the ids to pinned memory; nothing here waits.
        Under tensor parallelism rank 0 broadcasts the ids [N] on the device and the other
        ranks receive them here (every rank at this same point of every sampling step), except
        in a plain greedy step (`_plain_greedy`): every rank holds the same gathered logits, so
        each takes the same argmax itself and no collective runs."""
        tp = ps.get_tp()
        states = [self.states[r] for r in reqs]
        local = tp.size > 1 and _plain_greedy([st.sampling_params for st in states])
        if not self.is_driver:
            if local:
                return self._queue_result(out, buf, reqs, greedy_tokens(logits), None)
            tokens = torch.empty(len(reqs), dtype=torch.long, device=self.device)
            torch.distributed.broadcast(tokens, src=0, group=tp.group)
            return self._queue_result(out, buf, reqs, tokens, None)
        batch = SamplingBatch(  # token lists are passed, not sliced: only penalty rows read them
            params=[st.sampling_params for st in states],
            generators=[self.generators.get(r) for r in reqs],
            token_ids=[st.token_ids for st in states],
            num_prompt_tokens=[st.num_prompt_tokens for st in states],
            eos_token_ids=self.eos_token_ids,
        )
        if self.grammars:
            if ahead and self._pending:
                # The masks need the tokens of the step in flight: wait for them here, while the
                # GPU already runs this step's forward (queued above), not before launching it.
                self._pending[-1].feed_grammars()
            self._grammar_bitmask(batch, reqs, logits)
        # Sampler.__call__ reads the ids back itself; its two halves do not, so the wait is
        # left to PendingStep.result() (same tokens as Sampler.__call__).
        processed = self.sampler.process_logits(logits, batch)
        tokens = greedy_tokens(processed) if batch.all_greedy else self.sampler.sample(processed, batch)  # [N]
        lp_rows = [i for i, st in enumerate(states) if st.sampling_params.logprobs is not None]
        job = None
        if lp_rows:
            idx = torch.tensor(lp_rows)
            if idx.device != logits.device:  # through pinned memory: a pageable copy would wait
                idx = idx.pin_memory().to(logits.device, non_blocking=True)
            job = (logits[idx], tokens[idx], lp_rows, [states[i].sampling_params.logprobs for i in lp_rows])
        if tp.size > 1 and not local:
            tokens = tokens.to(torch.long).contiguous()
            torch.distributed.broadcast(tokens, src=0, group=tp.group)
        return self._queue_result(out, buf, reqs, tokens, job)

    def _grammar_bitmask(self, batch: SamplingBatch, reqs: list[str], logits: torch.Tensor) -> None:
        """The allowed next tokens of each constrained row, filled on the host by its matcher
        (which has seen every earlier token: ahead steps never run with a grammar) and sent to
        the device through pinned memory without waiting."""
        rows = [i for i, r in enumerate(reqs) if r in self.grammars]
        if not rows:
            return
        from kvserve.structured.grammar import allocate_bitmask

        # [N, W] over the grammar's vocabulary; other rows stay unread
        mask = allocate_bitmask(len(reqs), self.structured.compiler.vocab_size)
        # The GPU is still running this step's forward: the matchers' advance by the last
        # step's tokens (deferred, see RequestGrammar) and the fill overlap it.
        self.structured.filler.fill([self.grammars[reqs[i]] for i in rows], mask, rows)
        if logits.device.type != "cpu":
            mask = mask.pin_memory().to(logits.device, non_blocking=True)
        batch.bitmask, batch.bitmask_rows = mask, rows

    def _queue_result(self, out: RunnerOutput, buf, reqs: list[str], tokens: torch.Tensor, job) -> PendingStep:
        host, event = buf.download(tokens)
        pending = PendingStep(self, out, reqs, host, event, job)
        self._pending.append(pending)
        self._last_tokens = (reqs, tokens)
        return pending


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero-filled cache tensor. On the CPU its pages come zeroed from the OS on first touch
    (runner/cpu_memory.py `lazy_zeros`), so resident memory grows with the blocks in use instead
    of the whole cache being written at start-up."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    from kvserve.runner.cpu_memory import lazy_zeros

    return lazy_zeros(shape, dtype)


def _plain_greedy(params: list[SamplingParams]) -> bool:
    """Every row takes the argmax of its logits as they come (no penalty, bias or min_tokens
    ban changes them). Decided from the parameters alone, which every rank holds, never from the
    token histories: all ranks must agree on whether the step's broadcast runs."""
    return all(p.greedy and not p.modifies_logits for p in params)


def _consecutive(idx: list[int]) -> bool:
    """idx is idx[0], idx[0] + 1, ...: the rows are a slice (same requests, same order)."""
    return idx == list(range(idx[0], idx[0] + len(idx)))
