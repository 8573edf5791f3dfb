"""POST /v1/completions: text, list of texts, token ids or lists of token ids; echo; logprobs
(legacy format); scoring (echo + logprobs + max_tokens 0); streaming."""

from __future__ import annotations

import time
from contextlib import aclosing
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from kvserve.engine.outputs import CompletionOutput, RequestOutput
from kvserve.entrypoints.server.errors import bad_request
from kvserve.entrypoints.server.logprobs import completion_logprobs
from kvserve.entrypoints.server.protocol import (
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionResponseStreamChoice,
    CompletionStreamResponse,
    UsageInfo,
    random_id,
)
from kvserve.entrypoints.server.serving import (
    MAX_N,
    SSE_DONE,
    ServerState,
    SSEResponse,
    abort_all,
    add_requests,
    build_sampling_params,
    check_context,
    check_prompt_count,
    check_stream_options,
    check_token_ids,
    collect_final,
    merge_streams,
    parse_request,
    stream_error,
    to_sse,
)
from kvserve.entrypoints.server.structured import compile_spec, structured_spec


@dataclass
class _Prompt:
    text: str  # what echo returns
    ids: list[int]


async def _prompts(req: CompletionRequest, state: ServerState) -> list[_Prompt]:
    raw = req.prompt
    if isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int)):
        raw = [raw]  # type: ignore[list-item]
    if not raw:
        raise bad_request("prompt must not be empty", param="prompt")
    check_prompt_count(raw, req.n)  # before tokenizing anything
    tok = state.engine.tokenizer
    out = []
    for i, p in enumerate(raw):
        where = "prompt" if len(raw) == 1 else f"prompt[{i}]"
        if isinstance(p, str):
            if tok is None:
                raise bad_request("this model has no tokenizer: send token ids as the prompt", param="prompt")
            ids = await state.encode(p, add_special_tokens=req.add_special_tokens)
            text = p
        else:
            ids = list(p)
            check_token_ids(state, ids, where)
            text = tok.decode(ids, skip_special_tokens=False) if tok is not None else ""
        if not ids:
            raise bad_request(f"{where} must not be empty", param="prompt")
        out.append(_Prompt(text, ids))
    return out


async def create_completion(request: Request, state: ServerState) -> Response:
    req = await parse_request(request, state, CompletionRequest)
    state.check_model(req.model)
    if req.suffix:
        raise bad_request("suffix is not supported", param="suffix")
    include_usage = check_stream_options(req)
    spec, spec_param = structured_spec(req)
    prompts = await _prompts(req, state)
    n = req.n if isinstance(req.n, int) and req.n > 0 else 1
    if len(prompts) * n > MAX_N:
        raise bad_request(f"n x number of prompts must be <= {MAX_N} (got {len(prompts) * n})", param="n")
    echo = bool(req.echo)
    max_tokens = req.max_tokens
    if max_tokens is not None and max_tokens < 0:
        raise bad_request(f"max_tokens must be >= 0 (got {max_tokens})", param="max_tokens")
    scoring = max_tokens == 0
    if scoring and not echo:
        raise bad_request("max_tokens must be >= 1 (0 is only allowed with echo=true, to score the prompt)",
                          param="max_tokens")
    if scoring and req.min_tokens:
        raise bad_request(f"min_tokens must be <= max_tokens (got {req.min_tokens} > 0)", param="min_tokens")
    # The engine always generates; for max_tokens 0 it generates one token that is dropped.
    params = build_sampling_params(
        req, state, max_tokens=1 if scoring else max_tokens,
        logprobs=None if scoring else req.logprobs,
        prompt_logprobs=req.logprobs if echo and req.logprobs is not None else None,
    )
    for p in prompts:
        check_context(state, len(p.ids), max_tokens, req.min_tokens)
    if spec is not None and not scoring:
        await compile_spec(state, spec, spec_param)  # a 400 for a bad schema / regex / grammar
        params = params.clone(structured_outputs=spec)

    base_id = random_id("cmpl")
    trackers = [state.metrics.tracker(len(p.ids)) for p in prompts]
    streams = await add_requests(state, [
        (f"{base_id}-{i}", {"prompt_token_ids": p.ids, "prompt": p.text}, params) for i, p in enumerate(prompts)
    ], request)
    fmt = _Formatter(req, state, prompts, n, scoring)
    if req.stream:
        return SSEResponse(_stream(state, base_id, streams, trackers, fmt, include_usage))
    state.metrics.in_flight += 1
    try:
        finals = await collect_final(request, state, streams, trackers)
    finally:
        state.metrics.in_flight -= 1
    if finals is None:
        return Response(status_code=499)  # the client is gone; nobody reads this
    choices = [fmt.final_choice(i, out, c) for i, out in enumerate(finals) for c in out.outputs]
    completion_tokens = 0 if scoring else sum(len(c.token_ids) for out in finals for c in out.outputs)
    prompt_tokens = sum(len(p.ids) for p in prompts)
    resp = CompletionResponse(
        id=base_id, model=fmt.model, choices=choices,
        usage=UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                        total_tokens=prompt_tokens + completion_tokens),
    )
    return JSONResponse(resp.model_dump())


class _Formatter:
    """Turns engine outputs into choices; remembers per choice what a stream already sent."""

    def __init__(self, req: CompletionRequest, state: ServerState, prompts: list[_Prompt], n: int,
                 scoring: bool) -> None:
        self.req, self.prompts, self.n, self.scoring = req, prompts, n, scoring
        self.tok = state.engine.tokenizer
        self.model = req.model or state.model_name
        self.echo = bool(req.echo)
        self.want_logprobs = req.logprobs is not None
        k = len(prompts) * n
        self.started = [False] * k
        self.finished = [False] * k
        self.lp_sent = [0] * k  # generated-token logprobs already streamed
        self.offset = [0] * k  # text_offset of the next streamed token

    def final_choice(self, i: int, out: RequestOutput, c: CompletionOutput) -> CompletionResponseChoice:
        prompt = self.prompts[i]
        text = "" if self.scoring else c.text
        logprobs = None
        if self.want_logprobs:
            entries: list = []
            ids: list[int] = []
            if self.echo:
                entries += _prompt_entries(out, len(prompt.ids))
                ids += prompt.ids
            if not self.scoring:
                entries += c.logprobs or []
                ids += c.token_ids
            logprobs = completion_logprobs(entries, ids, self.tok)
        return CompletionResponseChoice(
            index=i * self.n + c.index, text=(prompt.text + text) if self.echo else text, logprobs=logprobs,
            finish_reason="length" if self.scoring else c.finish_reason,
            stop_reason=None if self.scoring else c.stop_reason,
        )

    def stream_choice(self, i: int, out: RequestOutput, c: CompletionOutput) -> CompletionResponseStreamChoice | None:
        idx = i * self.n + c.index
        if self.finished[idx]:
            return None
        text = ""
        entries: list = []
        ids: list[int] = []
        if not self.started[idx]:
            self.started[idx] = True
            if self.echo:
                text = self.prompts[i].text
                if self.want_logprobs:
                    entries += _prompt_entries(out, len(self.prompts[i].ids))
                    ids += self.prompts[i].ids
        if not self.scoring:
            text += c.delta_text
            if self.want_logprobs and c.logprobs:
                new = c.logprobs[self.lp_sent[idx]:]
                ids += c.token_ids[self.lp_sent[idx]: self.lp_sent[idx] + len(new)]
                entries += new
                self.lp_sent[idx] += len(new)
        finish = c.finish_reason
        if finish is not None:
            self.finished[idx] = True
            if self.scoring:
                finish = "length"
        if not text and finish is None and not entries:
            return None
        logprobs = None
        if self.want_logprobs:
            logprobs = completion_logprobs(entries, ids, self.tok, self.offset[idx])
            if logprobs.tokens:
                self.offset[idx] = logprobs.text_offset[-1] + len(logprobs.tokens[-1])
        return CompletionResponseStreamChoice(
            index=idx, text=text, logprobs=logprobs, finish_reason=finish,
            stop_reason=None if self.scoring or finish is None else c.stop_reason,
        )


def _prompt_entries(out: RequestOutput, num_prompt: int) -> list:
    lps = out.prompt_logprobs or [None]
    return list(lps[:num_prompt]) + [None] * (num_prompt - len(lps))


async def _stream(state: ServerState, base_id: str, streams: list, trackers: list,
                  fmt: _Formatter, include_usage: bool) -> AsyncIterator[str]:
    state.metrics.in_flight += 1
    created = int(time.time())
    completion_tokens = [0] * len(streams)
    try:
        async with aclosing(merge_streams(streams)) as outputs:
            async for i, out in outputs:
                trackers[i].observe(out)
                if not fmt.scoring:
                    completion_tokens[i] = sum(len(c.token_ids) for c in out.outputs)
                for c in out.outputs:  # one event per choice, as OpenAI streams n > 1
                    ch = fmt.stream_choice(i, out, c)
                    if ch is not None:
                        yield to_sse(CompletionStreamResponse(id=base_id, created=created, model=fmt.model, choices=[ch]))
        if include_usage:
            prompt_tokens = sum(len(p.ids) for p in fmt.prompts)
            usage = UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=sum(completion_tokens),
                              total_tokens=prompt_tokens + sum(completion_tokens))
            yield to_sse(CompletionStreamResponse(id=base_id, created=created, model=fmt.model, choices=[],
                                                  usage=usage))
    except Exception as e:  # the engine failed or stopped: tell the client in-band (status is already 200)
        yield stream_error(state, e)
    finally:
        abort_all(state, streams)
        state.metrics.in_flight -= 1
    yield SSE_DONE
