"""The runner's verify step: one target forward over every speculating request's k + 1
positions, mixed with plain decode and prefill rows, then `rejection.verify`.

A speculating request's k + 1 positions enter the forward as k + 1 one-token "sequences" of
the same block table with context lengths L, L + 1, ..., L + k (L = its computed tokens + 1):
each sees exactly the positions before it, so attention stays the one-query decode path and
no backend needs a multi-query-per-sequence mode. The backends write the whole step's K/V
before any attention reads (the contract the prefix cache also relies on), which makes the
drafts' K/V visible to the later rows. The one-call CPU decoder stacks write each row's K/V
inside their attention loop; the GGML stack (fp32 activations, GGUF weights: the built-in
model's CPU path) detects rows of one sequence and writes their K/V first, splitting each
row's attention as a one-row decode would (so a verify row gives the bits of a plain decode
of that position); with any other stack a verify step is marked not-pure-decode and runs op
by op.

A step whose rows are all sampled one-token rows (decodes and verify rows, no prefill chunk)
replays the decode CUDA graph of its row count (`runner/cuda_graphs.py`: the ladder holds
b(k + 1) rows for each batch size b); others run eagerly.

Tensor parallelism: every rank runs the forward and the logits (collectives); rank 0 verifies
and broadcasts the emitted tokens (one tensor, a row of k + 1 slots per request, -1 past its
tokens), so every rank cuts its copy of each request back to the accepted tokens.

Synchronous: the accepted tokens are needed on the host before the next step is planned.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kvserve.distributed import parallel_state as ps
from kvserve.runner.sampler import SamplingBatch, compute_logprobs
from kvserve.spec_decode.rejection import VerifyRow, verify

if TYPE_CHECKING:
    from kvserve.core.scheduler import SchedulerOutput
    from kvserve.runner.model_runner import ModelRunner, RunnerOutput


def _stack_takes_verify_rows(model, ids: torch.Tensor) -> bool:
    """The model's one-call decoder stack (built now if it was not yet) can run rows of one
    sequence; only the GGML stack does (`platform/ggml_stack.py`)."""
    get = getattr(model, "_decode_stack", None)
    stack = get(ids) if get is not None else None
    return bool(getattr(stack, "verify_rows_ok", False))


def _graph_safe(model, n: int) -> bool:
    """A decode-graph replay of n verify rows is right: no one-call stack takes the rows, or
    it is one that handles rows of one sequence."""
    get = getattr(model, "_decode_stack", None)
    stack = get(torch.empty(n, dtype=torch.long)) if get is not None else None
    return stack is None or bool(getattr(stack, "verify_rows_ok", False))


def _needs_history(sp) -> bool:
    return bool(sp.repetition_penalty != 1.0 or sp.presence_penalty or sp.frequency_penalty or sp.min_tokens)


@torch.inference_mode()
def execute_verify(runner: ModelRunner, so: SchedulerOutput) -> RunnerOutput:
    from kvserve.runner.model_runner import RunnerOutput

    spec = so.spec_token_ids
    sched = so.num_scheduled_tokens
    # One-token rows (decodes and verify rows) first, then prefill chunks.
    order = sorted(sched, key=lambda r: sched[r] != 1 and r not in spec)
    states, nums, starts, sample_rows = [], [], [], []
    prompt_lp: list[tuple[str, int, int, int]] = []
    sample_reqs: list[tuple[str, int, list[int]]] = []  # (req, first logits row, drafts)
    params, gens, hist, nprompt = [], [], [], []
    row0 = 0
    for rid in order:
        st = runner.states[rid]
        n, start = sched[rid], st.num_computed_tokens
        sp = st.sampling_params
        drafts = spec.get(rid)
        if drafts:
            if n != len(drafts) + 1 or start != len(st.token_ids) - 1:
                raise RuntimeError(f"verify step of {rid}: {n} tokens from {start} for {len(drafts)} drafts")
            sample_reqs.append((rid, len(sample_rows), drafts))
            base = len(st.token_ids)
            st.token_ids.extend(drafts)  # inputs; cut back to the accepted tokens below
            for j in range(n):
                states.append(st)
                nums.append(1)
                starts.append(start + j)
                sample_rows.append(row0 + j)
                params.append(sp)
                gens.append(runner.generators.get(rid))
                hist.append(st.token_ids[: base + j] if _needs_history(sp) else st.token_ids)
                nprompt.append(st.num_prompt_tokens)
            row0 += n
            continue
        end = start + n
        if sp.prompt_logprobs is not None and start < st.num_prompt_tokens:
            first = max(start, runner.prompt_lp_done.get(rid, 0))
            upto = min(end, st.num_prompt_tokens - 1)
            if upto > first:
                prompt_lp.append((rid, row0 + first - start, first, upto - first))
                runner.prompt_lp_done[rid] = upto
        states.append(st)
        nums.append(n)
        starts.append(start)
        if end == len(st.token_ids):
            sample_reqs.append((rid, len(sample_rows), []))
            sample_rows.append(row0 + n - 1)
            params.append(sp)
            gens.append(runner.generators.get(rid))
            hist.append(st.token_ids)
            nprompt.append(st.num_prompt_tokens)
        row0 += n
    num_tokens = row0
    out = RunnerOutput()
    buf = runner.staging.next()
    graphs = runner.graphs
    graph_bs = None
    if graphs is not None and len(sample_rows) == num_tokens and not prompt_lp and _graph_safe(runner.model, num_tokens):
        graph_bs = graphs.padded_size(num_tokens)
    if graph_bs is not None:
        runner.num_graph_steps += 1
        graphs.load_inputs(buf, states, graph_bs, runner.tables, runner.block_size, starts=starts, verify=True)
        logits = graphs.replay(graph_bs, verify=True)[:num_tokens]  # [T, V]: every row is sampled
    else:
        ids_t, pos_t, md, sample_idx = runner._eager_inputs(buf, states, nums, starts, num_tokens, sample_rows)
        if not _stack_takes_verify_rows(runner.model, ids_t):
            md.is_pure_decode = False  # see the module docstring: op by op
        hidden = runner.model(ids_t, pos_t, runner.kv_caches, md)  # [T, hidden]
        for rid, r0, first, n in prompt_lp:
            st = runner.states[rid]
            lp_logits = runner.model.compute_logits(hidden[r0 : r0 + n])  # a collective under TP
            if not runner.is_driver:
                continue
            targets = torch.tensor(st.token_ids[first + 1 : first + 1 + n], device=runner.device)
            out.prompt_logprobs[rid] = compute_logprobs(lp_logits, targets, [st.sampling_params.prompt_logprobs] * n)
        if len(sample_rows) == num_tokens:
            logits = runner.model.compute_logits(hidden)
        else:
            logits = runner.model.compute_logits(hidden.index_select(0, sample_idx))  # [R, V]
    tp = ps.get_tp()
    if runner.is_driver:
        batch = SamplingBatch(params, gens, hist, nprompt, runner.eos_token_ids)
        if runner.grammars:
            _grammar_masks(runner, batch, sample_reqs, logits)
        processed = runner.sampler.process_logits(logits, batch)
        rows = [
            VerifyRow(r0, drafts, runner.states[rid].sampling_params, runner.generators.get(rid))
            for rid, r0, drafts in sample_reqs
        ]
        results = verify(processed, rows, runner.sampler.default_generator)
        if tp.size > 1:
            _broadcast_results(results, sample_reqs, runner.device, tp)
    else:
        results = _broadcast_results(None, sample_reqs, runner.device, tp)
    for (rid, r0, drafts), toks in zip(sample_reqs, results):
        st = runner.states[rid]
        if drafts:
            del st.token_ids[len(st.token_ids) - len(drafts) :]
        st.token_ids.extend(toks)
        out.sampled[rid] = toks
        grammar = runner.grammars.get(rid)
        if grammar is not None:
            for tok in toks:
                if grammar.accept(tok):
                    out.grammar_finished.add(rid)
                    break
        k = st.sampling_params.logprobs
        if k is not None and runner.is_driver:
            raw = logits[r0 : r0 + len(toks)]
            out.logprobs[rid] = compute_logprobs(raw, torch.tensor(toks, device=logits.device), [k] * len(toks))
    return out


def _broadcast_results(
    results: list[list[int]] | None, sample_reqs: list[tuple[str, int, list[int]]], device: torch.device, tp
) -> list[list[int]]:
    """Rank 0's emitted tokens to every rank (`results` on rank 0, None elsewhere): one long
    tensor with len(drafts) + 1 slots per request, -1 past a request's tokens."""
    widths = [len(drafts) + 1 for _, _, drafts in sample_reqs]
    flat = torch.full((sum(widths),), -1, dtype=torch.long)
    if results is not None:
        o = 0
        for w, toks in zip(widths, results):
            flat[o : o + len(toks)] = torch.tensor(toks, dtype=torch.long)
            o += w
    flat = flat.to(device)
    torch.distributed.broadcast(flat, src=0, group=tp.group)
    if results is not None:
        return results
    vals = flat.tolist()
    out, o = [], 0
    for w in widths:
        out.append([t for t in vals[o : o + w] if t >= 0])
        o += w
    return out


def _grammar_masks(runner: ModelRunner, batch: SamplingBatch, sample_reqs: list[tuple[str, int, list[int]]],
                   logits: torch.Tensor) -> None:
    """Structured output in a verify step: each constrained request's k + 1 rows get the
    masks of its grammar after 0 .. k of its drafts (a plain decode row: the current mask), so
    rejection sampling accepts only drafts the grammar allows and resamples within it."""
    from kvserve.structured.grammar import allocate_bitmask

    mask, rows = None, []
    for rid, r0, drafts in sample_reqs:
        grammar = runner.grammars.get(rid)
        if grammar is None:
            continue
        if mask is None:
            # [R, W] over the grammar's vocabulary; other rows unread
            mask = allocate_bitmask(logits.shape[0], runner.structured.compiler.vocab_size)
        grammar.fill_bitmask_for_drafts(mask, r0, drafts)
        rows.extend(range(r0, r0 + len(drafts) + 1))
    if mask is None:
        return
    if logits.device.type != "cpu":
        mask = mask.pin_memory().to(logits.device, non_blocking=True)
    batch.bitmask, batch.bitmask_rows = mask, rows
