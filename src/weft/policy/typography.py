"""Detect typography pasted from web pages, before the YAML parser sees it.

Blog posts and chat tools turn ``"`` into curly quotes, ``-`` list markers into en/em dashes
or bullets, spaces into non-breaking spaces, and strip indentation. YAML then fails with messages
such as "while scanning for the next token", which name neither the character nor the fix. This
scan names both, with line and column, so the user can repair the paste.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

# Characters that look like ASCII quotes but are not YAML quotes.
_QUOTES = {
    "\u201c": ('left double quotation mark "\u201c"', '"'),
    "\u201d": ('right double quotation mark "\u201d"', '"'),
    "\u201e": ('double low-9 quotation mark "\u201e"', '"'),
    "\u201f": ('double high-reversed-9 quotation mark "\u201f"', '"'),
    "\u2033": ('double prime "\u2033"', '"'),
    "\u00ab": ('left guillemet "\u00ab"', '"'),
    "\u00bb": ('right guillemet "\u00bb"', '"'),
    "\u2018": ('left single quotation mark "\u2018"', "'"),
    "\u2019": ('right single quotation mark "\u2019"', "'"),
    "\u201a": ('single low-9 quotation mark "\u201a"', "'"),
    "\u201b": ('single high-reversed-9 quotation mark "\u201b"', "'"),
    "\u2032": ('prime "\u2032"', "'"),
}
# Characters that look like "-" (and bullets, which some pages use for list items).
_DASHES = {
    "\u2013": 'en dash "\u2013"',
    "\u2014": 'em dash "\u2014"',
    "\u2012": 'figure dash "\u2012"',
    "\u2010": 'hyphen "\u2010"',
    "\u2011": 'non-breaking hyphen "\u2011"',
    "\u2212": 'minus sign "\u2212"',
    "\u2022": 'bullet "\u2022"',
    "\u00b7": 'middle dot "\u00b7"',
    "\u25aa": 'small square bullet "\u25aa"',
}
# Invisible or odd spaces: YAML only knows " " (and tab, which it forbids for indentation).
_SPACES = {
    "\u00a0": "non-breaking space (U+00A0)",
    "\u2007": "figure space (U+2007)",
    "\u202f": "narrow no-break space (U+202F)",
    "\u2002": "en space (U+2002)",
    "\u2003": "em space (U+2003)",
    "\u2009": "thin space (U+2009)",
    "\u200b": "zero-width space (U+200B)",
    "\u200c": "zero-width non-joiner (U+200C)",
    "\u200d": "zero-width joiner (U+200D)",
    "\u2060": "word joiner (U+2060)",
    "\ufeff": "byte order mark (U+FEFF) inside the text",
    "\u3000": "ideographic space (U+3000)",
}
_FULLWIDTH_COLON = "\uff1a"

# A key that is a quoted string immediately followed by ":" and a non-space, e.g. "k8s:app":dns.
_QUOTED_KEY_NO_SPACE = re.compile(r"""^\s*(?:-\s+)?(?:"[^"]*"|'[^']*'):(?=[^\s])""")
# "key:" with nothing after it (a parent key), with optional "- " list marker before it.
_PARENT_KEY = re.compile(r"""^(\s*)(?:-\s+)?[^\s#'"][^:#]*:\s*(?:#.*)?$""")


@dataclass(frozen=True)
class TypographyIssue:
    """One pasted-typography problem; ``line`` and ``column`` are 1-based."""

    line: int
    column: int
    message: str


def _strings_and_comment(line: str) -> tuple[list[tuple[int, int]], int]:
    """Spans of quoted scalars on this line (start, end) and where a comment starts (or len).

    Only straight ASCII quotes open a YAML string; a curly quote is reported elsewhere. The scan
    is per line: multi-line quoted scalars are rare in policies and only lose precision here.
    """
    spans: list[tuple[int, int]] = []
    i, n = 0, len(line)
    prev = " "
    while i < n:
        ch = line[i]
        if ch == "#" and prev in " \t":
            return spans, i
        if ch in "\"'" and (prev in " \t[{,:-" or i == 0):
            j = i + 1
            while j < n:
                if ch == '"' and line[j] == "\\":
                    j += 2
                    continue
                if line[j] == ch:
                    if ch == "'" and j + 1 < n and line[j + 1] == "'":
                        j += 2
                        continue
                    break
                j += 1
            spans.append((i, j))
            i = j + 1
            prev = ch
            continue
        prev = ch
        i += 1
    return spans, n


def _inside(spans: list[tuple[int, int]], col: int) -> bool:
    return any(a < col < b for a, b in spans)


def scan(text: str, *, json_input: bool = False) -> list[TypographyIssue]:
    """Every pasted-typography problem in ``text``, in order. ``json_input`` allows tabs (JSON
    permits them between tokens, and the loader replaces them before parsing)."""
    issues: list[TypographyIssue] = []
    lines = text.split("\n")
    prose = _block_scalar_lines(lines)
    for lineno, raw in enumerate(lines, start=1):
        if lineno - 1 in prose:
            continue  # free text of a `|` or `>` block: YAML takes it verbatim
        line = raw.rstrip("\r")
        spans, comment_at = _strings_and_comment(line)
        body = line[:comment_at]
        stripped = body.lstrip(" ")
        indent = len(body) - len(stripped)
        free_text = stripped.startswith("description:")
        rest = stripped[len("description:") :]
        free_text_start = indent + len("description:") + len(rest) - len(rest.lstrip(" "))  # first value column
        # A list marker that is not "-": the most common paste damage, so it gets its own message.
        lead = stripped[:1]
        if lead in _DASHES and (len(stripped) == 1 or stripped[1] in " \t\u00a0"):
            issues.append(TypographyIssue(lineno, indent + 1, f'{_DASHES[lead]} used as a list marker; YAML needs "-"'))
        for col, ch in enumerate(body):
            if ch == "\t":
                if json_input or _inside(spans, col):
                    continue
                where = "indentation" if col < indent or not body[:col].strip() else "the line"
                issues.append(TypographyIssue(lineno, col + 1, f"tab in {where}; YAML needs spaces"))
            elif ch in _SPACES:
                issues.append(TypographyIssue(lineno, col + 1, f"{_SPACES[ch]}; YAML needs a plain space"))
            elif ch in _QUOTES:
                name, fix = _QUOTES[ch]
                # An apostrophe between letters (It's, we've) is prose inside a plain value, and
                # YAML reads it fine; anywhere else a curly quote was meant to quote something.
                if ch == "\u2019" and 0 < col < len(body) - 1 and body[col - 1].isalpha() and body[col + 1].isalpha():
                    continue
                if _inside(spans, col):
                    continue
                # Inside free text (a description), quotes after the first word are prose.
                if free_text and col > free_text_start:
                    continue
                issues.append(TypographyIssue(lineno, col + 1, f"{name} is not a YAML quote; use {fix}"))
            elif ch == _FULLWIDTH_COLON:
                issues.append(TypographyIssue(lineno, col + 1, 'full-width colon "\uff1a"; YAML needs ":"'))
            elif (
                ch in _DASHES
                and col != indent
                and not _inside(spans, col)
                and unicodedata.category(ch) == "Pd"
                and not free_text
                and ((col > 0 and body[col - 1] != " ") or (col + 1 < len(body) and body[col + 1] != " "))
            ):
                # A dash glued inside a plain value (a range "80\u201390", a name "kube\u2013dns")
                # is never what a policy means; the schema would reject it with a vaguer message.
                # Free text (description) may use dashes as punctuation.
                issues.append(TypographyIssue(lineno, col + 1, f'{_DASHES[ch]} inside a value; did you mean "-"?'))
        normalized = _ascii(line)
        glued = _QUOTED_KEY_NO_SPACE.match(normalized)
        if glued:
            colon = glued.end() - 1  # the ":" right after the key's closing quote
            issues.append(TypographyIssue(lineno, colon + 1, 'no space after ":"; YAML needs "key: value"'))
    issues.extend(_flattened_indentation(lines, prose))
    issues.sort(key=lambda i: (i.line, i.column))
    return issues


_BLOCK_SCALAR_START = re.compile(r"""[:-]\s+[|>][-+0-9]*\s*(#.*)?$""")


def _block_scalar_lines(lines: list[str]) -> set[int]:
    """Indices of lines that are the content of a block scalar (``key: |`` and what follows,
    more indented than the key)."""
    out: set[int] = set()
    i = 0
    while i < len(lines):
        line = lines[i].rstrip("\r")
        if _BLOCK_SCALAR_START.search(line):
            indent = len(line) - len(line.lstrip(" "))
            j = i + 1
            while j < len(lines):
                nxt = lines[j].rstrip("\r")
                if nxt.strip() and len(nxt) - len(nxt.lstrip(" ")) <= indent:
                    break
                out.add(j)
                j += 1
            i = j
            continue
        i += 1
    return out


def _flattened_indentation(lines: list[str], prose: set[int]) -> list[TypographyIssue]:
    """A parent key ("spec:") followed by a line at the same indentation that is not a list item:
    the indentation was lost in the paste (a policy never has an empty parent key)."""
    issues: list[TypographyIssue] = []
    for i, raw in enumerate(lines[:-1]):
        if i in prose:
            continue
        line = _ascii(raw.rstrip("\r"))
        m = _PARENT_KEY.match(line)
        if not m or line.strip().startswith("---"):
            continue
        nxt = None
        for j in range(i + 1, len(lines)):
            candidate = lines[j].strip()
            if candidate and not candidate.startswith("#"):
                nxt = _ascii(lines[j].rstrip("\r"))
                break
        if nxt is None:
            continue
        indent = len(m.group(1)) + (2 if line.lstrip().startswith("- ") else 0)
        nxt_indent = len(nxt) - len(nxt.lstrip(" "))
        if nxt_indent == indent and not nxt.lstrip().startswith("-") and not nxt.lstrip().startswith("---"):
            key = line.strip().lstrip("- ").split(":")[0]
            issues.append(
                TypographyIssue(
                    i + 1,
                    indent + 1,
                    f'"{key}:" has no value and the next line is not indented; was the indentation lost?',
                )
            )
    return issues


def _ascii(line: str) -> str:
    """``normalize`` for one line, skipping the work for plain ASCII lines (nearly all)."""
    return line if line.isascii() else normalize(line)


def normalize(text: str) -> str:
    """``text`` with pasted typography replaced by its ASCII meaning (quotes, list-marker dashes,
    odd spaces, full-width colons). Indentation that was lost cannot be restored."""
    out_lines = []
    for line in text.split("\n"):
        stripped = line.lstrip(" \u00a0")
        indent = len(line) - len(stripped)
        if stripped[:1] in _DASHES and (len(stripped) == 1 or stripped[1] in " \t\u00a0"):
            line = line[:indent] + "-" + line[indent + 1 :]
        out = []
        for ch in line:
            if ch in _QUOTES:
                out.append(_QUOTES[ch][1])
            elif ch in _SPACES:
                out.append("" if ch in "\u200b\u200c\u200d\u2060\ufeff" else " ")
            elif ch == _FULLWIDTH_COLON:
                out.append(":")
            else:
                out.append(ch)
        out_lines.append("".join(out))
    return "\n".join(out_lines)
