"""Step keys: golden values pin the encoding; equal meaning → equal key; any change → another key."""

from __future__ import annotations

import unicodedata
from pathlib import Path, PurePosixPath

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zrecipe.engine.keys import KEY_FORMAT, canonical, hash_bytes, key_from_prefix, key_prefix, step_key

HASH = "00112233445566778899aabbccddeeff"


def test_golden_keys():
    # If one of these changes, every key in every user's store changes: bump KEY_FORMAT on purpose only.
    assert (
        step_key("resize", 1, {"size": 512, "upscale": False}, [HASH]) == "34bd03f07d949dc19eba03f96ff88cee"
    )
    assert (
        step_key(
            "encode-text",
            3,
            {"template": "{caption}", "max_length": 512, "lr": 1e-4, "path": Path("a/./b")},
            [],
        )
        == "e250be497ea4a00cb18180f0706d8ee9"
    )
    assert (
        step_key("aggregate", "2", {"nested": {"b": [1, 2.5, None, True], "a": "é"}}, ["k1", "k2"])
        == "97d913598eed94b15d9ca53f062c2851"
    )


def test_step_key_is_the_hash_of_one_canonical_list():
    params = {"nested": {"b": [1, 2.5, None, True], "a": "é"}}
    whole = canonical(["zrecipe-step", KEY_FORMAT, "aggregate", "2", params, ["k1", "k2"]])
    assert step_key("aggregate", "2", params, ["k1", "k2"]) == hash_bytes(whole)


def test_golden_canonical_bytes():
    assert canonical({"b": [1, 2.5, None, True], "a": "é", "p": Path("x/y")}) == (
        b"d3:1:as2:\xc3\xa91:bl4:i1;f2.5;NT1:pp3:x/y"
    )


def test_equivalent_spellings_share_a_key():
    base = step_key("k", 1, {"lr": 0.0001, "p": Path("a/b"), "t": [1, 2]}, [HASH])
    assert step_key("k", 1, {"t": (1, 2), "p": Path("a/./b"), "lr": 1e-4}, [HASH]) == base
    assert step_key("k", 1, {"t": [1, 2], "p": PurePosixPath("a//b/"), "lr": 10e-5}, (HASH,)) == base
    nfd = unicodedata.normalize("NFD", "café")
    assert step_key("k", 1, {"c": nfd}, []) == step_key("k", 1, {"c": "café"}, [])


def test_types_are_distinct():
    values = [1, 1.0, "1", True, None, [1], Path("1"), b"1", {"1": 1}, {1}]
    encodings = {canonical(v) for v in values}
    assert len(encodings) == len(values)
    assert canonical(0.0) != canonical(-0.0)
    assert canonical(float("nan")) == canonical(float("nan"))


@pytest.mark.parametrize("bad", [object(), {1: "int key"}, complex(1, 2), [lambda: 0]])
def test_unknown_types_are_rejected(bad):
    with pytest.raises(TypeError):
        canonical(bad)


def test_fast_path_matches_general_encoding():
    prefix = key_prefix("k", 2, {"x": 1})
    assert key_from_prefix(prefix, ["ab", "cd"]) == key_from_prefix(prefix, ["ab", Path("cd").as_posix()])
    # non-ASCII and non-str inputs take the general path; both paths encode the same way
    assert key_from_prefix(prefix, ["é"]) == step_key("k", 2, {"x": 1}, ["é"])
    assert key_from_prefix(prefix, ["ab", "cd"]) == step_key("k", 2, {"x": 1}, ("ab", "cd"))
    assert step_key("k", 2, {"x": 1}, ["ab"]) != step_key("k", 2, {"x": 1}, [b"ab"])


json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8)
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
params_st = st.dictionaries(st.text(min_size=1, max_size=6), json_value, max_size=5)


@settings(max_examples=80, deadline=None)
@given(params_st, st.randoms())
def test_dict_order_does_not_change_key(params, rnd):
    items = list(params.items())
    rnd.shuffle(items)
    assert step_key("k", 1, dict(items), [HASH]) == step_key("k", 1, params, [HASH])


@settings(max_examples=80, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_float_spelling_does_not_change_key(x):
    for spelling in (repr(x), f"{x:.17g}", f"{x:.17e}"):
        assert step_key("k", 1, {"x": float(spelling)}, []) == step_key("k", 1, {"x": x}, [])


path_part = st.text(alphabet="abcxyz", min_size=1, max_size=4)


@settings(max_examples=80, deadline=None)
@given(
    st.lists(path_part, min_size=1, max_size=5),
    st.lists(st.sampled_from(["", "/.", "/", "/./."]), min_size=5, max_size=5),
)
def test_path_spelling_does_not_change_key(parts, noise):
    clean = "/".join(parts)
    noisy = "/".join(p + n for p, n in zip(parts, noise, strict=False))  # a/./b, a//b, a/././b, trailing a/.
    assert step_key("k", 1, {"p": Path(noisy)}, []) == step_key("k", 1, {"p": Path(clean)}, [])


@settings(max_examples=80, deadline=None)
@given(params_st, st.text(min_size=1, max_size=6), json_value)
def test_any_parameter_change_changes_key(params, name, value):
    changed = dict(params)
    changed[name] = value
    if canonical(changed) == canonical(params):
        return  # not a change (same value, or an equal spelling)
    assert step_key("k", 1, changed, [HASH]) != step_key("k", 1, params, [HASH])


@settings(max_examples=40, deadline=None)
@given(params_st)
def test_kind_version_and_inputs_change_key(params):
    key = step_key("k", 1, params, [HASH])
    assert step_key("k2", 1, params, [HASH]) != key
    assert step_key("k", 2, params, [HASH]) != key
    assert step_key("k", "1", params, [HASH]) != key
    assert step_key("k", 1, params, [HASH, HASH]) != key
    assert step_key("k", 1, params, []) != key


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.one_of(st.text(max_size=40), st.text(alphabet="0123456789abcdef", min_size=32, max_size=32)))
)
def test_fast_input_encoding_equals_general_encoding(inputs):
    prefix = key_prefix("k", 1, {})
    slow = __import__("xxhash").xxh128_hexdigest(prefix + canonical(list(inputs)))
    assert key_from_prefix(prefix, inputs) == slow
    assert key_from_prefix(prefix, tuple(inputs)) == slow
