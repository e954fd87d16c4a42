"""The agent's flow observer: a thread that reads the datapath's verdict events (weft_events),
turns them into enriched flows, keeps the last N in the node's flow ring, writes the flow log,
and serves ``flows.get`` (weft observe).

Threads: the reader thread is the only writer of the ring and the log. Enrichment reads an
immutable snapshot (:class:`weft.observe.flow.Enrichment`) that the agent's worker thread
rebuilds whenever the agent's state is saved and swaps in whole. ``flows.get`` runs on the
worker thread and only reads the ring (which has its own lock), so it never blocks on the reader.

Loss is never silent: records the kernel could not put in the full ring are counted by the
datapath (events_lost) and appear in the flow stream as lost events; records this agent could
not read are counted too; a follower that fell behind the ring is told how much it missed. The
kernel count the agent already reported is kept in the state directory, so losses while no agent
ran are reported once, by the next agent.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from weft.agent.errors import BAD_REQUEST, AgentError
from weft.datapath.loader import NodeDatapath
from weft.datapath.ringbuf import Batch, MappedRing
from weft.observe import flow as flows
from weft.observe.config import FlowSettings
from weft.observe.filters import FilterError, Filters
from weft.observe.flowlog import FlowLog
from weft.observe.ring import FlowRing, ReadResult

log = logging.getLogger("weft.agent.flows")
POLL_MS = 100
LOST_CHECK_S = 0.25
DRAIN_RECORDS = 4096  # records read from the kernel ring in one batch
MAX_PAGE = 10000  # flows in one flows.get answer; a follower gets the rest on its next call


SUBSCRIPTION_CAPACITY = 1 << 16  # flows a follower may fall behind before it is told of a loss
SUBSCRIPTION_IDLE_S = 30.0  # a follower that stops asking for this long is dropped
GC_YOUNG_THRESHOLD = 10000  # allocations between young collections (Python's default: 700)
ANSWERS_KEPT = 4096  # a follower's filter answers per kind of flow, before they are forgotten


class Subscription:
    """A follower's own queue: the flows its filter keeps, pushed as they are published, so a
    follower's pace is bounded by this queue (65,536 flows), not by the node's flow ring. What
    overflows is counted and handed to the follower as a lost-events notice.

    ``by_kind``: the filter does not look at time (no since/until), so its answer for a flow the
    reader made from a template (:class:`weft.observe.flow.FlowResponse`) holds for every flow of
    that kind and ports: it is asked once per kind, not once per flow."""

    def __init__(self, keep: Callable[[dict[str, Any]], bool], capacity: int = SUBSCRIPTION_CAPACITY,
                 by_kind: bool = False) -> None:
        self.keep = keep
        self.capacity = capacity
        self.by_kind = by_kind
        self.items: deque[flows.Item] = deque()
        self.lost = 0
        self.last_poll = time.monotonic()
        self._lock = threading.Lock()
        self._answers: dict[Any, bool] = {}

    def offer(self, responses: Sequence[flows.Item]) -> None:
        keep, as_response = self.keep, flows.as_response
        kept = self._kept(responses) if self.by_kind else [r for r in responses if keep(as_response(r))]
        if not kept:
            return
        with self._lock:
            room = max(self.capacity - len(self.items), 0)
            if room < len(kept):
                self.lost += len(kept) - room
                kept = kept[:room]
            self.items.extend(kept)

    def _kept(self, responses: Sequence[flows.Item]) -> list[flows.Item]:
        keep, answers = self.keep, self._answers
        kept = []
        for response in responses:
            kind = getattr(response, "kind", None)
            if kind is None:
                if keep(flows.as_response(response)):
                    kept.append(response)
                continue
            key = (kind, response.ports)  # type: ignore[union-attr]
            answer = answers.get(key)
            if answer is None:
                if len(answers) >= ANSWERS_KEPT:
                    answers.clear()
                answer = answers[key] = keep(flows.as_response(response))
            if answer:
                kept.append(response)
        return kept

    def poll(self, max_items: int, compact: bool = False) -> tuple[list[Any], int]:
        """Up to ``max_items`` queued flows and the number lost since the last poll (never waits:
        its callers run on threads and loops that other work shares). ``compact``: flows the
        reader made from events stay :class:`~weft.observe.flow.EventFlow` (for a caller that
        serializes them from their template), else all are response dicts."""
        with self._lock:
            self.last_poll = time.monotonic()
            popleft = self.items.popleft
            out = [popleft() for _ in range(min(max_items, len(self.items)))]
            lost, self.lost = self.lost, 0
        if not compact:
            out = [flows.as_response(item) for item in out]
        return out, lost

    def idle(self, now: float) -> bool:
        """Not polled for SUBSCRIPTION_IDLE_S: its follower is gone without unsubscribing."""
        return now - self.last_poll > SUBSCRIPTION_IDLE_S


def wall_offset_ns() -> int:
    """Add to a CLOCK_MONOTONIC time (bpf_ktime_get_ns) to get the wall clock."""
    return time.time_ns() - time.monotonic_ns()


class FlowObserver:
    def __init__(self, node_name: str, datapath: NodeDatapath, settings: FlowSettings, state_dir: Path) -> None:
        self.node_name = node_name
        self.datapath = datapath
        self.settings = settings
        self.ring = FlowRing(settings.ring_capacity)
        self.flow_log = FlowLog(settings.log) if settings.log is not None else None
        self.enrichment = flows.Enrichment(node_name=node_name)
        self._maker = flows.FlowMaker()  # the reader thread's: events -> flows from per-kind templates
        self._lost_path = state_dir / "flows-lost.json"
        self.kernel_lost_total = 0  # the datapath's events_lost, as last read
        self.kernel_lost_reported = 0  # of which already in the flow stream
        self.unreadable = 0  # records of another version or size
        self.events = 0
        # Called with every batch of published responses, on the reader thread (the metrics' counters).
        self.on_publish: Callable[[list[flows.Item]], None] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Followers' queues; the lock also makes "read the ring, then subscribe" atomic with
        # publishing, so a new follower sees each flow once (from the ring or from its queue).
        self._subscriptions: dict[str, Subscription] = {}
        self._publish_lock = threading.Lock()
        self._ring: MappedRing | None = None
        # Flows made by other threads (the DNS proxy's L7 records), published by the reader thread.
        self._injected: queue.SimpleQueue[list[dict[str, Any]]] = queue.SimpleQueue()
        self.injected_lost = 0  # records such a source lost before this agent read them

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Open the ring on the caller's thread (errors surface at agent start), then read it
        on a thread of its own."""
        if self.settings.event_level == "off":
            log.info("flow events are off (flows.event_level)")
        self._ring = MappedRing(self.datapath.events_fd(), self.datapath.events_ring_size())
        self._load_reported()
        # The reader makes an object per flow, and under load holds tens of thousands in the
        # ring and followers' queues: the cyclic GC's full passes over the agent's whole heap
        # (its start-up objects, which live as long as the process) then cost the reader a
        # large share of its time. Those objects are exempted from collection passes; young
        # collections run less often (each still sees every new container).
        gc.freeze()
        threshold0, threshold1, threshold2 = gc.get_threshold()
        gc.set_threshold(max(threshold0, GC_YOUNG_THRESHOLD), threshold1, threshold2)
        self._thread = threading.Thread(target=self._run, name="flow-reader", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        if self.flow_log is not None:
            self.flow_log.close()

    def set_enrichment(self, enrichment: flows.Enrichment) -> None:
        self.enrichment = enrichment  # one reference swap: readers see the old or the new one

    # ------------------------------------------------------------------ reader thread
    def _run(self) -> None:
        next_lost_check = 0.0
        while not self._stop.is_set():
            try:
                assert self._ring is not None
                # Everything committed at once (up to DRAIN_RECORDS): under load, batches grow with
                # the backlog, and the per-batch work (filters, metrics, locks) is shared by more flows.
                if self._ring.wait(POLL_MS / 1000):
                    self._flush(self._ring.drain(DRAIN_RECORDS))
                self._publish_injected()
                now = time.monotonic()
                if now >= next_lost_check:
                    self._check_kernel_loss()
                    next_lost_check = now + LOST_CHECK_S
            except Exception:
                # The reader must outlive any one bad record or transient error.
                log.exception("flow reader")
                self._stop.wait(1.0)

    def _flush(self, batch: Batch) -> None:
        if not batch:
            return
        made = self._maker.make_batch(batch.data, batch.offsets, batch.lengths, wall_offset_ns(), self.enrichment)
        if made.unreadable:
            if not self.unreadable:
                log.warning("unreadable flow event (counted, not shown): %s", made.first_error)
            self.unreadable += made.unreadable
        self.events += made.events
        self._publish(made.flows)

    def inject(self, responses: list[dict[str, Any]]) -> None:
        """Flows from another source (any thread): the reader thread publishes them within a poll."""
        if responses:
            self._injected.put(responses)

    def _publish_injected(self) -> None:
        while True:
            try:
                self._publish(self._injected.get_nowait())
            except queue.Empty:
                return

    def _publish(self, responses: list[Any]) -> None:
        if not responses:
            return
        with self._publish_lock:
            self.ring.extend(responses)
            now = time.monotonic()
            for sub_id, sub in list(self._subscriptions.items()):
                if sub.idle(now):
                    # An abandoned queue would fill to its capacity and be offered every flow.
                    del self._subscriptions[sub_id]
                else:
                    sub.offer(responses)
        if self.on_publish is not None:
            self.on_publish(responses)
        if self.flow_log is not None:
            try:
                self.flow_log.write([flows.as_response(r) for r in responses])
            except OSError as exc:
                log.warning("flow log %s: %s", self.flow_log.settings.path, exc)

    def _check_kernel_loss(self) -> None:
        total = self.datapath.counters().get("events_lost", (0, 0))[0]
        self.kernel_lost_total = total
        if total < self.kernel_lost_reported:
            self.kernel_lost_reported = 0  # the datapath's maps were made anew
        delta = total - self.kernel_lost_reported
        if delta <= 0:
            return
        self._publish([flows.lost_response(flows.LOST_KERNEL_RING, delta, self.node_name, time.time_ns())])
        self.kernel_lost_reported = total
        self._save_reported()

    def _load_reported(self) -> None:
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            self.kernel_lost_reported = int(json.loads(self._lost_path.read_text())["kernel_reported"])

    def _save_reported(self) -> None:
        try:
            self._lost_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._lost_path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"kernel_reported": self.kernel_lost_reported}))
            tmp.replace(self._lost_path)
        except OSError as exc:
            log.warning("cannot record reported flow losses in %s: %s", self._lost_path, exc)

    # ------------------------------------------------------------------ API
    def get(self, p: dict[str, Any]) -> dict[str, Any]:
        """``flows.get``: params ``filters`` ({include, exclude}), ``after`` (a cursor from an
        earlier answer: only what came since, for --follow), ``first``/``last``/``all``,
        ``since``/``until`` (RFC 3339), ``subscribe`` (also open a follower queue: its id comes
        back as ``subscription``), ``subscription`` (poll that queue). Answers ``{"responses",
        "cursor", "node"}``; lost events (kernel ring, this agent, the follower's own gap) are
        among the responses."""
        try:
            filters = Filters.from_json(p.get("filters"))
            since = flows.parse_time(str(p["since"])) if p.get("since") else None
            until = flows.parse_time(str(p["until"])) if p.get("until") else None
        except (FilterError, ValueError) as exc:
            raise AgentError(BAD_REQUEST, str(exc)) from exc
        sub_id = p.get("subscription")
        if sub_id is not None:
            sub = self._subscriptions.get(str(sub_id))
            if sub is None:
                raise AgentError(BAD_REQUEST, f"no subscription {sub_id!r} (expired after {SUBSCRIPTION_IDLE_S:g}s "
                                              "without a poll, or the agent restarted): follow again")
            # Never waits: this runs on the agent's one worker, which CNI requests need too.
            items, lost = sub.poll(MAX_PAGE)
            if lost:
                items.insert(0, flows.lost_response(flows.LOST_FLOW_RING, lost, self.node_name, time.time_ns()))
            return {"responses": items, "subscription": sub_id, "node": self.node_name}
        after = p.get("after")
        first = _count(p, "first")
        last = _count(p, "last")
        if first is not None and last is not None:
            raise AgentError(BAD_REQUEST, "first and last exclude each other")
        if first is None and last is None and not p.get("all"):
            last = MAX_PAGE if after is not None else 20
        keep: Callable[[dict[str, Any]], bool] = filters.keep
        if since is not None or until is not None:
            def keep(item: dict[str, Any]) -> bool:
                when = flows.parse_time(str(item.get("time", "")))
                if (since is not None and when < since) or (until is not None and when > until):
                    return False
                return filters.keep(item)
        def read() -> ReadResult:
            return self.ring.read(after=int(after) if after is not None else None, keep=keep, first=first,
                                  last=last)

        answer: dict[str, Any] = {"node": self.node_name}
        if p.get("subscribe"):
            # --follow: what the ring holds now, then a queue of what comes after.
            answer["subscription"], _, result = self.subscribe(keep, read, by_kind=since is None and until is None)
        else:
            result = read()
        responses = list(result.items)
        if result.missed:
            responses.insert(0, flows.lost_response(flows.LOST_FLOW_RING, result.missed, self.node_name,
                                                    time.time_ns()))
        answer.update(responses=responses, cursor=result.cursor)
        return answer

    def subscribe(self, keep: Callable[[dict[str, Any]], bool], read_first: Callable[[], Any] | None = None,
                  by_kind: bool = False) -> tuple[str, Subscription, Any]:
        """A follower's queue of the flows ``keep`` accepts from now on; ``read_first`` (e.g. the
        ring's last N) runs atomically with the subscription; ``by_kind``: ``keep`` ignores time
        (see :class:`Subscription`). (id, subscription, its result)."""
        sub = Subscription(keep, by_kind=by_kind)
        sub_id = uuid.uuid4().hex
        with self._publish_lock:
            first = read_first() if read_first is not None else None
            self._subscriptions[sub_id] = sub
        return sub_id, sub, first

    def unsubscribe(self, sub_id: str) -> None:
        with self._publish_lock:
            self._subscriptions.pop(sub_id, None)

    def status(self) -> dict[str, Any]:
        return {
            "event_level": self.settings.event_level,
            "events_ring_bytes": self.datapath.events_ring_size(),
            "events": self.events,
            "ring": {"capacity": self.ring.capacity, "stored": len(self.ring), "total": self.ring.total},
            # Lost events per source, as Hubble names them.
            "lost": {flows.LOST_KERNEL_RING: self.kernel_lost_total,
                     flows.LOST_AGENT_QUEUE: self.unreadable + self.injected_lost},
            "log": None if self.flow_log is None else {
                "path": str(self.flow_log.settings.path), "written": self.flow_log.written,
                "rotations": self.flow_log.rotations},
        }


def _count(p: dict[str, Any], name: str) -> int | None:
    value = p.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or value < 0:
        raise AgentError(BAD_REQUEST, f"{name} must be a non-negative integer")
    return value
