"""Problems found in a policy file, and the one exception that carries all of them.

A file is applied whole or not at all, so loading never stops at the first problem: every
problem is collected (with its file, line, column, document and field path) and raised together.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# A field path as pydantic and the YAML walker build it: mapping keys and sequence indices.
Loc = tuple[str | int, ...]


def format_path(loc: Loc) -> str:
    """``("spec", "egress", 0, "toPorts")`` -> ``spec.egress[0].toPorts``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out


@dataclass(frozen=True, order=True)
class Problem:
    """One problem, printed ``file:line path: message`` or, without a path, ``file:line:col: message``
    (with `` (document N)`` after the position in multi-document files).

    ``line`` and ``column`` are 1-based (0 = unknown); ``document`` is the 0-based index of the
    YAML document in a multi-document file (shown 1-based, and only when the file has several).
    """

    file: str
    line: int
    column: int
    document: int
    path: str
    message: str
    multi_document: bool = False

    def __str__(self) -> str:
        where = self.file
        if self.line:
            where += f":{self.line}"
            # Character-level problems (typography, YAML syntax) carry a column; field problems
            # read better as `file:line path: message`, the column stays in the object.
            if self.column and not self.path:
                where += f":{self.column}"
        if self.multi_document:
            where += f" (document {self.document + 1})"
        return f"{where} {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class PolicyError(Exception):
    """A policy file (or text) that cannot be applied. ``problems`` lists every problem found."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems: Sequence[Problem] = sorted(problems, key=lambda p: (p.document, p.line, p.column, p.path))
        super().__init__("\n".join(str(p) for p in self.problems))
