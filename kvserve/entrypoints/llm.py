"""`LLM`: offline batch generation with vLLM's interface."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Iterator, Sequence

from kvserve.core.sampling_params import SamplingParams
from kvserve.engine.chat_template import render_chat, validate_messages
from kvserve.engine.arg_utils import EngineArgs
from kvserve.engine.llm_engine import LLMEngine, PromptType
from kvserve.engine.outputs import RequestOutput
from kvserve.loader.resolve import DEFAULT_MODEL

logger = logging.getLogger(__name__)

_SAMPLING_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
_RESERVED_TEMPLATE_VARS = frozenset(
    {"messages", "add_generation_prompt", "bos_token", "eos_token", "tools", "template"}
)


class LLM:
    """Load a model once, then generate for many prompts at a time.

    >>> llm = LLM("smollm2")
    >>> out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=8, temperature=0))
    >>> out[0].outputs[0].text
    """

    def __init__(self, model: str = DEFAULT_MODEL, **kwargs: Any) -> None:
        self.engine_args = EngineArgs.from_kwargs(model, **kwargs)
        self.engine = LLMEngine(self.engine_args)

    def get_tokenizer(self):
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams carrying the model's generation_config.json defaults (if any)."""
        gen = self.engine.loaded.generation_defaults
        kwargs = {k: gen[k] for k in _SAMPLING_DEFAULT_KEYS if k in gen and gen[k] is not None}
        if gen.get("do_sample") is False:
            kwargs["temperature"] = 0.0
        return SamplingParams(**kwargs)

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate completions; results come back in input order."""
        prompts = _as_prompt_list(prompts)
        params = self._params_list(sampling_params, len(prompts))
        ids = self._add(prompts, params)
        return self._run(ids, use_tqdm=use_tqdm and len(prompts) > 1)

    def generate_stream(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> Iterator[RequestOutput]:
        """Yield partial RequestOutputs as tokens are decoded (each carries `delta_text`)."""
        prompts = _as_prompt_list(prompts)
        params = self._params_list(sampling_params, len(prompts))
        ids = set(self._add(prompts, params))
        try:
            while ids:
                for out in self.engine.step():
                    if out.request_id in ids:
                        if out.finished:
                            ids.discard(out.request_id)
                        yield out
        finally:
            if ids:  # the consumer stopped early: free the requests' blocks
                self.engine.abort_request(list(ids))

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of ``{"role", "content"}`` messages) or
        to a list of conversations; results come back in input order.

        Each conversation is rendered with the model's own chat template (or ``chat_template``)
        in a sandbox and tokenized without adding special tokens again, as transformers'
        ``apply_chat_template(tokenize=True)`` does. A malformed or unsafe template raises
        ``ChatTemplateError`` (a ValueError); a malformed message raises ValueError naming the
        field, e.g. ``messages[1].role``.
        """
        conversations = _as_conversations(messages)
        prompts = []
        for i, conv in enumerate(conversations):
            try:
                prompts.append(self.chat_prompt(
                    conv, add_generation_prompt=add_generation_prompt, chat_template=chat_template,
                    chat_template_kwargs=chat_template_kwargs,
                ))
            except ValueError as e:
                if len(conversations) == 1:
                    raise
                raise type(e)(f"conversations[{i}]: {e}") from e
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def chat_prompt(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """One conversation -> ``{"prompt": text, "prompt_token_ids": ids}``, ready for
        `generate` / `generate_stream` (what `chat` sends)."""
        tok = self.engine.tokenizer
        if tok is None:
            raise ValueError("this model has no tokenizer, so chat is not available")
        msgs = validate_messages(messages)
        extra = dict(chat_template_kwargs or {})
        clash = sorted(_RESERVED_TEMPLATE_VARS & set(extra))
        if clash:
            raise ValueError(f"chat_template_kwargs cannot set {clash}")
        template = chat_template if chat_template is not None else tok.chat_template
        text = render_chat(
            template, msgs, add_generation_prompt=add_generation_prompt,
            bos_token=tok.bos_token, eos_token=tok.eos_token, **extra,
        )
        # The template writes any BOS itself; adding special tokens again would double it.
        ids = tok.encode(text, add_special_tokens=False)
        if not ids:
            raise ValueError("messages rendered to an empty prompt")
        return {"prompt": text, "prompt_token_ids": ids}

    # -- helpers ----------------------------------------------------------------------------
    def _params_list(
        self, sampling_params: SamplingParams | Sequence[SamplingParams] | None, n: int
    ) -> list[SamplingParams]:
        if sampling_params is None:
            return [self.get_default_sampling_params()] * n
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * n
        params = list(sampling_params)
        if len(params) != n:
            raise ValueError(f"sampling_params has {len(params)} entries for {n} prompts")
        if not all(isinstance(p, SamplingParams) for p in params):
            raise ValueError("sampling_params must be SamplingParams objects")
        return params

    def _add(self, prompts: list[PromptType], params: list[SamplingParams]) -> list[str]:
        # Tokenize and validate everything before queuing anything, so a bad prompt leaves
        # nothing behind.
        tokenized = []
        for i, p in enumerate(prompts):
            try:
                text, token_ids = self.engine.tokenize_prompt(p)
                self.engine.validate_prompt(token_ids)
            except ValueError as e:
                raise ValueError(f"prompts[{i}]: {e}") from None
            tokenized.append({"prompt": text, "prompt_token_ids": token_ids})
        # Grammars compile here (once per distinct spec), so an invalid one raises ValueError
        # before anything is queued; the engine then finds them in its cache.
        for i, sp in enumerate(params):
            if sp.structured_outputs is not None:
                try:
                    self.engine.structured.get(sp.structured_outputs)
                except ValueError as e:
                    raise ValueError(f"sampling_params[{i}]: {e}") from None
        ids = []
        try:
            for prompt, sp in zip(tokenized, params):
                rid = self.engine.new_request_id()
                self.engine.add_request(rid, prompt, sp)
                ids.append(rid)
        except Exception:
            self.engine.abort_request(ids)
            raise
        return ids

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        pending = set(ids)
        results: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), desc="Processed prompts", dynamic_ncols=True)
        try:
            while pending:
                for out in self.engine.step():
                    if out.finished and out.request_id in pending:
                        results[out.request_id] = out
                        pending.discard(out.request_id)
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            self.engine.abort_request(list(pending))
            raise
        finally:
            if bar is not None:
                bar.close()
        return [results[i] for i in ids]


def _as_prompt_list(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, Sequence) and prompts and all(isinstance(t, int) for t in prompts):
        return [list(prompts)]  # a single token-id prompt
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts must not be empty")
    return prompts


def _as_conversations(messages: Any) -> list[Any]:
    """One conversation (a list of message dicts) or a list of them -> a list of them."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise ValueError("messages must be a non-empty list of messages or a list of conversations")
    if all(isinstance(m, Sequence) and not isinstance(m, (str, bytes)) for m in messages):
        return list(messages)
    return [messages]
