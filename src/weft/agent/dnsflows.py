"""Follows the DNS proxy's L7 ring (``l7.get`` on its control socket) and hands the records, as
L7 flows, to the node's :class:`~weft.agent.flows.FlowObserver`.

The proxy keeps its records in a ring of its own, so it never waits for the agent; this thread
asks for what came after its cursor. The cursor is kept in the state directory with the proxy
ring's epoch: a restarted agent resumes where the last one stopped (records the proxy still holds
are not lost), and a new proxy process (another epoch) is read from its start. The cursor is saved
after a page is handed over, so an agent killed in between shows that page again (at least once).
Records overwritten before they were read are reported as lost events of source
``OBSERVER_EVENTS_QUEUE``: the ring sits where Hubble's observer events queue sits for Cilium's
proxy access logs (between the L7 proxy and the flow parser), which is what that source counts.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

from weft.agent.flows import FlowObserver
from weft.dnsproxy.control import ProxyCallError, ProxyClient, ProxyUnavailable
from weft.observe import flow as flows

log = logging.getLogger("weft.agent.dnsflows")
POLL_S = 0.1
IDLE_POLL_S = 1.0  # while the proxy is not reachable


class DnsFlowFollower:
    def __init__(self, observer: FlowObserver, socket_path: Path, state_dir: Path) -> None:
        self.observer = observer
        self.client = ProxyClient(socket_path, timeout=2.0)
        self._cursor_path = state_dir / "dns-l7-cursor.json"
        self.epoch = 0
        self.cursor = 0
        self.records = 0
        self.missed = 0
        self.unreadable = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._load_cursor()
        self._thread = threading.Thread(target=self._run, name="dns-l7-follower", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._save_cursor()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                more = self.poll_once()
            except (ProxyUnavailable, ProxyCallError, OSError, ValueError) as exc:
                log.debug("DNS proxy L7 records not read: %s", exc)
                self._stop.wait(IDLE_POLL_S)
                continue
            if not more:
                self._stop.wait(POLL_S)

    def poll_once(self) -> bool:
        """Read one page, publish it; True when the proxy may hold more."""
        page = self.client.l7_get(self.cursor)
        epoch = int(page.get("epoch", 0))
        if epoch != self.epoch:
            # Another proxy process: its sequence numbers start anew, read it from its start.
            fresh = self.epoch != 0
            self.epoch, self.cursor = epoch, 0
            if fresh or page.get("missed"):
                page = self.client.l7_get(0)
        self.publish(page)
        return bool(page.get("records"))

    def publish(self, page: dict[str, Any]) -> None:
        enrichment = self.observer.enrichment
        now = time.time_ns()
        out: list[dict[str, Any]] = []
        missed = int(page.get("missed", 0))
        if missed:
            self.missed += missed
            self.observer.injected_lost += missed  # in the agent's lost counts (status, hubble_lost_events)
            out.append(flows.lost_response(flows.LOST_AGENT_QUEUE, missed, enrichment.node_name, now))
        for record in page.get("records") or []:
            try:
                out.append(flows.l7_dns_response(record, enrichment))
            except flows.UnknownRecord as exc:
                self.unreadable += 1
                if self.unreadable == 1:
                    log.warning("unreadable DNS L7 record (counted, not shown): %s", exc)
        self.records += len(page.get("records") or [])
        self.cursor = int(page.get("next", self.cursor))
        self.observer.inject(out)
        if out:
            self._save_cursor()

    def _load_cursor(self) -> None:
        try:
            data = json.loads(self._cursor_path.read_text())
            self.epoch, self.cursor = int(data["epoch"]), int(data["cursor"])
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("DNS L7 cursor %s unreadable (%s): reading the proxy's ring from its start",
                        self._cursor_path, exc)

    def _save_cursor(self) -> None:
        try:
            self._cursor_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._cursor_path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"epoch": self.epoch, "cursor": self.cursor}))
            tmp.replace(self._cursor_path)
        except OSError as exc:
            log.warning("cannot record the DNS L7 cursor in %s: %s", self._cursor_path, exc)

    def status(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self.cursor, "records": self.records, "missed": self.missed,
                "unreadable": self.unreadable}
