"""Chat template rendering: a model's Jinja template + messages -> prompt text.

Chat templates come from checkpoints (Hub repos, GGUF metadata) and are untrusted code, so they
run in Jinja's immutable sandbox with the same globals and settings transformers provides
(``raise_exception``, ``strftime_now``, a non-escaping ``tojson``, ``trim_blocks`` and
``lstrip_blocks``, the loop-controls extension), plus a few guards of our own: touching any
private or internal attribute raises instead of rendering as empty, ``namespace`` objects refuse
underscore names, and ``*``/``**`` refuse results that would exhaust memory. ``render_chat``
can also bound the render's wall time and output size (``time_limit``, ``max_chars``): the
limits are checked at every call, ``range`` step, string ``+``/``~`` and output chunk of the
template (the server also runs it on a worker thread it can interrupt). Every failure
(syntax, sandbox violation, ``raise_exception``, a bug in the template) surfaces as
``ChatTemplateError``, a ``ValueError`` the server reports as a 400.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.utils
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range

logger = logging.getLogger(__name__)

ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})
_MAX_REPEAT_LEN = 1_000_000  # largest str/list a template may build with `*`
_MAX_POW_BITS = 4096  # largest integer (in bits) a template may build with `**`
_TEMPLATE_CACHE_SIZE = 32


class ChatTemplateError(ValueError):
    """The chat template is missing, malformed, unsafe, or refused the conversation."""


class ChatTemplateLimitError(ChatTemplateError):
    """Rendering ran past its time or output-size limit."""


# The limits of the render running on this thread (render_chat sets them).
_limits = threading.local()


def _check_limits(size: int = 0) -> None:
    deadline = getattr(_limits, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        raise ChatTemplateLimitError(
            f"chat template rendering took longer than the limit of {_limits.time_limit:g} s"
        )
    max_chars = getattr(_limits, "max_chars", None)
    if max_chars is not None and size > max_chars:
        raise ChatTemplateLimitError(
            f"chat template output (or a string it builds) is larger than the limit of {max_chars} characters"
        )


class _CheckedRange:
    """``range`` for templates: the sandbox's size cap, plus the limits checked every step."""

    def __init__(self, *args: int) -> None:
        self._range = safe_range(*args)

    def __iter__(self) -> Any:
        for i in self._range:
            _check_limits()
            yield i

    def __len__(self) -> int:
        return len(self._range)

    def __getitem__(self, index: Any) -> Any:
        return self._range[index]


def _checked_range(*args: int) -> _CheckedRange:
    return _CheckedRange(*args)


def _checked_join(join: Any) -> Any:
    def joined(seq: Any) -> Any:
        out = join(seq)
        _check_limits(len(out))
        return out

    return joined


# -- the sandbox --------------------------------------------------------------------------------
class _Sandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "+"})

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        _check_limits()
        return super().call(__context, __obj, *args, **kwargs)

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        # The stock sandbox returns an Undefined that renders as '' until it is used further;
        # a template that reaches for internals is broken or hostile either way, so say so.
        raise SecurityError(
            f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is not allowed"
        )

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                    if len(seq) * n > _MAX_REPEAT_LEN:
                        raise SecurityError(
                            f"`*` would build a sequence longer than {_MAX_REPEAT_LEN}"
                        )
        elif operator == "**" and isinstance(left, int) and isinstance(right, int):
            if right > 0 and abs(left) > 1 and abs(left).bit_length() * right > _MAX_POW_BITS:
                raise SecurityError(f"`**` would build an integer larger than {_MAX_POW_BITS} bits")
        result = super().call_binop(context, operator, left, right)
        if isinstance(result, (str, list, tuple)):
            _check_limits(len(result))
        return result


class _Namespace(jinja2.utils.Namespace):
    """jinja's ``namespace()`` minus underscore-prefixed names."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - mirrors jinja's signature
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"namespace attributes may not start with '_' (got {name!r})")


class _DictFactory:
    """Stands in for the ``dict`` type in templates: builds dicts, exposes nothing else."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, keys: Any, value: Any = None) -> dict[Any, Any]:
        return dict.fromkeys(keys, value)


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Unlike jinja's own filter: no HTML escaping, non-ASCII kept (what templates were written for).
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


@functools.lru_cache(maxsize=1)
def _environment() -> _Sandbox:
    version = tuple(int(p) for p in jinja2.__version__.split(".")[:3] if p.isdigit())
    if version < (3, 1, 6):
        raise ChatTemplateError(
            f"jinja2>=3.1.6 is required to run chat templates safely (found {jinja2.__version__}, "
            "which has known sandbox escapes)"
        )
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    env.globals["dict"] = _DictFactory()
    env.globals["range"] = _checked_range
    return env


@functools.lru_cache(maxsize=_TEMPLATE_CACHE_SIZE)
def _compile(template: str) -> jinja2.Template:
    try:
        compiled = _environment().from_string(template)
    except TemplateSyntaxError as e:
        raise ChatTemplateError(
            f"chat template syntax error on line {e.lineno}: {e.message}"
        ) from e
    except Exception as e:  # e.g. a SecurityError raised at compile time
        raise ChatTemplateError(f"chat template could not be compiled: {_describe(e)}") from e
    # `a ~ b` compiles to a call of these module-level names: bound its result like `+`'s.
    namespace = compiled.root_render_func.__globals__
    for name in ("str_join", "markup_join"):
        if name in namespace:
            namespace[name] = _checked_join(namespace[name])
    return compiled


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


# -- rendering ----------------------------------------------------------------------------------
def render_chat(
    template: str | None,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    bos_token: str | None = None,
    eos_token: str | None = None,
    tools: list[dict[str, Any]] | None = None,
    max_chars: int | None = None,
    time_limit: float | None = None,
    **extra: Any,
) -> str:
    """Render messages with the model's chat template (same output as transformers'
    ``apply_chat_template(..., tokenize=False)``). Messages are passed as given (call
    ``validate_messages`` first for user input), converted to plain data so the template can
    reach nothing but dicts, lists, strings and numbers. ``extra`` becomes template variables
    (e.g. ``enable_thinking=False``). ``max_chars`` bounds the output (and any string the
    template builds), ``time_limit`` the seconds rendering may take: past either,
    ``ChatTemplateLimitError``."""
    if not template or not template.strip():
        raise ChatTemplateError("model has no chat template; pass a prompt instead")
    compiled = _compile(template)
    context: dict[str, Any] = {
        "messages": _plain(messages, "messages"),
        "tools": _plain(tools, "tools"),
        "add_generation_prompt": add_generation_prompt,
    }
    if bos_token is not None:
        context["bos_token"] = bos_token
    if eos_token is not None:
        context["eos_token"] = eos_token
    for key, value in extra.items():
        context[key] = _plain(value, key)
    _limits.max_chars = max_chars
    _limits.time_limit = time_limit
    _limits.deadline = None if time_limit is None else time.monotonic() + time_limit
    try:
        if max_chars is None and time_limit is None:
            return compiled.render(**context)
        parts, size = [], 0
        for chunk in compiled.generate(**context):
            size += len(chunk)
            _check_limits(size)
            parts.append(chunk)
        return "".join(parts)
    except ChatTemplateError:
        raise
    except SecurityError as e:
        logger.warning("chat template blocked by the sandbox: %s", e)
        raise ChatTemplateError(f"chat template attempted an unsafe operation: {e}") from e
    except TemplateError as e:  # raise_exception(...) and undefined-variable errors
        raise ChatTemplateError(f"chat template error: {e.message or _describe(e)}") from e
    except Exception as e:  # a broken template must never become a 500
        raise ChatTemplateError(f"chat template failed to render: {_describe(e)}") from e
    finally:
        _limits.max_chars = _limits.time_limit = _limits.deadline = None


def _plain(value: Any, where: str) -> Any:
    """A deep copy made only of JSON types (pydantic models are dumped first)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, Mapping):
        return {_plain(k, where): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return _plain(dump(), where)
    raise ChatTemplateError(f"{where} must be JSON data (got a {type(value).__name__})")


# -- validation ---------------------------------------------------------------------------------
def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check chat messages and return normalised copies.

    Each message must be a dict with ``role`` in {system, user, assistant, tool, developer}
    and ``content`` that is a string or a list of ``{"type": "text", "text": ...}`` parts (joined
    with newlines). An assistant message with ``tool_calls`` may have no content (it becomes "").
    Other keys (name, tool_calls, tool_call_id, ...) are kept. Raises ValueError naming the
    offending field, e.g. ``messages[2].role``.
    """
    if hasattr(messages, "model_dump"):
        messages = messages.model_dump()
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of message objects")
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if hasattr(msg, "model_dump"):
            msg = msg.model_dump(exclude_none=True)
        if not isinstance(msg, Mapping):
            raise ValueError(
                f"{where} must be an object with 'role' and 'content' (got {type(msg).__name__})"
            )
        role = msg.get("role")
        if role not in ROLES:
            allowed = ", ".join(sorted(ROLES))
            raise ValueError(f"{where}.role must be one of {allowed} (got {role!r})")
        clean = {k: v for k, v in msg.items() if v is not None}
        content = msg.get("content")
        if content is None:
            if role == "assistant" and msg.get("tool_calls"):
                clean["content"] = ""
            else:
                raise ValueError(f"{where}.content is required for a {role} message")
        else:
            clean["content"] = _flatten_content(content, f"{where}.content")
        if clean.get("tool_calls") is not None:
            clean["tool_calls"] = _tool_calls_for_template(clean["tool_calls"], f"{where}.tool_calls")
        out.append(clean)
    return out


def _tool_calls_for_template(calls: Any, where: str) -> Any:
    """An assistant message's tool calls as chat templates read them: OpenAI sends each call's
    `function.arguments` as JSON text, templates (Qwen, Llama 3, Hermes, Mistral) expect an
    object they can iterate or `tojson` (vLLM converts them the same way). Calls of another
    shape, and arguments that are not JSON, are passed on unchanged."""
    if not isinstance(calls, (list, tuple)):
        return calls
    out = []
    for call in calls:
        if hasattr(call, "model_dump"):
            call = call.model_dump(exclude_none=True)
        fn = call.get("function") if isinstance(call, Mapping) else None
        args = fn.get("arguments") if isinstance(fn, Mapping) else None
        if isinstance(args, str):
            try:
                call = {**call, "function": {**fn, "arguments": json.loads(args) if args.strip() else {}}}
            except ValueError:
                pass
        out.append(call)
    return out


def _flatten_content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, (list, tuple)):
        raise ValueError(
            f"{where} must be a string or a list of text parts (got {type(content).__name__})"
        )
    texts: list[str] = []
    for j, part in enumerate(content):
        pwhere = f"{where}[{j}]"
        if hasattr(part, "model_dump"):
            part = part.model_dump()
        if not isinstance(part, Mapping):
            raise ValueError(f"{pwhere} must be an object like {{'type': 'text', 'text': ...}}")
        if part.get("type") != "text":
            raise ValueError(
                f"{pwhere}.type must be 'text' (got {part.get('type')!r}); "
                "only text input is supported"
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise ValueError(f"{pwhere}.text must be a string (got {type(text).__name__})")
        texts.append(text)
    return "\n".join(texts)
