"""Flow logs: flows as JSON lines (the jsonpb shape) in a file rotated by size, with include
filters. ``path`` grows up to ``max_bytes``; then it becomes ``path.1`` (``path.1`` becomes
``path.2``, ... the oldest beyond ``max_files`` is removed) and a new ``path`` starts."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import IO, Any

from weft.observe.config import FlowLogInclude, FlowLogSettings
from weft.observe.filters import FlowFilter


def _as_filter(rule: FlowLogInclude) -> FlowFilter:
    return FlowFilter(namespace=tuple(rule.namespace), pod=tuple(rule.pod),
                      verdict=tuple(v.upper() for v in rule.verdict), protocol=tuple(p.lower() for p in rule.protocol))


class FlowLog:
    def __init__(self, settings: FlowLogSettings) -> None:
        self.settings = settings
        self.filters = [_as_filter(rule) for rule in settings.include]
        for f in self.filters:
            f.validate()
        self._file: IO[bytes] | None = None
        self._size = 0
        self.written = 0
        self.rotations = 0

    def wanted(self, response: Mapping[str, Any]) -> bool:
        flow = response.get("flow")
        if flow is None:
            return True  # lost events are logged: the log says where it has gaps
        return not self.filters or any(f.matches(flow) for f in self.filters)

    def _open(self) -> IO[bytes]:
        if self._file is None:
            self.settings.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.settings.path, "ab")  # noqa: SIM115 - kept open across writes
            self._size = self._file.tell()
        return self._file

    def _rotate(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        path = str(self.settings.path)
        for i in range(self.settings.max_files - 1, 0, -1):
            if os.path.exists(f"{path}.{i}"):
                os.replace(f"{path}.{i}", f"{path}.{i + 1}")
        if os.path.exists(path):
            os.replace(path, f"{path}.1")
        oldest = f"{path}.{self.settings.max_files + 1}"
        if os.path.exists(oldest):
            os.unlink(oldest)
        self.rotations += 1

    def write(self, responses: list[dict[str, Any]]) -> None:
        for response in responses:
            if not self.wanted(response):
                continue
            line = json.dumps(response, separators=(",", ":")).encode() + b"\n"
            f = self._open()
            if self._size and self._size + len(line) > self.settings.max_bytes:
                self._rotate()
                f = self._open()
            f.write(line)
            self._size += len(line)
            self.written += 1
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
