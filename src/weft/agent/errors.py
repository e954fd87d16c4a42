"""Errors the agent API returns: CNI spec codes where one applies, weft's own from 100."""

from __future__ import annotations

# CNI spec codes
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENV = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
NOT_AVAILABLE = 50
# weft's own
INTERNAL = 100
POOL_EXHAUSTED = 101
BAD_REQUEST = 102
CHECK_FAILED = 103
ALREADY_EXISTS = 104


class AgentError(Exception):
    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self) -> dict[str, object]:
        return {"code": self.code, "msg": self.msg, "details": self.details}
