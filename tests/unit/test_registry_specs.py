"""Head specs and weight strings: exact parses, and fuzzing that only typed errors escape."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mavis_lc.errors import InvalidWeightError, MavisError, SpecError, UnknownObjectiveError
from mavis_lc.registry.specs import MAX_VERSION, NAME_PATTERN, HeadSpec, parse_spec, validate_alias
from mavis_lc.weights import parse_weights, validate_weights


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("positivity", HeadSpec("positivity", None)),
        ("positivity@latest", HeadSpec("positivity", "latest")),
        ("positivity@3", HeadSpec("positivity", 3)),
        ("positivity@007", HeadSpec("positivity", 7)),
        ("positivity@production", HeadSpec("positivity", "production")),
        ("  Non-Profanity@Prod.v2 ", HeadSpec("non-profanity", "prod.v2")),
        ("hh_rlhf.helpful@2147483647", HeadSpec("hh_rlhf.helpful", MAX_VERSION)),
        ("a" * 64, HeadSpec("a" * 64)),
    ],
)
def test_parse_spec_accepts(text: str, expected: HeadSpec) -> None:
    assert parse_spec(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "@3", "positivity@", "positivity@0", "positivity@2147483648", "positivity@1@2", "-positivity",
     "posi tivity", "positivity@pro duction", "a" * 65, "positivity@" + "9" * 5000, "positivity\n@3",
     "pósitivity", "positivity@-1"],
)  # fmt: skip
def test_parse_spec_refuses_with_the_accepted_forms(text: str) -> None:
    with pytest.raises(SpecError, match="accepted forms: OBJECTIVE, OBJECTIVE@latest"):
        parse_spec(text)


def test_parse_spec_refuses_non_strings() -> None:
    with pytest.raises(SpecError, match="expected a string, got int"):
        parse_spec(3)


def test_str_gives_the_canonical_spec() -> None:
    assert [str(parse_spec(t)) for t in ("Pos", "pos@LATEST", "pos@03", "pos@Prod")] == [
        "pos",
        "pos@latest",
        "pos@3",
        "pos@prod",
    ]


def test_aliases_cannot_look_like_versions() -> None:
    assert validate_alias("Production") == "production"
    for bad in ("42", "latest", "", "-x"):
        with pytest.raises(SpecError):
            validate_alias(bad)


names = st.from_regex(NAME_PATTERN, fullmatch=True)


@given(st.text(max_size=80))
@settings(max_examples=500)
def test_parse_spec_fuzz_raises_only_spec_errors(text: str) -> None:
    try:
        spec = parse_spec(text)
    except SpecError:
        return
    assert NAME_PATTERN.fullmatch(spec.objective)
    assert parse_spec(str(spec)) == spec


aliases = names.filter(lambda name: not name.isdigit())


@given(names, st.one_of(st.none(), st.integers(1, MAX_VERSION), st.just("latest"), aliases))
def test_parse_spec_round_trips_valid_specs(objective: str, selector: int | str | None) -> None:
    text = objective if selector is None else f"{objective}@{selector}"
    assert parse_spec(text) == HeadSpec(objective, selector)


weight_text = st.lists(
    st.tuples(st.text(max_size=12), st.sampled_from(["=", "", "=="]), st.text(max_size=12)), max_size=5
).map(lambda parts: ",".join(f"{a}{op}{b}" for a, op, b in parts))


@given(st.one_of(st.text(max_size=60), weight_text))
@settings(max_examples=500)
def test_parse_weights_fuzz_raises_only_typed_errors(text: str) -> None:
    try:
        weights = parse_weights(text)
    except InvalidWeightError:
        return
    assert all(math.isfinite(value) and value >= 0 for value in weights.values())


weight_values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(),
    st.integers(min_value=10**308, max_value=10**400),
    st.booleans(),
    st.none(),
    st.text(max_size=5),
    st.lists(st.floats(), max_size=2),
)


@given(
    st.lists(names, max_size=4, unique=True),
    st.data(),
)
@settings(max_examples=500)
def test_validate_weights_fuzz_raises_only_typed_errors(allowed: list[str], data: st.DataObject) -> None:
    keys = st.sampled_from(allowed) | st.text(max_size=8) if allowed else st.text(max_size=8)
    weights = data.draw(
        st.one_of(
            st.dictionaries(keys, weight_values, max_size=5),
            st.lists(st.integers(), max_size=3),
            st.text(max_size=5),
            st.none(),
        )
    )
    try:
        clean = validate_weights(weights, allowed)  # type: ignore[arg-type]
    except (InvalidWeightError, UnknownObjectiveError) as exc:
        assert isinstance(exc, MavisError)
        return
    assert set(clean) <= set(allowed)
    assert all(math.isfinite(value) and value >= 0 for value in clean.values())


def test_validate_weights_refuses_integers_too_large_for_a_float() -> None:
    for huge in (10**400, 10**5000):
        with pytest.raises(InvalidWeightError, match="'positivity' is an integer too large"):
            validate_weights({"positivity": huge}, ["positivity"])
