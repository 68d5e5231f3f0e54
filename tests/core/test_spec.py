"""Spec: validation, canonical form, hashing and the JSON round trip.

No kernels are compiled here.  The round-trip property runs 300 hypothesis examples.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bngen
from bngen import Spec, SpecError


def test_defaults_are_keras():
    spec = Spec((None, 8))
    assert spec.axis == (1,)
    assert (spec.dtype, spec.training, spec.mode) == ("float32", True, 0)
    assert (spec.epsilon, spec.momentum, spec.center, spec.scale) == (1e-3, 0.99, True, True)
    assert (spec.unbiased, spec.activation) == (False, None)


def test_axes_are_canonical():
    a = Spec((None, 3, 4, 5), axis=(-2, 1))
    b = Spec([None, 3, 4, 5], axis=[1, 2])
    assert a == b and hash(a) == hash(b)
    assert a.axis == (1, 2)
    assert a.view == (None, 12, 5)
    assert Spec((2, 3), axis=np.int64(-1)).axis == (1,)


def test_dtype_accepts_numpy_dtypes():
    assert Spec((2, 3), dtype=np.float64).dtype == "float64"
    assert Spec((2, 3), dtype=np.dtype("float32")).dtype == "float32"


def test_spec_is_immutable():
    spec = Spec((None, 8))
    with pytest.raises(AttributeError):
        spec.epsilon = 1.0


def test_replace_validates_again():
    spec = Spec((None, 8))
    assert spec.replace(training=False).training is False
    with pytest.raises(SpecError, match="epsilon"):
        spec.replace(epsilon=0)


INVALID = [
    (dict(shape=()), "shape", "no dimensions"),
    (dict(shape=(2, 0)), "shape", "dimension 1 is 0"),
    (dict(shape=(2, -3)), "shape", ">= 1"),
    (dict(shape=(2, 2.5)), "shape", "2.5"),
    (dict(shape="abc"), "shape", "sequence"),
    (dict(shape=(2, 3), axis=2), "axis", "out of range"),
    (dict(shape=(2, 3), axis=-3), "axis", "out of range"),
    (dict(shape=(2, 3, 4), axis=(0, 2)), "axis", "adjacent"),
    (dict(shape=(2, 3, 4), axis=(1, 1)), "axis", "twice"),
    (dict(shape=(2, 3), axis=()), "axis", "no feature axis"),
    (dict(shape=(2, 3), axis=1.0), "axis", "1.0"),
    (dict(shape=(2, None)), "axis", "unknown size"),
    (dict(shape=(2, 3), dtype="int8"), "dtype", "int8"),
    (dict(shape=(2, 3), mode=3), "mode", "3"),
    (dict(shape=(2, 3), mode=True), "mode", "True"),
    (dict(shape=(2, 3), epsilon=0.0), "epsilon", "0.0"),
    (dict(shape=(2, 3), epsilon=-1e-5), "epsilon", "-1e-05"),
    (dict(shape=(2, 3), epsilon=float("nan")), "epsilon", "nan"),
    (dict(shape=(2, 3), epsilon="1e-3"), "epsilon", "1e-3"),
    (dict(shape=(2, 3), momentum=1.5), "momentum", "1.5"),
    (dict(shape=(2, 3), momentum=-0.1), "momentum", "-0.1"),
    (dict(shape=(2, 3), training=1), "training", "1"),
    (dict(shape=(2, 3), center="yes"), "center", "yes"),
    (dict(shape=(2, 3), scale=None), "scale", "None"),
    (dict(shape=(2, 3), unbiased=0), "unbiased", "0"),
    (dict(shape=(2, 3), activation="gelu"), "activation", "gelu"),
    (dict(shape=(2, 3, 4), axis=1, mode=1), "axis", "last"),
    (dict(shape=(1, 3), unbiased=True), "shape", "one value per feature"),
    # statistics variants
    (dict(shape=(2, 3), renorm=1), "renorm", "not a bool"),
    (dict(shape=(2, 3), renorm=True, mode=1), "renorm", "mode=1"),
    (dict(shape=(2, 3), renorm=True, mode=2), "renorm", "mode=2"),
    (dict(shape=(2, 3), renorm=True, unbiased=True), "unbiased", "renorm"),
    (dict(shape=(2, 3), renorm_momentum=1.5), "renorm_momentum", "1.5"),
    (dict(shape=(2, 3), renorm_momentum=-0.1), "renorm_momentum", "-0.1"),
    (dict(shape=(2, 3), adjustment=True, mode=2), "adjustment", "mode=2"),
    (dict(shape=(4, 3), virtual_batch_size=0), "virtual_batch_size", "0 must be >= 1"),
    (dict(shape=(4, 3), virtual_batch_size=2.0), "virtual_batch_size", "2.0"),
    (dict(shape=(4, 3), virtual_batch_size=2, mode=2), "virtual_batch_size", "mode=2"),
    (dict(shape=(4, 3), axis=(0, 1), virtual_batch_size=2), "virtual_batch_size", "axis"),
    (dict(shape=(4, 3), axis=0, virtual_batch_size=2), "virtual_batch_size", "axis"),
    (dict(shape=(4, 3), virtual_batch_size=2, renorm=True), "virtual_batch_size", "renorm"),
    (dict(shape=(4, 3), virtual_batch_size=2, adjustment=True), "virtual_batch_size", "adjustment"),
    (dict(shape=(6, 3), virtual_batch_size=4), "virtual_batch_size", "does not divide"),
    (dict(shape=(4, 3), virtual_batch_size=2, unbiased=True), "unbiased", "ghost"),
]


@pytest.mark.parametrize("fields, field, detail", INVALID, ids=[f"{f}-{d}" for _, f, d in INVALID])
def test_invalid_fields_raise_spec_error_naming_field_and_value(fields, field, detail):
    with pytest.raises(SpecError) as info:
        Spec(**fields)
    message = str(info.value)
    assert message.startswith(f"{field}:"), message
    assert detail in message, message
    assert isinstance(info.value, ValueError)


def test_from_json_rejects_unknown_and_missing_fields():
    with pytest.raises(SpecError, match="unknown field.*bogus"):
        Spec.from_json('{"shape": [2, 3], "bogus": 1}')
    with pytest.raises(SpecError, match="shape: missing"):
        Spec.from_json('{"axis": 1}')
    with pytest.raises(SpecError, match="not valid JSON"):
        Spec.from_json("{")
    with pytest.raises(SpecError, match="expected an object"):
        Spec.from_json("[1, 2]")


def test_variants_at_their_defaults_are_left_out_of_json():
    plain = json.loads(Spec((None, 4)).to_json())
    assert not set(plain) & {"renorm", "renorm_momentum", "virtual_batch_size", "adjustment"}
    ghost = Spec((None, 4), virtual_batch_size=8)
    assert json.loads(ghost.to_json())["virtual_batch_size"] == 8 and Spec.from_json(ghost.to_json()) == ghost
    renorm = Spec((None, 4), renorm=True, renorm_momentum=0.9)
    assert Spec.from_json(renorm.to_json()) == renorm and hash(renorm) != hash(Spec((None, 4), renorm=True))
    assert renorm != Spec((None, 4)) and Spec((None, 4), adjustment=True) != Spec((None, 4))


def test_renorm_clipping_is_checked_naming_it():
    from bngen.core.spec import check_renorm_clipping

    assert check_renorm_clipping(None) == (None, None, None)
    assert check_renorm_clipping({"rmax": 3, "dmax": 0}) == (3.0, None, 0.0)  # rmin: no clip, not 1/rmax
    for bad, detail in [({"rmax": 1.0, "rmin": 2.0}, "less than rmin"), ({"dmax": -1.0}, "dmax"),
                        ({"rmax": float("nan")}, "not a number"), ({"r": 1}, "unknown key"), ([1, 2], "not a dict")]:
        with pytest.raises(SpecError, match=f"^renorm_clipping: .*{detail}"):
            check_renorm_clipping(bad)


def test_json_uses_null_for_dynamic_sizes():
    data = json.loads(Spec((None, 4, None, None), axis=1).to_json())
    assert data["shape"] == [None, 4, None, None]
    assert data["axis"] == [1]


@st.composite
def specs(draw):
    ndim = draw(st.integers(1, 5))
    shape = [draw(st.one_of(st.none(), st.integers(1, 9))) for _ in range(ndim)]
    first = draw(st.integers(0, ndim - 1))
    count = draw(st.integers(1, ndim - first))
    axes = list(range(first, first + count))
    for a in axes:
        shape[a] = shape[a] or draw(st.integers(1, 9))
    mode = draw(st.sampled_from([0, 2] + ([1] if axes[-1] == ndim - 1 else [])))
    axis = draw(st.sampled_from([tuple(axes), tuple(a - ndim for a in axes)])) if count > 1 else axes[0] - draw(st.sampled_from([0, ndim]))
    return Spec(
        shape=tuple(shape), axis=axis, mode=mode,
        dtype=draw(st.sampled_from(bngen.core.spec.DTYPES)),
        training=draw(st.booleans()),
        epsilon=draw(st.floats(1e-12, 1.0)),
        momentum=draw(st.floats(0.0, 1.0)),
        center=draw(st.booleans()), scale=draw(st.booleans()),
        activation=draw(st.sampled_from([None, "relu"])),
        **draw(variants(mode, 0 in axes)),
    )


@st.composite
def variants(draw, mode, batch_is_feature):
    """Statistics-variant fields that fit the mode and axes (often none)."""
    kind = draw(st.sampled_from(["none", "renorm", "ghost", "adjustment"] if mode == 0 else ["none"]))
    if kind == "renorm":
        return dict(renorm=True, renorm_momentum=draw(st.floats(0.0, 1.0)), adjustment=draw(st.booleans()))
    if kind == "ghost" and not batch_is_feature:
        return dict(virtual_batch_size=1)  # divides any batch size
    if kind == "adjustment":
        return dict(adjustment=True)
    return {}


@settings(max_examples=300)
@given(specs())
def test_json_round_trip(spec):
    text = spec.to_json()
    again = Spec.from_json(text)
    assert again == spec and hash(again) == hash(spec)
    assert again.to_json() == text
