"""JSON schemas for the structured-output tests: varied (nested objects, arrays, enums, $ref,
bounded numbers, string patterns and formats, anyOf, nullable types), each bounded so that
any output the grammar allows ends within the tests' max_tokens."""

from __future__ import annotations

from typing import Any


def _s(max_len: int = 8, **kw: Any) -> dict[str, Any]:
    return {"type": "string", "maxLength": max_len, **kw}


def _i(lo: int = 0, hi: int = 99) -> dict[str, Any]:
    return {"type": "integer", "minimum": lo, "maximum": hi}


def _obj(props: dict[str, Any], required: list[str] | None = None, **kw: Any) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False, **kw}


def schemas() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [
        _obj({"name": _s(), "age": _i(0, 120)}),
        _obj({"ok": {"type": "boolean"}}),
        _obj({"v": {"type": "null"}}),
        _obj({"color": {"enum": ["red", "green", "blue"]}}),
        _obj({"n": {"enum": [1, 2, 3, None, "x"]}}),
        _obj({"k": {"const": "fixed"}}),
        _obj({"x": {"type": "number", "minimum": -1, "maximum": 1}}),
        _obj({"x": _i(-50, -10)}),
        _obj({"x": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10}}),
        _obj({"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}}),
        _obj({"hex": {"type": "string", "pattern": "^#[0-9a-f]{6}$"}}),
        _obj({"s": _s(6, minLength=2)}),
        _obj({"tags": {"type": "array", "items": _s(4), "maxItems": 3}}),
        _obj({"tags": {"type": "array", "items": _i(), "minItems": 2, "maxItems": 4}}),
        _obj({"pt": {"type": "array", "prefixItems": [_i(), _s(3)], "items": False}}),
        _obj({"inner": _obj({"a": _i(), "b": _s(3)})}),
        _obj({"l1": _obj({"l2": _obj({"l3": _obj({"leaf": {"type": "boolean"}})})})}),
        _obj({"items": {"type": "array", "maxItems": 2, "items": _obj({"sku": _s(4), "qty": _i(1, 9)})}}),
        _obj({"a": _i(), "b": _s(3)}, required=["a"]),
        _obj({"a": {"type": ["integer", "null"], "minimum": 0, "maximum": 9}}),
        _obj({"u": {"anyOf": [_i(), _s(4)]}}),
        _obj({"u": {"anyOf": [_obj({"kind": {"const": "a"}, "x": _i()}), _obj({"kind": {"const": "b"}, "y": _s(3)})]}}),
        _obj({"u": {"oneOf": [{"type": "boolean"}, {"type": "null"}]}}),
        {"$defs": {"p": _obj({"x": _i(), "y": _i()})}, **_obj({"a": {"$ref": "#/$defs/p"}, "b": {"$ref": "#/$defs/p"}})},
        {"definitions": {"name": _s(5)}, **_obj({"first": {"$ref": "#/definitions/name"}, "last": {"$ref": "#/definitions/name"}})},
        _obj({"when": {"type": "string", "format": "date"}}),
        _obj({"when": {"type": "string", "format": "date-time"}}),
        _obj({"id": {"type": "string", "format": "uuid"}}),
        _obj({"ip": {"type": "string", "format": "ipv4"}}),
        {"type": "array", "items": _i(), "maxItems": 3},
        {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 3},
        {"type": "string", "maxLength": 10},
        {"type": "string", "pattern": "^(yes|no)$"},
        {"type": "integer", "minimum": 0, "maximum": 1000},
        {"type": "number", "minimum": 0, "maximum": 5},
        {"type": "boolean"},
        {"enum": ["alpha", "beta", "gamma"]},
        {"const": 42},
        {"type": "null"},
        _obj({"m": {"type": "object", "additionalProperties": _i(), "maxProperties": 2}}),
        _obj({"flag": {"type": "boolean"}, "count": _i(), "label": _s(4), "ratio": {"type": "number", "minimum": 0, "maximum": 1}}),
        _obj({"matrix": {"type": "array", "maxItems": 2, "items": {"type": "array", "maxItems": 2, "items": _i(0, 9)}}}),
        _obj({"person": _obj({"name": _s(5), "langs": {"type": "array", "items": {"enum": ["py", "c", "go"]}, "maxItems": 2}})}),
        _obj({"status": {"enum": ["open", "closed"]}, "priority": _i(1, 5), "assignee": {"type": ["string", "null"], "maxLength": 5}}),
        _obj({"date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}, "temp": _i(-30, 45)}),
        _obj({"a": _obj({"b": {"type": "array", "maxItems": 2, "items": _obj({"c": {"enum": [True, False]}})}})}),
        _obj({"version": {"type": "string", "pattern": "^v[0-9]\\.[0-9]$"}, "stable": {"type": "boolean"}}),
        _obj({"coords": {"type": "array", "prefixItems": [{"type": "number", "minimum": -90, "maximum": 90},
                                                        {"type": "number", "minimum": -180, "maximum": 180}], "items": False}}),
        _obj({"one": _i(), "two": _i(), "three": _i(), "four": _i(), "five": _i()}),
        _obj({"opt1": _s(3), "opt2": _i(), "opt3": {"type": "boolean"}}, required=[]),
        {"$defs": {"node": _obj({"val": _i(0, 9), "kids": {"type": "array", "maxItems": 1, "items": _obj({"val": _i(0, 9)})}})},
         "$ref": "#/$defs/node"},
        _obj({"word": {"type": "string", "enum": ["cat", "dog"]}, "n": {"type": "integer", "enum": [1, 5, 10]}}),
        _obj({"big": {"type": "integer", "minimum": 100000, "maximum": 999999}}),
        _obj({"neg": {"type": "number", "maximum": 0, "minimum": -100}}),
    ]
    return out
