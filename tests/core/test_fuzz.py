"""Fuzz targets: hostile values never escape as anything but the documented errors.

* `Spec.from_json` / `Spec(...)`: any JSON text or value, and any Python value in any
  field, gives a Spec or a SpecError (400 + 400 + 300 examples, nothing compiled).
* The layer's call sequence: any sequence of builds, calls, backwards and weight
  changes leaves it consistent or raises a named error (60 sequences of up to 8 steps;
  the kernels of a few shapes, compiled once).
"""

from __future__ import annotations

import json

import numpy as np
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


# -- the layer's call sequence ------------------------------------------------------------------------
C = 4
_arrays = st.sampled_from(["ok2", "ok3", "wide", "flat", "3d", "text", "none", "nan", "list"])
operations = st.lists(
    st.one_of(
        st.tuples(st.just("call"), _arrays, st.sampled_from([True, False, "yes", None, 1])),
        st.tuples(st.just("backward"), _arrays),
        st.tuples(st.just("set_weights"), st.sampled_from(["ok", "short", "wrong_shape", "text", "nan"])),
        st.tuples(st.just("get_weights")),
        st.tuples(st.just("build"), st.sampled_from([(None, C), (None, C + 1), (None,), ("a", C), (None, 0)])),
    ),
    min_size=1, max_size=8,
)


def _value(kind, rng):
    return {
        "ok2": rng.standard_normal((2, C)).astype(np.float32), "ok3": rng.standard_normal((3, C)),
        "wide": np.ones((2, C + 1), np.float32), "flat": np.ones(C, np.float32), "3d": np.ones((2, C, 1), np.float32),
        "text": "abc", "none": None, "nan": np.full((2, C), np.nan, np.float32), "list": [[1.0] * C] * 2,
    }[kind]


def _weights(kind):
    return {
        "ok": [np.full(C, 2.0), np.full(C, 0.5), np.zeros(C), np.ones(C)], "short": [np.ones(C)] * 3,
        "wrong_shape": [np.ones(C + 1)] * 4, "text": ["a", "b", "c", "d"], "nan": [np.full(C, np.nan)] * 4,
    }[kind]


@settings(max_examples=60)
@given(operations, st.integers(0, 2**32 - 1))
def test_any_layer_call_sequence_leaves_it_consistent_or_raises_a_named_error(session_cache, strict_compiler,
                                                                               ops, seed):
    rng = np.random.default_rng(seed)
    layer = bngen.BatchNormalization(momentum=0.9, cache_dir=session_cache, compiler=strict_compiler)
    for op in ops:
        before = (layer.built, [w.copy() for w in layer.get_weights()])
        try:
            if op[0] == "call":
                x = _value(op[1], rng)
                y = layer(x, training=op[2])
                assert y.shape == np.shape(x) and y.dtype == np.float32
            elif op[0] == "backward":
                dy = _value(op[1], rng)
                dx = layer.backward(dy)
                assert dx.shape == np.shape(dy)
            elif op[0] == "set_weights":
                layer.set_weights(_weights(op[1]))
            elif op[0] == "get_weights":
                assert len(layer.get_weights()) == (4 if layer.built else 0)
            else:
                layer.build(op[1])
        except (TypeError, ValueError, RuntimeError) as exc:  # SpecError is a ValueError
            assert str(exc), f"{op}: an error without a message"
            built, weights = before
            if op[0] != "call" or not built:  # a call may build the layer before it fails on x
                assert layer.built == built, f"{op} failed but changed built"
            if built:
                for old, new in zip(weights, layer.get_weights()):
                    np.testing.assert_array_equal(old, new, err_msg=f"{op} failed but changed the weights")
        if layer.built:  # the layer's own state is always whole
            weights = layer.get_weights()
            assert len(weights) == 4 and all(w.ndim == 1 and w.dtype == np.float32 for w in weights)
            assert len({w.shape for w in weights}) == 1  # one value per feature in each
