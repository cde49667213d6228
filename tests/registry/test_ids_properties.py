"""Property tests (hypothesis) of the adapter-id parser: any string is parsed or refused by name, never a crash."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from adapter_registry.ids import MAX_VERSION, NAME_RE, AdapterSelector, check_name, parse_adapter_id
from server.core.errors import InvalidRequestError

names = st.from_regex(NAME_RE, fullmatch=True)
versions = st.integers(min_value=1, max_value=MAX_VERSION)
# Text near the grammar: the id alphabet plus the characters that most often break parsers.
near_ids = st.text(alphabet="abz09._-@/\\ \x00\u00e9\u0663\uff10AZ+:\n", max_size=80)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=200), near_ids))
def test_any_string_parses_or_is_refused_by_name(s):
    try:
        ref = parse_adapter_id(s)
    except InvalidRequestError as e:
        assert e.field == "adapter_id" and str(e).startswith("adapter_id: ")
        assert len(str(e)) < 400  # a hostile id is shown truncated, never echoed whole
        return
    assert isinstance(ref, AdapterSelector) and NAME_RE.fullmatch(ref.name)
    assert ref.version is None or 1 <= ref.version <= MAX_VERSION
    assert parse_adapter_id(str(ref)) == ref  # what is accepted has one canonical spelling


@settings(max_examples=200, deadline=None)
@given(names, st.one_of(st.none(), versions))
def test_well_formed_ids_round_trip(name, version):
    spelled = name if version is None else f"{name}@{version}"
    assert parse_adapter_id(spelled) == AdapterSelector(name, version)
    assert parse_adapter_id(f"{name}@latest") == AdapterSelector(name, None)


@settings(max_examples=200, deadline=None)
@given(names, st.integers(min_value=MAX_VERSION + 1, max_value=10**12))
def test_versions_past_int32_are_refused(name, version):
    try:
        parse_adapter_id(f"{name}@{version}")
    except InvalidRequestError:
        return
    raise AssertionError(f"{name}@{version} was accepted")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=100))
def test_a_name_is_accepted_exactly_when_it_matches_the_pattern(s):
    try:
        check_name(s)
        accepted = True
    except InvalidRequestError:
        accepted = False
    assert accepted == bool(NAME_RE.fullmatch(s))
    assert not accepted or ("/" not in s and ".." != s and s == s.strip())  # never a path, never padded
