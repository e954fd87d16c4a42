"""The plugin's JSON (CPython's _json driven directly) agrees with the json module."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from weft.cni import fastjson

values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=25,
)


@given(values)
def test_round_trip_matches_json(value: Any) -> None:
    assert fastjson.dumps(value) == json.dumps(value)
    assert fastjson.dumps(value, separators=(",", ":")) == json.dumps(value, separators=(",", ":"))
    text = json.dumps(value)
    assert fastjson.loads(text) == json.loads(text)
    assert fastjson.loads(f" \n{text}\t ") == value


@pytest.mark.parametrize("doc", ['{"a": ', "", "[1, 2", '{"a": 1} x', "tru", '"\\x"', "{'a': 1}"])
def test_errors_match_json(doc: str) -> None:
    with pytest.raises(json.JSONDecodeError) as real:
        json.loads(doc)
    with pytest.raises(ValueError) as ours:
        fastjson.loads(doc)
    err = ours.value
    assert (getattr(err, "lineno", None), getattr(err, "colno", None), getattr(err, "pos", None)) == (
        real.value.lineno, real.value.colno, real.value.pos)


def test_unencodable_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        fastjson.dumps({"x": object()})
