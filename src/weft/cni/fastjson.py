"""JSON for the CNI plugin without importing :mod:`json`.

``import json`` costs about 7 ms here (it pulls in ``re`` and ``enum``), a third of the
plugin's whole start-up, paid on every exec. The parsing and encoding themselves are done by
CPython's own accelerator, ``_json``, which :mod:`json` uses too; this module only drives it.
Errors are :class:`DecodeError`, a ``ValueError`` with ``msg``, ``pos``, ``lineno``, ``colno``
like ``json.JSONDecodeError`` (errors inside a document are
left to the real :mod:`json`, imported on that error path only, whose ``JSONDecodeError`` is a
``ValueError`` too).
Standard library only.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs milliseconds to import: for the type checker only
    from typing import Any

_json: Any
try:
    import _json
except ImportError:  # another Python without the accelerator: the slow, sure way
    _json = None

_WHITESPACE = " \t\n\r"
_CONSTANTS = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}


class DecodeError(ValueError):
    def __init__(self, msg: str, doc: str, pos: int) -> None:
        self.msg = msg
        self.pos = pos
        self.lineno = doc.count("\n", 0, pos) + 1
        self.colno = pos - doc.rfind("\n", 0, pos)
        super().__init__(f"{msg}: line {self.lineno} column {self.colno} (char {pos})")


class _Context:
    """What ``_json.make_scanner`` reads from a decoder (the attributes of json.JSONDecoder)."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    memo: dict[str, str] = {}

    @staticmethod
    def parse_constant(name: str) -> float:
        return _CONSTANTS[name]


def _skip(doc: str, idx: int) -> int:
    while idx < len(doc) and doc[idx] in _WHITESPACE:
        idx += 1
    return idx


def loads(doc: str) -> Any:
    if _json is None:
        import json

        return json.loads(doc)
    scan = _json.make_scanner(_Context)
    idx = _skip(doc, 0)
    try:
        value, end = scan(doc, idx)
    except StopIteration as stop:
        raise DecodeError("Expecting value", doc, int(stop.value)) from None
    except (SystemError, ValueError):
        # _json reports errors inside a document with json.decoder.JSONDecodeError, which it
        # only finds if json.decoder was imported (else: SystemError). On this error path the
        # real json module is worth its import: it raises the precise error.
        import json

        return json.loads(doc)
    end = _skip(doc, end)
    if end != len(doc):
        raise DecodeError("Extra data", doc, end)
    return value


def _unencodable(obj: object) -> object:
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def dumps(obj: Any, separators: tuple[str, str] = (", ", ": ")) -> str:
    if _json is None:
        import json

        return json.dumps(obj, separators=separators)
    encode = _json.make_encoder(None, _unencodable, _json.encode_basestring_ascii, None, separators[1],
                                separators[0], False, False, True)
    return "".join(encode(obj, 0))
