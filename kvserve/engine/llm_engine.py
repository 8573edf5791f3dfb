"""The synchronous engine: add_request / step / abort.

One `step()` = schedule -> run the model -> advance requests -> detokenize -> report. A user
request with `n > 1` becomes n child requests that share the prompt's KV blocks through the
prefix cache; their results are gathered back into one `RequestOutput`.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

import torch

from kvserve.core.config import CacheConfig, SchedulerConfig
from kvserve.core.request import Request, RequestStatus
from kvserve.core.sampling_params import SamplingParams
from kvserve.core.scheduler import Scheduler, SchedulerOutput
from kvserve.engine.arg_utils import EngineArgs, GiB
from kvserve.engine.detokenizer import IncrementalDetokenizer
from kvserve.engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from kvserve.loader.model_loader import LoadedModel, load_model
from kvserve.platform import get_platform, resolve_device
from kvserve.loader.resolve import resolve_model
from kvserve.runner.model_runner import ModelRunner, PendingStep, RunnerOutput

if TYPE_CHECKING:
    from kvserve.distributed.launch import TPGroup

logger = logging.getLogger(__name__)

PromptType = str | list[int] | dict[str, Any]


@dataclass
class _Group:
    """Engine-side state of one user request (with its n children)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    child_ids: list[str]
    outputs: list[CompletionOutput]
    detoks: list[IncrementalDetokenizer | None]
    metrics: RequestMetrics
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    finished_children: set[int] = field(default_factory=set)

    @property
    def finished(self) -> bool:
        return len(self.finished_children) == len(self.child_ids)


class LLMEngine:
    def __init__(self, args: EngineArgs, _tp_group: TPGroup | None = None) -> None:
        """With `tensor_parallel_size > 1` this process becomes rank 0 of the group: it spawns
        the other ranks (or, under torchrun, joins them; there ranks other than 0 never return
        from here: they serve rank 0 until it shuts down, then exit). `_tp_group` is set only
        when a worker rank builds its engine."""
        self.args = args
        self.tp_group: TPGroup | None = _tp_group
        resolved = resolve_model(args.model)
        if args.tensor_parallel_size > 1 and _tp_group is None:
            from kvserve.distributed import launch
            from kvserve.distributed.parallel_state import check_divisible
            from kvserve.loader.model_loader import read_model_config

            # What can be checked before any process starts, is.
            c = read_model_config(resolved)
            check_divisible(
                num_heads=c.num_heads, num_kv_heads=c.num_kv_heads,
                intermediate_size=c.intermediate_size, family=c.family, tp_size=args.tensor_parallel_size,
            )
            _check_max_model_len(args.max_model_len, c)
            self.tp_group = launch.start(args, run_tp_worker)
        if self.tp_group is None:
            self._build(args, resolved)
            return
        try:
            self._build(args, resolved)
            if self.tp_group.rank == 0:
                self.tp_group.wait_ready()
        except BaseException as e:
            self.tp_group.startup_failed(e)
            raise
        # Captured graphs hold the NCCL communicator (destroying the group waits for them).
        self.tp_group.before_destroy.append(self.runner.release_graphs)
        if self.tp_group.rank == 0:
            # Stops the workers when the engine is collected or the interpreter exits.
            self._finalizer = weakref.finalize(self, self.tp_group.close)

    def _build(self, args: EngineArgs, resolved) -> None:
        tp = self.tp_group
        self.model_name = args.served_model_name or resolved.name
        device = tp.device if tp is not None else resolve_device(args.device)
        # The one device seam: probed once, it picks every kernel and weight format.
        self.platform = get_platform(device)
        self.platform.log_once()
        self.platform.tune_process()
        if device.type == "cpu":
            from kvserve.runner.cpu_threads import set_threads

            set_threads(args.threads, args.tensor_parallel_size)
        self.backend = self.platform.attention_backend(args.attention_backend)
        driver = tp is None or tp.rank == 0
        t_load = time.perf_counter()
        loaded = load_model(
            resolved, dtype=args.dtype, device=device, backend=self.backend,
            load_tokenizer=driver, load_format=args.load_format, platform=self.platform,
            quantization=args.quantization,
        )
        if tp is not None:
            tp.barrier()  # every rank loaded its shard (gloo: fails at once if a rank died)
        self.loaded: LoadedModel = loaded
        self.model_config = loaded.config
        self.tokenizer = loaded.tokenizer
        if args.tokenizer and driver:
            from kvserve.loader.tokenizer import Tokenizer

            self.tokenizer = Tokenizer.from_folder(resolve_model(args.tokenizer).folder)
        self.eos_token_ids = frozenset(loaded.eos_token_ids)

        cfg = loaded.config
        # What this rank holds: its share of the KV heads (the KV cache is split like them).
        self._rank_config = cfg
        if tp is not None:
            from kvserve.distributed.parallel_state import kv_head_shard

            self._rank_config = dataclasses.replace(cfg, num_kv_heads=kv_head_shard(cfg.num_kv_heads)[1])
        bs = args.block_size
        bytes_per_block = ModelRunner.kv_bytes_per_block(self._rank_config, bs, loaded.dtype)
        _check_max_model_len(args.max_model_len, cfg)
        want_len = args.max_model_len or cfg.max_position_embeddings
        num_blocks = self._num_blocks(bytes_per_block, device, want_len)
        if tp is not None:
            num_blocks = tp.min_over_ranks(num_blocks)  # every rank must hold the same blocks
        capacity = num_blocks * bs
        if args.max_model_len is None and capacity < want_len:
            logger.warning("KV cache holds %d tokens: max_model_len lowered from %d", capacity, want_len)
            want_len = capacity
        self.max_model_len = want_len
        chunked = args.enable_chunked_prefill
        default_budget = self.platform.default_token_budget
        budget = args.max_num_batched_tokens or (default_budget if chunked else max(default_budget, want_len))
        self.scheduler_config = SchedulerConfig(
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=budget,
            max_model_len=want_len, enable_chunked_prefill=chunked,
            enable_kv_cache=args.enable_kv_cache,
        )
        prefix = args.enable_prefix_caching and args.enable_kv_cache
        self.cache_config = CacheConfig(bs, num_blocks, prefix)
        self.scheduler = Scheduler(self.scheduler_config, self.cache_config, num_blocks)
        # On CUDA the next step is launched before this step's outputs are built (see step()),
        # and with asynchronous scheduling even before this step's tokens are back. On CPU the
        # forward is synchronous, so neither gains anything there (both can be forced on: tests).
        cuda = device.type == "cuda"
        self.async_scheduling = cuda if args.async_scheduling is None else args.async_scheduling
        t_cache = time.perf_counter()
        spec_cfg = args.speculative_config
        verify_graphs = None
        if spec_cfg is not None:
            from kvserve.spec_decode.decoder import max_step_rows

            k = spec_cfg.num_speculative_tokens
            verify_graphs = (k + 1, max_step_rows(min(args.max_num_seqs, 512), k))
        self.runner = ModelRunner(
            loaded.model, self._rank_config, self.cache_config, num_blocks, loaded.dtype, device,
            self.backend, set(self.eos_token_ids), seed=args.seed,
            max_num_seqs=args.max_num_seqs, max_model_len=want_len, use_cuda_graphs=not args.enforce_eager,
            # Split decode graphs let the GPU start while the host still launches the step; with
            # the step launched ahead of time the host is not on the GPU's path, and one graph
            # per step saves the launch gaps between the pieces.
            split_graphs=None if not self.async_scheduling else False,
            verify_graphs=verify_graphs,
        )
        self.spec = None
        # Only rank 0 proposes (the drafts travel in each step's plan); under tensor
        # parallelism its draft model runs whole on rank 0 (spec_decode/draft_model.py).
        if spec_cfg is not None and (tp is None or tp.rank == 0):
            from kvserve.spec_decode.setup import build_spec_decoder

            self.spec = build_spec_decoder(self, spec_cfg)
        self._overlap = cuda or self.async_scheduling
        self._inflight: tuple[SchedulerOutput, PendingStep] | None = None
        logger.info(
            "KV cache: %d blocks x %d tokens = %d tokens (%.2f GiB); max_model_len %d",
            num_blocks, bs, capacity, num_blocks * bytes_per_block / GiB, want_len,
        )
        # Seconds of start-up by phase (benchmarks/startup.py): the model (weights, tokenizer,
        # repacking) and the KV cache with the runner's buffers.
        self.startup_s = {"load": t_cache - t_load, "kv_cache": time.perf_counter() - t_cache}
        self.groups: dict[str, _Group] = {}
        self._child_to_group: dict[str, tuple[_Group, int]] = {}
        self._counter = 0
        # Structured output: the grammar cache (built with the first constrained request), and
        # requests waiting for their grammar to compile (kept out of the scheduler meanwhile).
        self._structured = None
        self._structured_lock = threading.Lock()  # the server builds it from its own threads
        self._grammar_wait: list[tuple[Any, list[Request]]] = []

    # -- sizing -----------------------------------------------------------------------------
    def _num_blocks(self, bytes_per_block: int, device: torch.device, max_len: int) -> int:
        args = self.args
        if args.num_kv_blocks is not None:
            return args.num_kv_blocks
        if device.type == "cuda":
            from kvserve.runner import profiling

            # The profiled step: the largest token budget a step can have (see __init__).
            chunked = args.enable_chunked_prefill
            budget = self.platform.default_token_budget
            tokens = args.max_num_batched_tokens or (budget if chunked else max(budget, max_len))
            peak = profiling.profile_peak_activations(
                self.loaded.model, self._rank_config, self.loaded.dtype, device, tokens,
                max_len, args.max_num_seqs, args.block_size,
            )
            graph_rows = min(args.max_num_seqs, 512)
            if args.speculative_config is not None:
                from kvserve.spec_decode.decoder import max_step_rows

                graph_rows = max_step_rows(graph_rows, args.speculative_config.num_speculative_tokens)
            graphs = 0 if args.enforce_eager else profiling.graph_pool_estimate(
                peak, tokens, graph_rows, self.loaded.config.vocab_size
            )
            budget = profiling.cuda_kv_budget(args.gpu_memory_utilization, peak, graphs, device)
        # Beyond this many blocks no schedule can use them all at once.
        cap = -(-args.max_num_seqs * max_len // args.block_size) + 1
        if device.type != "cuda":
            from kvserve.runner.cpu_memory import default_kv_cache_bytes

            budget = args.kv_cache_memory or default_kv_cache_bytes(cap * bytes_per_block)
        n = max(1, budget // bytes_per_block)
        return int(min(n, cap))

    # -- requests ---------------------------------------------------------------------------
    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("prompt dict must have 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass {'prompt_token_ids': [...]}")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)):
            return None, list(prompt)
        raise ValueError(f"prompt must be a string, a list of token ids or a dict (got {type(prompt).__name__})")

    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
    ) -> None:
        params = params or SamplingParams()
        if request_id in self.groups:
            raise ValueError(f"request_id {request_id!r} is already in use")
        text, ids = self.tokenize_prompt(prompt)
        self.validate_prompt(ids)
        self.validate_params(params)
        room = self.max_model_len - len(ids)
        max_tokens = min(params.max_tokens or room, room)
        if params.min_tokens > max_tokens:
            raise ValueError(
                f"min_tokens={params.min_tokens} cannot be reached: only {max_tokens} tokens fit after the prompt"
            )
        grammar = None
        if params.structured_outputs is not None:
            grammar = self.structured.submit(params.structured_outputs)
            if self.structured.status(params.structured_outputs, grammar) == "error":
                raise self.structured.error(params.structured_outputs, grammar)
        arrival = arrival_time or time.time()
        n = params.n
        child_ids = [request_id] if n == 1 else [f"{request_id}#{i}" for i in range(n)]
        group = _Group(
            request_id, text, ids, params, child_ids,
            outputs=[CompletionOutput(i, "", []) for i in range(n)],
            detoks=[self._detokenizer(ids, params) for _ in range(n)],
            metrics=RequestMetrics(arrival_time=arrival),
        )
        self.groups[request_id] = group
        children: list[Request] = []
        for i, cid in enumerate(child_ids):
            child_params = params
            if n > 1 and params.seed is not None:
                child_params = params.clone(seed=(params.seed + i) % 2**63, n=1)
            req = Request(
                cid, ids, child_params, eos_token_ids=self.eos_token_ids,
                max_tokens=max_tokens, arrival_time=arrival,
            )
            self._child_to_group[cid] = (group, i)
            children.append(req)
        if grammar is not None and not grammar.done():
            self._grammar_wait.append((grammar, children))
            return
        for req in children:
            self.scheduler.add_request(req)

    @property
    def structured(self):
        """The grammar cache of structured output (`kvserve.structured.manager`), built on
        first use (it loads xgrammar and indexes the vocabulary: ~0.5 s for 49k tokens)."""
        with self._structured_lock:
            if self._structured is None:
                from kvserve.structured.manager import StructuredOutputManager

                manager = StructuredOutputManager(self.tokenizer, self.model_config.vocab_size, self.eos_token_ids)
                self.runner.structured = manager
                self._structured = manager
        return self._structured

    def _admit_compiled(self) -> list[RequestOutput]:
        """Move requests whose grammar compiled into the scheduler; end those whose grammar
        failed or timed out (finish_reason "abort", the error as stop_reason)."""
        if not self._grammar_wait:
            return []
        if not self.scheduler.has_unfinished_requests():
            # Nothing else to run: wait here (briefly) instead of spinning on empty steps.
            import concurrent.futures as cf

            cf.wait([f for f, _ in self._grammar_wait], timeout=0.05, return_when=cf.FIRST_COMPLETED)
        waiting, outputs = [], []
        for fut, children in self._grammar_wait:
            rid = children[0].request_id
            group, _ = self._child_to_group.get(rid, (None, 0))
            if group is None or group.request_id not in self.groups:
                continue  # aborted while compiling
            spec = children[0].sampling_params.structured_outputs
            status = self.structured.status(spec, fut)
            if status is None:
                waiting.append((fut, children))
            elif status == "ready":
                for req in children:
                    self.scheduler.add_request(req)
            else:
                err = str(self.structured.error(spec, fut))
                logger.warning("request %s: %s", group.request_id, err)
                for idx, comp in enumerate(group.outputs):
                    comp.finish_reason, comp.stop_reason = "abort", err
                    group.finished_children.add(idx)
                outputs.append(self._make_output(group))
                self.groups.pop(group.request_id, None)
                for cid in group.child_ids:
                    self._child_to_group.pop(cid, None)
        self._grammar_wait = waiting
        return outputs

    def _finish_grammars(self, ro: RunnerOutput) -> None:
        """A request whose grammar is complete stops (its last token was a stop token the
        grammar accepted; with ignore_eos nothing else would end it)."""
        if ro.grammar_finished:
            self.scheduler.finish_requests(ro.grammar_finished, RequestStatus.FINISHED_STOPPED)

    def validate_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise ValueError("prompt must not be empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt is {len(ids)} tokens, but max_model_len is {self.max_model_len}: "
                "it must be shorter to leave room for at least one generated token"
            )
        vocab = self.model_config.vocab_size
        bad = next((t for t in ids if not isinstance(t, int) or not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt_token_ids must be integers in [0, {vocab}) (got {bad!r})")

    def validate_params(self, params: SamplingParams) -> None:
        """Checks that need the model: token ids must exist in its vocabulary."""
        vocab = self.model_config.vocab_size
        bad = [t for t in (params.logit_bias or {}) if t >= vocab]
        if bad:
            raise ValueError(f"logit_bias token ids must be < vocab size {vocab} (got {bad[:5]})")
        bad = [t for t in params.stop_token_ids if t >= vocab]
        if bad:
            raise ValueError(f"stop_token_ids must be < vocab size {vocab} (got {bad[:5]})")

    def _detokenizer(self, prompt_ids: list[int], params: SamplingParams) -> IncrementalDetokenizer | None:
        if self.tokenizer is None:
            return None
        return IncrementalDetokenizer(
            self.tokenizer, prompt_ids, skip_special_tokens=params.skip_special_tokens,
            stop=params.stop, include_stop_str_in_output=params.include_stop_str_in_output,
        )

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        for rid in request_ids:
            group = self.groups.pop(rid, None)
            if group is None:
                continue
            self.scheduler.finish_requests(group.child_ids, RequestStatus.FINISHED_ABORTED)
            for cid in group.child_ids:
                self._child_to_group.pop(cid, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.groups)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.groups)

    # -- one step ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        if self.tp_group is not None:
            with self.tp_group.step_guard():  # a dead rank -> RankFailedError, all ranks stopped
                return self._step_overlapped() if self._overlap else self._step()
        if self._overlap:
            return self._step_overlapped()
        return self._step()

    @property
    def num_ahead_steps(self) -> int:
        """Steps launched before the previous step's tokens were back (asynchronous scheduling)."""
        return self.runner.num_ahead_steps

    def _launch(self, so: SchedulerOutput, ahead: bool = False) -> PendingStep:
        """Start a step on every rank: the plan goes out first, then this rank runs its share
        of the forward. `ahead`: planned by `Scheduler.schedule_ahead` while the last launched
        step still runs (its inputs are that step's sampled ids, on the device)."""
        if self.tp_group is not None:
            self.tp_group.send_plan((so, ahead))
        return self.runner.execute_async(so, ahead=ahead)

    def _step(self) -> list[RequestOutput]:
        failed = self._admit_compiled()
        so = self.scheduler.schedule()
        ro = self._launch(so).result()
        if so.is_empty:
            return failed
        updated, _finished = self.scheduler.update_from_output(so, ro.sampled)
        self._finish_grammars(ro)
        if self.spec is not None:
            self.spec.propose(self.scheduler)
        return failed + self._outputs(updated, ro)

    def _step_overlapped(self) -> list[RequestOutput]:
        """Complete step N (the one in flight, or a new one) and return its outputs, keeping
        the GPU busy meanwhile:

        - asynchronous scheduling: if `Scheduler.schedule_ahead` can plan step N+1 without
          N's tokens, N+1 is launched first (its inputs are N's sampled ids, on the device),
          then N's tokens are read and the scheduler advanced;
        - otherwise (or with it off): N's tokens are read, the scheduler advanced, and N+1
          scheduled and launched;

        and only then are N's outputs detokenized and built, while the GPU runs N+1. Step N+1
        may thus compute one token for a request that N or its bookkeeping ends (EOS, length
        is excluded by `schedule_ahead`, a stop string, an abort); the scheduler drops that
        token (the request is no longer running) and the request's blocks are reused only by
        steps queued after N+1."""
        failed = self._admit_compiled()
        if self._inflight is None:
            so = self.scheduler.schedule()
            self._inflight = (so, self._launch(so))
        so, pending = self._inflight
        self._inflight = None
        ahead = False
        # With speculation a step goes ahead only when nobody will be given drafts for it
        # (every decoding request is backed off): drafts need the in-flight step's tokens.
        if self.async_scheduling and not so.is_empty and (self.spec is None or self.spec.idle(self.scheduler)):
            nxt = self.scheduler.schedule_ahead(so)
            if nxt is not None:
                self._inflight = (nxt, self._launch(nxt, ahead=True))
                ahead = True
        ro = pending.result()
        if so.is_empty:
            return failed
        updated, _finished = self.scheduler.update_from_output(so, ro.sampled)
        self._finish_grammars(ro)
        if self.spec is not None:
            if ahead:  # the next step is planned (without drafts): count it as a backed-off step
                self.spec.skip(self.scheduler)
            else:
                self.spec.propose(self.scheduler)
        if self._inflight is None and self.scheduler.has_unfinished_requests():
            nxt = self.scheduler.schedule()
            self._inflight = (nxt, self._launch(nxt))
        return failed + self._outputs(updated, ro)

    def _outputs(self, updated: list[Request], ro: RunnerOutput) -> list[RequestOutput]:
        touched: dict[str, _Group] = {}
        for rid, lps in ro.prompt_logprobs.items():
            group, idx = self._child_to_group.get(rid, (None, -1))  # None: aborted meanwhile
            if idx == 0:
                self._add_prompt_logprobs(group, lps)
        for req in updated:
            group, idx = self._child_to_group[req.request_id]
            self._advance(group, idx, req, ro)
            touched[group.request_id] = group
        outputs = []
        for group in touched.values():
            outputs.append(self._make_output(group))
            if group.finished:
                self.groups.pop(group.request_id, None)
                for cid in group.child_ids:
                    self._child_to_group.pop(cid, None)
        return outputs

    def _advance(self, group: _Group, idx: int, req: Request, ro: RunnerOutput) -> None:
        comp = group.outputs[idx]
        new_ids = ro.sampled[req.request_id][: req.num_output_tokens - len(comp.token_ids)]
        comp.token_ids.extend(new_ids)
        comp.delta_token_ids = list(new_ids)
        if group.metrics.first_token_time is None:
            group.metrics.first_token_time = req.first_token_time
        if req.num_cached_tokens > group.metrics.num_cached_tokens:
            group.metrics.num_cached_tokens = req.num_cached_tokens
        group.metrics.num_preemptions = max(group.metrics.num_preemptions, req.num_preemptions)
        lps = ro.logprobs.get(req.request_id)
        if lps is not None:
            if comp.logprobs is None:
                comp.logprobs, comp.cumulative_logprob = [], 0.0
            for tok, entry in zip(new_ids, lps):
                comp.logprobs.append(self._logprob_dict(tok, entry))
                comp.cumulative_logprob += entry[0]
        detok = group.detoks[idx]
        if detok is not None:
            text_ids = new_ids
            if (
                req.status == RequestStatus.FINISHED_STOPPED
                and text_ids
                and not req.sampling_params.include_stop_str_in_output
            ):
                # The EOS / stop token that ended the request is not part of the text.
                text_ids = text_ids[:-1]
            # As in vLLM, stop strings count only once min_tokens tokens exist.
            if len(text_ids) > 1:  # a speculative step: stop at the token that completes a stop string
                stop_str = self._add_tokens_one_by_one(comp, detok, text_ids, req)
            else:
                stop_str = detok.add_tokens(text_ids, check_stop=req.num_output_tokens >= req.sampling_params.min_tokens)
            if stop_str is not None and not req.status.finished:
                self.scheduler.finish_requests([req.request_id], RequestStatus.FINISHED_STOPPED)
                req.stop_reason = stop_str
            if req.status.finished:
                detok.finish()
            comp.delta_text = detok.get_delta()
            comp.text = detok.output_text
        if req.status.finished:
            comp.finish_reason = req.status.finish_reason
            comp.stop_reason = req.stop_reason
            group.finished_children.add(idx)
            group.metrics.finished_time = time.time()

    def _add_tokens_one_by_one(self, comp: CompletionOutput, detok: IncrementalDetokenizer, ids: list[int], req: Request) -> str | None:
        """Feed several new tokens to the detokenizer one at a time, as plain decoding would;
        at a stop string, drop the tokens after the one that completed it (and their logprobs)."""
        first_out = len(comp.token_ids) - len(comp.delta_token_ids)  # output index of ids[0]
        min_tokens = req.sampling_params.min_tokens
        for j, tok in enumerate(ids):
            stop_str = detok.add_tokens([tok], check_stop=first_out + j + 1 >= min_tokens)
            if stop_str is not None:
                extra = len(comp.delta_token_ids) - (j + 1)  # the EOS after `ids` included
                if extra:
                    del comp.token_ids[len(comp.token_ids) - extra :]
                    del comp.delta_token_ids[len(comp.delta_token_ids) - extra :]
                    if comp.logprobs is not None:
                        for entry in comp.logprobs[len(comp.logprobs) - extra :]:
                            comp.cumulative_logprob -= next(iter(entry.values())).logprob
                        del comp.logprobs[len(comp.logprobs) - extra :]
                return stop_str
        return None

    def _logprob_dict(self, token: int, entry: tuple[float, int, list[int], list[float]]) -> dict[int, Logprob]:
        lp, rank, top_ids, top_lps = entry
        out = {token: Logprob(lp, rank, self._token_text(token))}
        for r, (tid, tlp) in enumerate(zip(top_ids, top_lps), start=1):
            if tid not in out:
                out[tid] = Logprob(tlp, r, self._token_text(tid))
        return out

    def _token_text(self, token: int) -> str | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def _add_prompt_logprobs(self, group: _Group, lps: list[tuple[float, int, list[int], list[float]]]) -> None:
        if group.prompt_logprobs is None:
            group.prompt_logprobs = [None]  # the first prompt token has no logprob
        start = len(group.prompt_logprobs)
        for j, entry in enumerate(lps):
            group.prompt_logprobs.append(self._logprob_dict(group.prompt_token_ids[start + j], entry))

    def _make_output(self, group: _Group) -> RequestOutput:
        outs = [
            CompletionOutput(
                c.index, c.text, list(c.token_ids), c.cumulative_logprob,
                list(c.logprobs) if c.logprobs is not None else None,
                c.finish_reason, c.stop_reason, c.delta_text, list(c.delta_token_ids),
            )
            for c in group.outputs
        ]
        for c in group.outputs:  # deltas are reported once
            c.delta_text, c.delta_token_ids = "", []
        return RequestOutput(
            group.request_id, group.prompt, group.prompt_token_ids, outs, group.finished,
            prompt_logprobs=group.prompt_logprobs, metrics=group.metrics,
            num_cached_tokens=group.metrics.num_cached_tokens,
        )

    def new_request_id(self) -> str:
        self._counter += 1
        return str(self._counter)

    def shutdown(self) -> None:
        """Stop the other tensor-parallel ranks (no-op without tensor parallelism)."""
        if self.tp_group is not None and self.tp_group.rank == 0:
            self._finalizer()

    # -- introspection ----------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        kv = self.scheduler.kv
        return {
            "num_running": self.scheduler.num_running,
            "num_waiting": self.scheduler.num_waiting,
            "kv_blocks_total": kv.num_blocks,
            "kv_blocks_free": kv.num_free_blocks,
            "kv_usage": kv.usage,
            "prefix_queries": kv.prefix_queries,
            "prefix_hits": kv.prefix_hits,
            "num_preemptions": self.scheduler.num_preemptions,
            **self.spec_stats(),
        }

    def spec_stats(self) -> dict[str, float]:
        """Speculative decoding totals (empty without it): verify steps of a request, draft
        and accepted tokens, acceptance rate, mean tokens per verify step (accepted + the one
        the target adds), seconds spent proposing."""
        if self.spec is None:
            return {}
        sch = self.scheduler
        n, drafts, acc = sch.num_spec_verifies, sch.num_draft_tokens, sch.num_accepted_tokens
        return {
            "spec_verify_steps": n,
            "spec_draft_tokens": drafts,
            "spec_accepted_tokens": acc,
            "spec_acceptance_rate": acc / drafts if drafts else 0.0,
            "spec_mean_accepted_length": 1.0 + acc / n if n else 0.0,
            "spec_draft_time_s": self.spec.draft_time_s,
        }


def _check_max_model_len(max_model_len: int | None, cfg) -> None:
    if max_model_len is not None and max_model_len > cfg.max_position_embeddings:
        raise ValueError(
            f"max_model_len={max_model_len} exceeds the model's context window "
            f"({cfg.max_position_embeddings} positions)"
        )


def run_tp_worker(args: EngineArgs, group: TPGroup) -> None:
    """A tensor-parallel rank other than 0: build the same engine (the same collectives in the
    same order as rank 0), then run every step rank 0 broadcasts until it sends None."""
    engine = LLMEngine(args, _tp_group=group)
    runner = engine.runner
    runner.is_driver = False
    group.report_ready()
    while True:
        plan = group.recv_plan()
        if plan is None:
            return
        so, ahead = plan
        # No wait here: the runner reads back the sampled ids (broadcast by rank 0 on the
        # device) when a later step needs them on the host, and refills a staging buffer only
        # after its copies ran, so this rank can launch an ahead step while the last one runs.
        runner.execute_async(so, ahead=ahead)

