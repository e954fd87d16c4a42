"""The DNS names flows are enriched with: what each pod resolved, as the node's DNS proxy saw it.

The proxy saves its learned-name cache to ``<state_dir>/dnsproxy/cache.json`` (at most about once
a second); this reads that file again only when it changed, at most once a second, so the flow
reader thread never waits on the proxy. A pod's names for an address: ``names_of("ns/pod", ip)``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("weft.agent.dnsnames")


class DnsNames:
    def __init__(self, cache_path: Path, pod_of_endpoint: Callable[[int], str | None],
                 min_interval_s: float = 1.0) -> None:
        self.cache_path = cache_path
        self.pod_of_endpoint = pod_of_endpoint
        self.min_interval_s = min_interval_s
        self._index: dict[tuple[str, str], tuple[str, ...]] = {}
        self._mtime_ns = -1
        self._checked = 0.0
        self._lock = threading.Lock()

    def names_of(self, pod: str, ip: str) -> tuple[str, ...]:
        if not pod:
            return ()
        self._refresh()
        return self._index.get((pod, ip), ())

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.min_interval_s or not self._lock.acquire(blocking=False):
            return
        try:
            self._checked = now
            try:
                mtime = self.cache_path.stat().st_mtime_ns
            except FileNotFoundError:
                self._index = {}
                return
            if mtime == self._mtime_ns:
                return
            try:
                data = json.loads(self.cache_path.read_text())
            except (OSError, ValueError) as exc:  # half-written is impossible (rename), unreadable is not
                log.warning("DNS proxy cache %s unreadable: %s", self.cache_path, exc)
                return
            index: dict[tuple[str, str], list[str]] = {}
            for entry in data.get("entries", []):
                pod = self.pod_of_endpoint(int(entry.get("ep", 0)))
                if pod is None:
                    continue
                names = index.setdefault((pod, str(entry.get("address", ""))), [])
                name = str(entry.get("name", "")).rstrip(".")
                if name and name not in names:
                    names.append(name)
            self._index = {key: tuple(names) for key, names in index.items()}
            self._mtime_ns = mtime
        finally:
            self._lock.release()
