"""StructuredOutputsParams / GuidedDecodingParams on SamplingParams (pure Python)."""

from __future__ import annotations

import pytest

from kvserve.core.sampling_params import GuidedDecodingParams, SamplingParams, StructuredOutputsParams as SO


def test_fields_and_legacy_name():
    p = SamplingParams(guided_decoding=GuidedDecodingParams(regex="a+"))
    assert p.structured_outputs.regex == "a+" and p.guided_decoding is None
    assert p.modifies_logits  # tensor-parallel ranks must not skip the token broadcast
    assert p.clone(seed=1).structured_outputs.key == p.structured_outputs.key
    assert SamplingParams(structured_outputs={"choice": ["x", "y"]}).structured_outputs.choice == ["x", "y"]


def test_key_is_order_insensitive_for_dict_schemas():
    a = SO(json={"type": "object", "properties": {"a": {"type": "integer"}}})
    b = SO(json={"properties": {"a": {"type": "integer"}}, "type": "object"})
    assert a.key == b.key and SO(json_object=True).key != a.key


@pytest.mark.parametrize("kwargs, field", [
    ({}, "exactly one"),
    ({"json": {"type": "object"}, "choice": ["a"]}, "exactly one"),
    ({"json": "{nope"}, "structured_outputs.json"),
    ({"json": "[1, 2]"}, "structured_outputs.json"),
    ({"regex": ""}, "structured_outputs.regex"),
    ({"choice": "ab"}, "structured_outputs.choice"),
    ({"choice": ["a", ""]}, "structured_outputs.choice"),
    ({"grammar": "  "}, "structured_outputs.grammar"),
])
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SO(**kwargs)


def test_conflicts_and_bad_types():
    with pytest.raises(ValueError, match="not both"):
        SamplingParams(structured_outputs=SO(regex="a"), guided_decoding=SO(regex="b"))
    with pytest.raises(ValueError, match="unknown fields"):
        SamplingParams(structured_outputs={"jsn": {}})
    with pytest.raises(ValueError, match="structured_outputs must be"):
        SamplingParams(structured_outputs="a+")
