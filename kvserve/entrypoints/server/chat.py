"""POST /v1/chat/completions: messages -> the model's chat template -> one engine request;
logprobs in the chat format; streaming with role / content deltas. A gpt-oss reply is split into
its channels (`engine/harmony.py`): the analysis as `reasoning_content`, the rest as `content`,
and (with tools, tool_choice "auto") its messages to `functions.NAME` as `tool_calls`."""

from __future__ import annotations

import time
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from kvserve.engine.chat_template import ChatTemplateError, validate_messages
from kvserve.entrypoints.server.errors import bad_request
from kvserve.entrypoints.server.logprobs import chat_logprobs
from kvserve.entrypoints.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessage,
    DeltaMessage,
    FunctionCall,
    ToolCallOut,
    UsageInfo,
    random_id,
)
from kvserve.entrypoints.server.serving import (
    SSE_DONE,
    ServerState,
    SSEResponse,
    abort_all,
    add_requests,
    build_sampling_params,
    check_context,
    check_stream_options,
    collect_final,
    parse_request,
    render_chat_limited,
    stream_error,
    to_sse,
)
from kvserve.entrypoints.server.structured import (
    ToolPlan,
    ToolStream,
    compile_spec,
    extract_calls,
    finish_reason,
    new_call_id,
    plan_tools,
    structured_spec,
)
from kvserve.structured.tool_parsers import PartialCall, ToolCall

_RESERVED_TEMPLATE_VARS = {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token"}
_MAX_TOP_LOGPROBS = 20


async def render_messages(
    state: ServerState,
    messages: Any,
    *,
    chat_template: str | None,
    chat_template_kwargs: dict[str, Any] | None,
    add_generation_prompt: bool,
    continue_final_message: bool,
    tools: list[dict[str, Any]] | None,
) -> tuple[str, list[dict[str, Any]]]:
    """Messages -> prompt text with the model's chat template (or the request's, when the
    operator allowed request templates). Every failure is a 400."""
    tok = state.engine.tokenizer
    if tok is None:
        raise bad_request("this model has no tokenizer, so chat is not available", param="messages")
    if chat_template is not None and not state.allow_request_chat_template:
        raise bad_request(
            "chat_template in requests is disabled on this server (start it with "
            "--allow-request-chat-template to allow it)", param="chat_template",
        )
    try:
        msgs = validate_messages(messages)
    except ValueError as e:
        raise bad_request(str(e), param="messages") from None
    if continue_final_message:
        if add_generation_prompt:
            raise bad_request("continue_final_message and add_generation_prompt cannot both be true",
                              param="continue_final_message")
        if msgs[-1]["role"] != "assistant":
            raise bad_request("continue_final_message needs an assistant message last", param="messages")
    extra = dict(chat_template_kwargs or {})
    clash = sorted(_RESERVED_TEMPLATE_VARS & set(extra))
    if clash:
        raise bad_request(f"chat_template_kwargs cannot set {clash}", param="chat_template_kwargs")
    template = chat_template if chat_template is not None else tok.chat_template
    try:
        text = await render_chat_limited(
            state, template, msgs, add_generation_prompt=add_generation_prompt,
            bos_token=tok.bos_token, eos_token=tok.eos_token, tools=tools, **extra,
        )
    except ChatTemplateError as e:
        raise bad_request(str(e), param="chat_template" if chat_template is not None else "messages") from None
    if continue_final_message:
        last = msgs[-1]["content"]
        cut = text.rfind(last) if last else -1
        if cut >= 0:
            text = text[: cut + len(last)]
    return text, msgs


async def create_chat_completion(request: Request, state: ServerState) -> Response:
    req = await parse_request(request, state, ChatCompletionRequest)
    state.check_model(req.model)
    include_usage = check_stream_options(req)
    spec, spec_param = structured_spec(req)
    plan = plan_tools(req, state)
    if plan.spec is not None:
        if spec is not None:
            raise bad_request(f"tool_choice={req.tool_choice!r} cannot be combined with {spec_param}",
                              param=spec_param)
        spec, spec_param = plan.spec, "tools"
    text, msgs = await render_messages(
        state, req.messages, chat_template=req.chat_template, chat_template_kwargs=req.chat_template_kwargs,
        add_generation_prompt=req.add_generation_prompt, continue_final_message=req.continue_final_message,
        tools=req.tools,
    )
    ids = await state.encode(text, add_special_tokens=req.add_special_tokens)
    if not ids:
        raise bad_request("the rendered conversation is empty", param="messages")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    if max_tokens is not None and max_tokens < 1:
        raise bad_request(f"{param} must be >= 1 (got {max_tokens})", param=param)
    top = _top_logprobs(req)
    params = build_sampling_params(req, state, max_tokens=max_tokens, logprobs=top)
    check_context(state, len(ids), max_tokens, req.min_tokens, what="messages")
    if spec is not None:
        await compile_spec(state, spec, spec_param)  # a 400 for a bad schema / grammar
        params = params.clone(structured_outputs=spec)
    if plan.harmony:  # a harmony tool call ends the turn with <|call|>, whatever generation_config lists
        call_id = state.engine.tokenizer.backend.token_to_id("<|call|>")
        if call_id is not None and call_id not in params.stop_token_ids:
            params = params.clone(stop_token_ids=[*params.stop_token_ids, call_id])
    echo = msgs[-1]["content"] if req.echo and msgs[-1]["role"] == "assistant" else ""

    rid = random_id("chatcmpl")
    trackers = [state.metrics.tracker(len(ids))]
    streams = await add_requests(state, [(rid, {"prompt_token_ids": ids, "prompt": text}, params)], request)
    tok = state.engine.tokenizer
    if req.stream:
        return SSEResponse(_stream(state, rid, req.model or state.model_name, streams, trackers, params.n, top, echo,
                                    include_usage, len(ids), plan))
    state.metrics.in_flight += 1
    try:
        finals = await collect_final(request, state, streams, trackers)
    finally:
        state.metrics.in_flight -= 1
    if finals is None:
        return Response(status_code=499)  # the client is gone
    out = finals[0]
    choices = []
    for c in out.outputs:
        text, reasoning, calls = c.text, None, None
        harmony = state.harmony_parser(tools=plan.harmony)
        if harmony is not None:
            reasoning, text = harmony.parse(c.token_ids)
            if plan.harmony:
                calls = _harmony_calls(harmony)
        message = _message(plan, echo, text, calls)
        message.reasoning_content = reasoning or None
        choices.append(ChatCompletionResponseChoice(
            index=c.index, message=message,
            logprobs=chat_logprobs(c.logprobs or [], c.token_ids, top, tok) if top is not None else None,
            finish_reason=finish_reason(plan, calls if calls is not None else extract_calls(plan, text)[1],
                                        c.finish_reason),
            stop_reason=c.stop_reason,
        ))
    completion_tokens = sum(len(c.token_ids) for c in out.outputs)
    resp = ChatCompletionResponse(
        id=rid, model=req.model or state.model_name, choices=choices,
        usage=UsageInfo(prompt_tokens=len(ids), completion_tokens=completion_tokens,
                        total_tokens=len(ids) + completion_tokens),
    )
    return JSONResponse(resp.model_dump())


def _harmony_calls(parser: Any) -> list[ToolCall]:
    return [ToolCall(name, args) for name, args in parser.calls]


def _message(plan: ToolPlan, echo: str, text: str, calls: list[ToolCall] | None = None) -> ChatMessage:
    """The assistant message: content, and the tool calls the output holds (if tools are on;
    `calls` when already read from a harmony reply, whose `text` is then content only)."""
    if not plan.active:
        return ChatMessage(role="assistant", content=echo + text)
    if calls is None:
        content, calls = extract_calls(plan, text)
    else:
        content = text
    if not calls:
        return ChatMessage(role="assistant", content=echo + text)
    tool_calls = [ToolCallOut(id=new_call_id(plan), function=FunctionCall(name=c.name, arguments=c.arguments))
                  for c in calls]
    return ChatMessage(role="assistant", content=(echo + content) if content else None, tool_calls=tool_calls)


def _top_logprobs(req: ChatCompletionRequest) -> int | None:
    if req.top_logprobs is not None:
        if not req.logprobs:
            raise bad_request("top_logprobs needs logprobs=true", param="top_logprobs")
        if not 0 <= req.top_logprobs <= _MAX_TOP_LOGPROBS:
            raise bad_request(f"top_logprobs must be in [0, {_MAX_TOP_LOGPROBS}] (got {req.top_logprobs})",
                              param="top_logprobs")
    return (req.top_logprobs or 0) if req.logprobs else None


async def _stream(state: ServerState, rid: str, model: str, streams: list, trackers: list, n: int, top: int | None,
                  echo: str, include_usage: bool, prompt_tokens: int, plan: ToolPlan) -> AsyncIterator[str]:
    state.metrics.in_flight += 1
    tok = state.engine.tokenizer
    finished = [False] * n
    lp_sent = [0] * n
    completion_tokens = 0
    created = int(time.time())
    tools = [ToolStream(plan) for _ in range(n)] if plan.active else None
    harmony = [state.harmony_parser(tools=plan.harmony) for _ in range(n)]

    def chunk(choice: ChatCompletionResponseStreamChoice) -> str:
        return to_sse(ChatCompletionStreamResponse(id=rid, created=created, model=model, choices=[choice]))

    try:
        for i in range(n):
            yield chunk(ChatCompletionResponseStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=echo)))
        async for out in streams[0]:
            trackers[0].observe(out)
            completion_tokens = sum(len(c.token_ids) for c in out.outputs)
            for c in out.outputs:
                if finished[c.index]:
                    continue
                logprobs = None
                if top is not None and c.logprobs and len(c.logprobs) > lp_sent[c.index]:
                    start = lp_sent[c.index]
                    new = c.logprobs[start:]
                    logprobs = chat_logprobs(new, c.token_ids[start: start + len(new)], top, tok)
                    lp_sent[c.index] += len(new)
                delta = c.delta_text
                if harmony[c.index] is not None:
                    reasoning, delta = harmony[c.index].feed(c.token_ids, finished=c.finish_reason is not None)
                    if reasoning:
                        yield chunk(ChatCompletionResponseStreamChoice(
                            index=c.index, delta=DeltaMessage(reasoning_content=reasoning)))
                if tools is not None:
                    ts = tools[c.index]
                    hp = harmony[c.index] if plan.harmony else None
                    if hp is not None:
                        deltas = ts.feed_harmony(delta, [PartialCall(n_, a) for n_, a in hp.calls])
                    else:
                        deltas = ts.feed(delta)
                    reason = None
                    if c.finish_reason is not None:
                        finished[c.index] = True
                        more, reason = ts.finish(c.finish_reason, _harmony_calls(hp) if hp is not None else None)
                        deltas += more
                    for j, d in enumerate(deltas):
                        yield chunk(ChatCompletionResponseStreamChoice(
                            index=c.index, delta=DeltaMessage(**d), logprobs=logprobs if j == 0 else None))
                    if reason is not None or (logprobs is not None and not deltas):
                        yield chunk(ChatCompletionResponseStreamChoice(
                            index=c.index, delta=DeltaMessage(), logprobs=None if deltas else logprobs,
                            finish_reason=reason, stop_reason=c.stop_reason if reason is not None else None,
                        ))
                    continue
                if c.finish_reason is not None:
                    finished[c.index] = True
                elif not delta and logprobs is None:
                    continue
                yield chunk(ChatCompletionResponseStreamChoice(
                    index=c.index, delta=DeltaMessage(content=delta or None),
                    logprobs=logprobs, finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason if c.finish_reason is not None else None,
                ))
        if include_usage:
            usage = UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                              total_tokens=prompt_tokens + completion_tokens)
            yield to_sse(ChatCompletionStreamResponse(id=rid, created=created, model=model, choices=[], usage=usage))
    except Exception as e:  # the engine failed or stopped: tell the client in-band (status is already 200)
        yield stream_error(state, e)
    finally:
        abort_all(state, streams)
        state.metrics.in_flight -= 1
    yield SSE_DONE
