"""``matchName`` / ``matchPattern``: validation and matching of DNS names, with Cilium's semantics.

Names are compared case-insensitively (ASCII only, as DNS does) and fully qualified: ``normalize_name``
lowercases and adds the trailing dot, so ``APP1.Example.com`` and ``app1.example.com.`` are one name.

``matchName`` is an exact match. ``matchPattern`` adds wildcards:

* ``*`` inside a label matches zero or more of ``[-a-z0-9_]`` and never crosses a dot:
  ``app*.x.com`` matches ``app.x.com`` and ``app1.x.com``; ``*.x.com`` matches ``a.x.com`` but
  neither ``x.com`` nor ``a.b.x.com``. A run of stars is one star (``a**b`` is ``a*b``), as in Cilium.
* A leading ``**.`` (two or more stars, then a dot) matches one or more whole labels:
  ``**.x.com`` matches ``a.x.com`` and ``a.b.x.com`` but not ``x.com``.
* A pattern made only of stars, with or without one trailing dot (``*``, ``**``, ``*.``, ``**.``),
  matches every name, the root ``.`` included (Cilium's match-all, which lets the root NS priming
  query of a resolver through).

Validity follows Cilium's CRD schema and ``pkg/fqdn/matchpattern``: characters ``[-a-zA-Z0-9_.]``
(plus ``*`` in a pattern), no empty label (no leading dot, no ``..``; one trailing dot is allowed),
at most 255 characters. weft also rejects a label longer than 63 characters (DNS's own limit; in a
pattern the stars do not count), since such a rule could never match a name.

Matching is label by label, without regular expressions: the name comes from the pod, and a
backtracking regex for a pattern with many stars would let one query stall the proxy (Cilium's Go
regexps are linear-time; Python's are not). A wildcard never matches a name with an empty label or
with a character outside ``[-a-z0-9_]`` in a label (dnspython's escapes, such as ``\\032``): so a label
that is only ``*`` needs one character at least, where Cilium's ``[-a-zA-Z0-9_]*`` would let ``*.x.com``
match ``.x.com.``, a name no DNS message can carry.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

MAX_NAME_LENGTH = 255  # Cilium's MaxFQDNLength, applied to matchName and matchPattern text
MAX_LABEL_LENGTH = 63  # RFC 1035

_NAME_CHARS = frozenset("-abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.")
_PATTERN_CHARS = _NAME_CHARS | {"*"}

# DNS is case-insensitive over ASCII only: str.lower() would also fold non-ASCII letters.
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")

# What one ``*`` stands for, on already-lowercased names.
_LABEL_CHARS = frozenset("-abcdefghijklmnopqrstuvwxyz0123456789_")
_LABEL_CLASS = "[-a-z0-9_]"
_STAR_RUNS = re.compile(r"\*+")


class FqdnPatternError(ValueError):
    """An invalid ``matchName`` or ``matchPattern``; the message names the value and the problem."""

    def __init__(self, field_name: str, value: str, problem: str) -> None:
        super().__init__(f"invalid {field_name} {value!r}: {problem}")
        self.field_name = field_name
        self.value = value
        self.problem = problem


def normalize_name(name: str) -> str:
    """Lowercase (ASCII) and fully qualified: ``"WWW.Example.com"`` -> ``"www.example.com."``.

    The empty string is the root, ``"."``.
    """
    name = name.translate(_ASCII_LOWER)
    return name if name.endswith(".") else name + "."


def _check(field_name: str, value: str, allowed: frozenset[str], allowed_text: str) -> None:
    if not isinstance(value, str):
        raise FqdnPatternError(field_name, str(value), f"must be a string, not {type(value).__name__}")
    if not value:
        raise FqdnPatternError(field_name, value, "is empty")
    bad = sorted({c for c in value if c not in allowed})
    if bad:
        shown = ", ".join(repr(c) for c in bad)
        raise FqdnPatternError(field_name, value, f"invalid character(s) {shown}; only {allowed_text} are allowed")
    if len(value) > MAX_NAME_LENGTH:
        raise FqdnPatternError(
            field_name, value, f"is {len(value)} characters long, more than the {MAX_NAME_LENGTH} allowed"
        )
    if value.startswith("."):
        raise FqdnPatternError(field_name, value, "starts with a dot (empty label)")
    body = value[:-1] if value.endswith(".") else value
    for label in body.split("."):
        if not label:
            raise FqdnPatternError(field_name, value, "has an empty label (two dots in a row)")
        literal = len(label) - label.count("*")
        if literal > MAX_LABEL_LENGTH:
            raise FqdnPatternError(
                field_name,
                value,
                f"label {label[:20]!r}... has {literal} characters, more than the {MAX_LABEL_LENGTH} allowed",
            )


def validate_name(name: str) -> None:
    """Raise :class:`FqdnPatternError` unless ``name`` is a valid ``matchName``."""
    _check("matchName", name, _NAME_CHARS, "letters, digits, '-', '_' and '.'")


def validate_pattern(pattern: str) -> None:
    """Raise :class:`FqdnPatternError` unless ``pattern`` is a valid ``matchPattern``."""
    _check("matchPattern", pattern, _PATTERN_CHARS, "letters, digits, '-', '_', '.' and '*'")


def _is_match_all(pattern: str) -> bool:
    body = pattern[:-1] if pattern.endswith(".") else pattern
    return bool(body) and body.strip("*") == ""


def _glob_label(glob: str, label: str) -> bool:
    """Whether ``label`` matches one pattern label, where ``*`` is any run of label characters.

    Iterative two-pointer matching (retry from the last star on a mismatch): O(len(glob) x
    len(label)) at worst. A backtracking regular expression would be exponential in the number of
    stars, and the name comes from the pod: a pattern like ``*a*a*a*a*a*b`` must not let a query hang
    the proxy. The caller has checked that ``label`` holds only label characters, so ``*`` may match
    any of them.
    """
    g = n = 0
    star_g, star_n = -1, 0
    while n < len(label):
        if g < len(glob) and glob[g] == "*":
            star_g, star_n = g, n
            g += 1
        elif g < len(glob) and glob[g] == label[n]:
            g += 1
            n += 1
        elif star_g >= 0:
            star_n += 1
            g, n = star_g + 1, star_n
        else:
            return False
    return glob[g:].strip("*") == ""


def _is_label(label: str) -> bool:
    return bool(label) and all(c in _LABEL_CHARS for c in label)


class Matcher:
    """A compiled ``matchName`` or ``matchPattern``; :meth:`matches` takes any spelling of a name."""

    __slots__ = ("_exact", "_labels", "_match_all", "_multi", "is_pattern", "source")

    def __init__(self, source: str, is_pattern: bool) -> None:
        self.source = source
        self.is_pattern = is_pattern
        self._match_all = False
        self._exact: str | None = None
        self._labels: tuple[str, ...] = ()
        self._multi = False
        if not is_pattern:
            self._exact = normalize_name(source)
        elif _is_match_all(source):
            self._match_all = True
        else:
            fq = normalize_name(source)
            if "*" not in fq:
                self._exact = fq  # a pattern without wildcards is a name
                return
            labels = fq[:-1].split(".")
            if len(labels) > 1 and len(labels[0]) >= 2 and labels[0].strip("*") == "":
                self._multi = True  # leading "**.": one or more whole labels
                labels = labels[1:]
            # A run of stars is one star.
            self._labels = tuple(_STAR_RUNS.sub("*", label) for label in labels)

    @property
    def regex(self) -> str:
        """The equivalent anchored regular expression, for display (matching does not use it)."""
        if self._match_all:
            return ".*"
        if self._exact is not None:
            return "^" + re.escape(self._exact) + "$"
        parts = [f"(?:{_LABEL_CLASS}+\\.)+"] if self._multi else []
        for label in self._labels:
            if label == "*":
                parts.append(_LABEL_CLASS + "+")
            else:
                parts.append("".join(_LABEL_CLASS + "*" if c == "*" else re.escape(c) for c in label))
            parts.append("\\.")
        return "^" + "".join(parts) + "$"

    def matches(self, name: str) -> bool:
        if self._match_all:
            return True
        fq = normalize_name(name)
        if self._exact is not None:
            return fq == self._exact
        labels = fq[:-1].split(".") if fq != "." else []
        if not all(_is_label(label) for label in labels):
            return False  # empty labels, escaped bytes: no wildcard matches them
        want = len(self._labels)
        if len(labels) < want + (1 if self._multi else 0):
            return False
        if not self._multi and len(labels) != want:
            return False
        tail = labels[len(labels) - want :]
        return all(
            # A label that is only "*" needs one character at least; _is_label checked that.
            _glob_label(glob, label)
            for glob, label in zip(self._labels, tail, strict=True)
        )

    def __repr__(self) -> str:
        kind = "matchPattern" if self.is_pattern else "matchName"
        return f"Matcher({kind}={self.source!r})"


def compile_pattern(pattern: str) -> Matcher:
    """Validate and compile a ``matchPattern`` (raises :class:`FqdnPatternError`)."""
    validate_pattern(pattern)
    return Matcher(pattern, is_pattern=True)


def compile_name(name: str) -> Matcher:
    """Validate and compile a ``matchName`` (raises :class:`FqdnPatternError`)."""
    validate_name(name)
    return Matcher(name, is_pattern=False)


@dataclass(frozen=True)
class FqdnSelector:
    """One ``toFQDNs`` / DNS-rule entry: exactly one of ``match_name`` and ``match_pattern``.

    Validated at construction (raises :class:`FqdnPatternError`). Equality and hashing use the
    values as written, so ``a.com`` and ``A.com.`` are two selectors that match the same names.
    """

    match_name: str | None = None
    match_pattern: str | None = None
    _matcher: Matcher = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if (self.match_name is None) == (self.match_pattern is None):
            shown = f"matchName={self.match_name!r}, matchPattern={self.match_pattern!r}"
            raise FqdnPatternError("FQDN selector", shown, "set exactly one of matchName and matchPattern")
        if self.match_name is not None:
            matcher = compile_name(self.match_name)
        else:
            assert self.match_pattern is not None
            matcher = compile_pattern(self.match_pattern)
        # Frozen dataclass: the compiled form is derived state, set once here.
        object.__setattr__(self, "_matcher", matcher)

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> FqdnSelector:
        """``{"matchName": "x"}`` or ``{"matchPattern": "y"}`` (policy YAML/JSON form)."""
        unknown = sorted(set(d) - {"matchName", "matchPattern"})
        if unknown:
            raise FqdnPatternError("FQDN selector", repr(dict(d)), f"unknown field(s) {', '.join(unknown)}")
        name, pattern = d.get("matchName"), d.get("matchPattern")
        for key, value in (("matchName", name), ("matchPattern", pattern)):
            if value is not None and not isinstance(value, str):
                raise FqdnPatternError(key, repr(value), f"must be a string, not {type(value).__name__}")
        return cls(match_name=name, match_pattern=pattern)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, str]:
        if self.match_name is not None:
            return {"matchName": self.match_name}
        assert self.match_pattern is not None
        return {"matchPattern": self.match_pattern}

    @property
    def matcher(self) -> Matcher:
        return self._matcher

    def matches(self, name: str) -> bool:
        return self._matcher.matches(name)

    def __str__(self) -> str:
        if self.match_name is not None:
            return f"matchName: {self.match_name}"
        return f"matchPattern: {self.match_pattern}"
