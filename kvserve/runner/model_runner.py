"""SchedulerOutput -> input tensors -> forward -> sampled tokens.

The runner keeps its own copy of each running request's token ids and block table, updated
from the scheduler's deltas, so a step's input costs O(scheduled tokens) to build.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from kvserve.attention.base import AttentionBackend, AttentionMetadata
from kvserve.core.config import CacheConfig, ModelConfig
from kvserve.core.sampling_params import SamplingParams
from kvserve.core.scheduler import SchedulerOutput
from kvserve.runner.sampler import Sampler, SamplingBatch, compute_logprobs

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _ReqState:
    token_ids: list[int]
    num_prompt_tokens: int
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int


@dataclass
class RunnerOutput:
    sampled: dict[str, list[int]] = field(default_factory=dict)
    # req_id -> per sampled token: (logprob, rank, top ids, top logprobs)
    logprobs: dict[str, list[tuple[float, int, list[int], list[float]]]] = field(default_factory=dict)
    # req_id -> for prompt positions 1.. of this step's chunk: same tuples
    prompt_logprobs: dict[str, list[tuple[float, int, list[int], list[float]]]] = field(default_factory=dict)


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
    ) -> None:
        self.model = model
        self.config = model_config
        self.block_size = cache_config.block_size
        self.device = device
        self.dtype = dtype
        self.backend = backend
        self.eos_token_ids = frozenset(eos_token_ids)
        shape = (2, num_blocks, self.block_size, model_config.num_kv_heads, model_config.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(model_config.num_layers)]
        self.states: dict[str, _ReqState] = {}
        # Seeded requests keep their generator across preemptions, so a recomputed request
        # continues its random stream where it left off.
        self.generators: dict[str, torch.Generator] = {}
        # Prompt positions whose logprobs were already reported, per request: a preempted
        # request recomputes its prompt, and must not report those positions twice.
        self.prompt_lp_done: dict[str, int] = {}
        shared = torch.Generator(device=device)
        shared.manual_seed(seed)
        self.sampler = Sampler(shared)

    @staticmethod
    def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return cfg.num_layers * 2 * block_size * cfg.num_kv_heads * cfg.head_dim * elem

    # -- state ------------------------------------------------------------------------------
    def _update_states(self, so: SchedulerOutput) -> None:
        for rid in so.finished_req_ids:
            self.states.pop(rid, None)
            self.generators.pop(rid, None)
            self.prompt_lp_done.pop(rid, None)
        for rid in so.preempted_req_ids:
            self.states.pop(rid, None)
        for nr in so.new_requests:
            self.states[nr.req_id] = _ReqState(
                list(nr.token_ids), nr.num_prompt_tokens, nr.sampling_params,
                list(nr.block_ids), nr.num_computed_tokens,
            )
            sp = nr.sampling_params
            if sp.seed is not None and nr.req_id not in self.generators:
                g = torch.Generator(device=self.device)
                g.manual_seed(sp.seed)
                self.generators[nr.req_id] = g
        for cr in so.cached_requests:
            st = self.states[cr.req_id]
            st.block_ids.extend(cr.new_block_ids)
            st.num_computed_tokens = cr.num_computed_tokens

    # -- one step ---------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, so: SchedulerOutput) -> RunnerOutput:
        self._update_states(so)
        if so.is_empty:
            return RunnerOutput()
        bs = self.block_size
        # Decodes first, so the backend finds them in one contiguous run.
        order = sorted(so.num_scheduled_tokens, key=lambda r: so.num_scheduled_tokens[r] != 1)
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        sample_rows: list[int] = []  # row of the hidden state whose logits are sampled
        sample_reqs: list[str] = []
        prompt_lp: list[tuple[str, int, int, int]] = []  # (req, first row, its position, num rows)
        for rid in order:
            st = self.states[rid]
            n = so.num_scheduled_tokens[rid]
            start = st.num_computed_tokens
            end = start + n
            row0 = len(input_ids)
            input_ids.extend(st.token_ids[start:end])
            positions.extend(range(start, end))
            blocks = st.block_ids
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
            qsl.append(row0 + n)
            seq_lens.append(end)
            tables.append(blocks)
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
        md = self._metadata(qsl, seq_lens, tables, slots)
        dev = self.device
        ids_t = torch.tensor(input_ids, dtype=torch.long, device=dev)
        pos_t = torch.tensor(positions, dtype=torch.long, device=dev)
        hidden = self.model(ids_t, pos_t, self.kv_caches, md)  # [T, hidden]

        out = RunnerOutput()
        for rid, row0, first, n in prompt_lp:
            st = self.states[rid]
            logits = self.model.compute_logits(hidden[row0 : row0 + n])
            targets = torch.tensor(st.token_ids[first + 1 : first + 1 + n], device=dev)
            out.prompt_logprobs[rid] = compute_logprobs(logits, targets, [st.sampling_params.prompt_logprobs] * n)
        if sample_rows:
            logits = self.model.compute_logits(hidden[torch.tensor(sample_rows, device=dev)])  # [N, V]
            states = [self.states[r] for r in sample_reqs]
            batch = SamplingBatch(  # token lists are passed, not sliced: only penalty rows read them
                params=[st.sampling_params for st in states],
                generators=[self.generators.get(r) for r in sample_reqs],
                token_ids=[st.token_ids for st in states],
                num_prompt_tokens=[st.num_prompt_tokens for st in states],
                eos_token_ids=self.eos_token_ids,
            )
            result = self.sampler(logits, batch)
            for i, rid in enumerate(sample_reqs):
                tok = result.token_ids[i]
                self.states[rid].token_ids.append(tok)
                out.sampled[rid] = [tok]
                if result.logprobs and result.logprobs[i] is not None:
                    out.logprobs[rid] = [result.logprobs[i]]
        return out

    def _metadata(
        self, qsl: list[int], seq_lens: list[int], tables: list[list[int]], slots: list[int]
    ) -> AttentionMetadata:
        dev = self.device
        width = max(len(t) for t in tables)
        padded = [t + [0] * (width - len(t)) for t in tables]
        qlens = [qsl[i + 1] - qsl[i] for i in range(len(seq_lens))]
        return AttentionMetadata(
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            max_query_len=max(qlens),
            max_seq_len=max(seq_lens),
            query_start_loc_cpu=qsl,
            seq_lens_cpu=seq_lens,
            block_size=self.block_size,
            is_pure_decode=all(q == 1 for q in qlens),
        )
