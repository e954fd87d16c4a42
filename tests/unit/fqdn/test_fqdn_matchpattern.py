"""matchName / matchPattern: validity and matching, table-driven against Cilium's documented semantics."""

from __future__ import annotations

import fnmatch
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from weft.fqdn.matchpattern import (
    FqdnPatternError,
    FqdnSelector,
    compile_name,
    compile_pattern,
    normalize_name,
    validate_name,
    validate_pattern,
)

# (pattern, name, matches)
PATTERN_CASES: list[tuple[str, str, bool]] = [
    # the seed: one label under the domain, any case, with or without the trailing dot
    ("*.myblobstorage.com", "app1.myblobstorage.com", True),
    ("*.myblobstorage.com", "APP1.MyBlobStorage.com.", True),
    ("*.myblobstorage.com", "myblobstorage.com", False),
    ("*.myblobstorage.com", "a.b.myblobstorage.com", False),
    ("*.myblobstorage.com", "app1.myblobstorage.com.evil.com", False),
    ("*.myblobstorage.com", "app1-myblobstorage.com", False),
    ("*.myblobstorage.com.", "x.myblobstorage.com", True),
    ("*.MyBlobStorage.COM", "x.myblobstorage.com.", True),
    # "*" alone, and the other all-star spellings, match every name (the root too)
    ("*", "example.com", True),
    ("*", "a.b.c.d.e.f", True),
    ("*", ".", True),
    ("*", "WeIrD_Name-1.Org.", True),
    ("**", "a.b.example.com", True),
    ("*.", "example.com", True),
    ("**.", "example.com", True),
    ("***", "x.y", True),
    # prefix wildcards within one label
    ("app*.x.com", "app.x.com", True),
    ("app*.x.com", "app1.x.com", True),
    ("app*.x.com", "application.x.com", True),
    ("app*.x.com", "APP-2.x.com.", True),
    ("app*.x.com", "ap.x.com", False),
    ("app*.x.com", "myapp.x.com", False),
    ("app*.x.com", "app.y.x.com", False),
    ("app*.x.com", "app1.b.x.com", False),
    # suffix wildcards
    ("*app.x.com", "app.x.com", True),
    ("*app.x.com", "myapp.x.com", True),
    ("*app.x.com", "my-app.x.com", True),
    ("*app.x.com", "apps.x.com", False),
    ("*app.x.com", "a.myapp.x.com", False),
    # infix wildcards
    ("a*b.x.com", "ab.x.com", True),
    ("a*b.x.com", "axxb.x.com", True),
    ("a*b.x.com", "a-_-b.x.com", True),
    ("a*b.x.com", "a.b.x.com", False),
    ("a*b.x.com", "axxbc.x.com", False),
    ("a*b*c.x.com", "abc.x.com", True),
    ("a*b*c.x.com", "abbbcbc.x.com", True),
    ("a*b*c.x.com", "acb.x.com", False),
    ("a**b.x.com", "azzb.x.com", True),  # a run of stars is one star
    ("a**b.x.com", "a.zz.b.x.com", False),
    # wildcards in other positions, and several labels with wildcards
    ("sub.*.x.com", "sub.a.x.com", True),
    ("sub.*.x.com", "sub.x.com", False),
    ("sub.*.x.com", "sub.a.b.x.com", False),
    ("*.*.x.com", "a.b.x.com", True),
    ("*.*.x.com", "a.x.com", False),
    ("api.*", "api.com", True),
    ("api.*", "api.io.", True),
    ("api.*", "api.co.uk", False),
    ("*x.com", "x.com", True),  # "*" can be empty when the label has other characters
    ("*x.com", "wwwx.com", True),
    ("*x.com", "www.x.com", False),  # a star never crosses a dot
    ("*.x.com", ".x.com", False),  # an all-star label needs one character
    # leading "**.": one or more whole labels
    ("**.x.com", "a.x.com", True),
    ("**.x.com", "a.b.x.com", True),
    ("**.x.com", "a.b.c.d.e.x.com.", True),
    ("**.x.com", "x.com", False),
    ("**.x.com", "ax.com", False),
    ("**.x.com", "a.x.com.evil", False),
    ("***.x.com", "a.b.x.com", True),
    ("**.*.x.com", "a.b.x.com", True),
    ("**.*.x.com", "a.x.com", False),
    ("**.app*.x.com", "z.app1.x.com", True),
    ("**.app*.x.com", "z.y.app.x.com", True),
    ("**.app*.x.com", "z.y.ap.x.com", False),
    ("x.**.com", "x.a.com", True),  # "**" past the first label is one star (Cilium): one label
    ("x.**.com", "x.a.b.com", False),
    # underscores (service labels), digits, hyphens
    ("_http._tcp.*.example.com", "_http._tcp.web.example.com", True),
    ("*._tcp.example.com", "_ldap._tcp.example.com", True),
    ("*._tcp.example.com", "_ldap._udp.example.com", False),
    ("*-1.x.com", "node-1.x.com", True),
    ("*-1.x.com", "node-2.x.com", False),
    # no wildcard: exact match, any case, trailing dot optional
    ("www.example.com", "www.example.com", True),
    ("www.example.com", "WWW.EXAMPLE.COM.", True),
    ("www.example.com", "example.com", False),
    ("www.example.com", "wwwxexample.com", False),  # "." is a literal dot
    # names a wildcard never matches: empty labels, escaped bytes, other characters
    ("*.x.com", "a..x.com", False),
    ("*.x.com", "a\\032b.x.com", False),
    ("*.x.com", "a*b.x.com", False),
    ("*.x.com", "a.x.com\n", False),
]

# (matchName, name, matches)
NAME_CASES: list[tuple[str, str, bool]] = [
    ("example.com", "example.com", True),
    ("example.com", "example.com.", True),
    ("example.com.", "EXAMPLE.com", True),
    ("Example.COM", "example.com", True),
    ("example.com", "www.example.com", False),
    ("example.com", "example.co", False),
    ("_srv._tcp.example.com", "_SRV._tcp.example.com.", True),
    ("a-b.c", "a-b.c", True),
]

VALID_PATTERNS = [
    "*",
    "**",
    "*.",
    "**.",
    "*.cilium.io",
    "*.cilium.io.*",
    "*.cilium.io.*.",
    "*.xn--e28h.com",
    "*._tcp.cilium.io",
    "*._tcp.*",
    "**.example.com",
    "***.example.com",
    "a*b*c.example.com",
    "example.com",
    "example.com.",
    "_a.b",
    "*" * 100 + "a" * 63 + ".com",  # stars do not count against the 63-octet label limit
    "a" * 63 + ".com",
]

INVALID_PATTERNS = [
    ("", "is empty"),
    (".", "starts with a dot"),
    (".example.com", "starts with a dot"),
    ("a..example.com", "empty label"),
    ("example.com..", "empty label"),
    ("**..example.com", "empty label"),
    ("exa mple.com", "invalid character"),
    (" example.com", "invalid character"),
    ("example.com/", "invalid character"),
    ("ex[a]mple.com", "invalid character"),
    ("a+.com", "invalid character"),
    ("%$*.*", "invalid character"),
    ("😀.com", "invalid character"),
    ("a?.com", "invalid character"),
    ("a" * 64 + ".com", "more than the 63 allowed"),
    (("a" * 50 + ".") * 5 + "a" * 10, "more than the 255 allowed"),
]

VALID_NAMES = ["cilium.io", "cilium.io.", "www.xn--e28h.com", "_tcp.cilium.io", "foo._tcp.cilium.io", "a"]
INVALID_NAMES = [
    ("", "is empty"),
    ("*.cilium.io", "invalid character"),
    ("%%", "invalid character"),
    ("😀.com", "invalid character"),
    ("a..b", "empty label"),
    (".a", "starts with a dot"),
    (".", "starts with a dot"),
    ("a" * 64, "more than the 63 allowed"),
    ("a." * 128, "more than the 255 allowed"),
]


@pytest.mark.parametrize(("pattern", "name", "expected"), PATTERN_CASES)
def test_pattern_matches(pattern: str, name: str, expected: bool) -> None:
    assert compile_pattern(pattern).matches(name) is expected
    assert FqdnSelector(match_pattern=pattern).matches(name) is expected


def test_pattern_table_is_large() -> None:
    assert len(PATTERN_CASES) >= 60


@pytest.mark.parametrize(("match_name", "name", "expected"), NAME_CASES)
def test_name_matches(match_name: str, name: str, expected: bool) -> None:
    assert compile_name(match_name).matches(name) is expected
    assert FqdnSelector(match_name=match_name).matches(name) is expected


@pytest.mark.parametrize("pattern", VALID_PATTERNS)
def test_valid_patterns(pattern: str) -> None:
    validate_pattern(pattern)


@pytest.mark.parametrize(("pattern", "problem"), INVALID_PATTERNS)
def test_invalid_patterns(pattern: str, problem: str) -> None:
    with pytest.raises(FqdnPatternError, match=problem) as info:
        validate_pattern(pattern)
    assert info.value.value == pattern
    assert info.value.field_name == "matchPattern"
    assert repr(pattern[:10])[:-1] in str(info.value)  # the message names the pattern
    with pytest.raises(FqdnPatternError):
        compile_pattern(pattern)


@pytest.mark.parametrize("name", VALID_NAMES)
def test_valid_names(name: str) -> None:
    validate_name(name)


@pytest.mark.parametrize(("name", "problem"), INVALID_NAMES)
def test_invalid_names(name: str, problem: str) -> None:
    with pytest.raises(FqdnPatternError, match=problem) as info:
        validate_name(name)
    assert info.value.field_name == "matchName"
    assert "matchName" in str(info.value)


@pytest.mark.parametrize(
    ("name", "normal"),
    [
        ("WWW.Example.com", "www.example.com."),
        ("www.example.com.", "www.example.com."),
        ("", "."),
        (".", "."),
        ("ÄB.com", "Äb.com."),  # ASCII-only case folding, as DNS
    ],
)
def test_normalize_name(name: str, normal: str) -> None:
    assert normalize_name(name) == normal


def test_selector_str_dict_and_equality() -> None:
    by_name = FqdnSelector.from_dict({"matchName": "api.example.com"})
    by_pattern = FqdnSelector.from_dict({"matchPattern": "*.example.com"})
    assert str(by_name) == "matchName: api.example.com"
    assert str(by_pattern) == "matchPattern: *.example.com"
    assert by_name.to_dict() == {"matchName": "api.example.com"}
    assert by_pattern == FqdnSelector(match_pattern="*.example.com")
    assert hash(by_pattern) == hash(FqdnSelector(match_pattern="*.example.com"))
    assert len({by_name, by_pattern, FqdnSelector(match_name="api.example.com")}) == 2
    assert "_matcher" not in repr(by_name)


@pytest.mark.parametrize(
    ("d", "problem"),
    [
        ({}, "exactly one"),
        ({"matchName": "a.com", "matchPattern": "*.com"}, "exactly one"),
        ({"matchname": "a.com"}, "unknown field"),
        ({"matchName": 3}, "must be a string"),
        ({"matchName": "*.com"}, "invalid character"),
        ({"matchPattern": "a..com"}, "empty label"),
    ],
)
def test_selector_from_dict_errors(d: dict[str, object], problem: str) -> None:
    with pytest.raises(FqdnPatternError, match=problem):
        FqdnSelector.from_dict(d)


def test_errors_are_value_errors() -> None:
    with pytest.raises(ValueError, match="invalid matchPattern 'a b'"):
        validate_pattern("a b")


def test_regex_form_for_display() -> None:
    assert compile_pattern("**.app*.x.com").regex == r"^(?:[-a-z0-9_]+\.)+app[-a-z0-9_]*\.x\.com\.$"
    assert compile_pattern("*.x.com").regex == r"^[-a-z0-9_]+\.x\.com\.$"
    assert compile_pattern("*").regex == ".*"
    assert compile_name("a.com").regex == r"^a\.com\.$"


def test_many_stars_stay_linear() -> None:
    # A backtracking regex would take exponential time here; the query name comes from the pod.
    pattern = compile_pattern("*a" * 40 + "b.com")
    start = time.monotonic()
    for _ in range(100):
        assert not pattern.matches("a" * 63 + ".com")
    assert time.monotonic() - start < 1.0


_label = st.text(alphabet="abcxyz019-_", min_size=1, max_size=8)
_name = st.lists(_label, min_size=1, max_size=5).map(".".join)


@given(name=_name)
def test_property_name_matches_itself_and_star(name: str) -> None:
    assert compile_name(name).matches(name.upper())
    assert compile_pattern(name).matches(name)
    assert compile_pattern("*").matches(name)


@given(name=_name, sub=st.lists(_label, min_size=1, max_size=4))
def test_property_double_star_is_one_or_more_labels(name: str, sub: list[str]) -> None:
    pattern = compile_pattern("**." + name)
    assert pattern.matches(".".join(sub) + "." + name)
    assert not pattern.matches(name)
    single = compile_pattern("*." + name)
    assert single.matches(".".join(sub) + "." + name) is (len(sub) == 1)


@given(glob=st.text(alphabet="ab*", min_size=1, max_size=8), label=st.text(alphabet="ab", min_size=1, max_size=10))
def test_property_label_glob_agrees_with_fnmatch(glob: str, label: str) -> None:
    # An all-star label needs one character at least, which label has.
    expected = glob.strip("*") == "" or fnmatch.fnmatchcase(label, glob)
    assert compile_pattern(glob + ".com").matches(label + ".com") is expected
