"""The distributed engine: etcd v3 through its JSON gRPC gateway (``/v3/...`` over HTTP, httpx).

The gateway is part of every etcd v3 server, so no generated stubs are needed: unary calls are POSTs of
the proto messages as JSON (bytes base64, int64 as strings), a watch is one long streaming POST whose
response is a sequence of JSON WatchResponses. A watcher runs one thread that reads that stream into a
queue and, when the connection drops (etcd restarted, network), reconnects from the revision after the
last event it delivered, so nothing is lost or repeated; if etcd compacted that history meanwhile the
watcher raises ``WatchCompacted`` and the caller resyncs.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import queue
import socket
import threading
from typing import Any

import httpx

from weft.store.kv import (
    Compare,
    Delete,
    Event,
    EventType,
    KeyValue,
    LeaseNotFound,
    Put,
    Store,
    StoreError,
    StoreUnavailable,
    TxnResult,
    WatchCompacted,
    Watcher,
    check_key,
    prefix_end,
)

GRPC_NOT_FOUND = 5
GRPC_OUT_OF_RANGE = 11


def _b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw).decode()


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def _kv(raw: dict[str, Any]) -> KeyValue:
    return KeyValue(_unb64(raw.get("key")).decode(), _unb64(raw.get("value")), int(raw.get("create_revision", 0)),
                    int(raw.get("mod_revision", 0)), int(raw.get("lease", 0)))


def _op(op: Put | Delete) -> dict[str, Any]:
    check_key(op.key)
    if isinstance(op, Put):
        if not isinstance(op.value, bytes):
            raise ValueError(f"value for {op.key!r} must be bytes, got {type(op.value).__name__}")
        return {"request_put": {"key": _b64(op.key), "value": _b64(op.value), "lease": str(op.lease)}}
    body = {"key": _b64(op.key)}
    if op.prefix:
        body["range_end"] = _b64(prefix_end(op.key))
    return {"request_delete_range": body}


def _compare(c: Compare) -> dict[str, Any]:
    body: dict[str, Any] = {"key": _b64(c.key), "result": "EQUAL"}
    if c.prefix:
        body["range_end"] = _b64(prefix_end(c.key))
    if c.create_revision is not None:
        body.update(target="CREATE", create_revision=str(c.create_revision))
    elif c.mod_revision is not None:
        body.update(target="MOD", mod_revision=str(c.mod_revision))
    else:
        body.update(target="VALUE", value=_b64(c.value or b""))
    return body


class EtcdStore(Store):
    def __init__(self, endpoint: str, timeout: float = 5.0) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.timeout = timeout
        self._client = httpx.Client(base_url=self.endpoint, timeout=timeout)
        self._watchers: list[EtcdWatcher] = []

    def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            resp = self._client.post(path, json=body)
        except httpx.TransportError as e:
            raise StoreUnavailable(f"etcd at {self.endpoint} unreachable ({path}): {e}") from e
        try:
            data: dict[str, Any] = resp.json() if resp.content else {}
        except ValueError:
            # not the gateway speaking (a proxy, or etcd mid-start): report the status and body as they are
            data = {"error": resp.text[:200]}
        if resp.status_code != 200:
            code = int(data.get("code", 0))
            message = data.get("error") or data.get("message") or resp.text
            if code == GRPC_NOT_FOUND and "lease" in str(message):
                raise LeaseNotFound(f"etcd {path}: {message}")
            if code in (14, 4):  # UNAVAILABLE, DEADLINE_EXCEEDED: leader election after a restart
                raise StoreUnavailable(f"etcd {path}: {message}")
            raise StoreError(f"etcd {path} failed (HTTP {resp.status_code}): {message}")
        return data

    def get(self, key: str) -> KeyValue | None:
        check_key(key)
        kvs = self._call("/v3/kv/range", {"key": _b64(key)}).get("kvs", [])
        return _kv(kvs[0]) if kvs else None

    def list_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        check_key(prefix)
        data = self._call("/v3/kv/range", {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix))})
        return [_kv(raw) for raw in data.get("kvs", [])], int(data["header"]["revision"])

    def put(self, key: str, value: bytes, lease: int = 0) -> int:
        return self.txn([], [Put(key, value, lease)]).revision

    def delete(self, key: str, prefix: bool = False) -> int:
        body = _op(Delete(key, prefix))["request_delete_range"]
        return int(self._call("/v3/kv/deleterange", body).get("deleted", 0))

    def txn(self, compares: list[Compare], success: list[Put | Delete], failure: list[Put | Delete] | None = None
            ) -> TxnResult:
        body = {"compare": [_compare(c) for c in compares], "success": [_op(op) for op in success],
                "failure": [_op(op) for op in failure or []]}
        data = self._call("/v3/kv/txn", body)
        return TxnResult(bool(data.get("succeeded", False)), int(data["header"]["revision"]))

    def grant_lease(self, ttl: float) -> int:
        if ttl <= 0:
            raise ValueError(f"lease TTL must be positive, got {ttl}")
        # etcd counts TTLs in whole seconds (and raises very short ones to its minimum)
        return int(self._call("/v3/lease/grant", {"TTL": str(math.ceil(ttl))})["ID"])

    def keepalive(self, lease: int) -> None:
        data = self._call("/v3/lease/keepalive", {"ID": str(lease)})
        result = data.get("result", data)
        if int(result.get("TTL", 0)) <= 0:
            raise LeaseNotFound(f"lease {lease} not found (expired or revoked)")

    def revoke_lease(self, lease: int) -> None:
        with contextlib.suppress(LeaseNotFound):
            self._call("/v3/lease/revoke", {"ID": str(lease)})

    def watch(self, prefix: str, start_revision: int = 0) -> Watcher:
        check_key(prefix)
        # "from now" is pinned here, not when the stream gets going, so writes after this call are seen
        watcher = EtcdWatcher(self.endpoint, prefix, start_revision or self.revision() + 1)
        self._watchers.append(watcher)
        return watcher

    def revision(self) -> int:
        # a range over one key that never exists: the header carries the current revision
        return int(self._call("/v3/kv/range", {"key": _b64("\x00weft-revision")})["header"]["revision"])

    def compact(self, revision: int) -> None:
        self._call("/v3/kv/compaction", {"revision": str(revision), "physical": True})

    def close(self) -> None:
        for watcher in self._watchers:
            watcher.close()
        self._client.close()


class _StreamError(Exception):
    """The watch stream broke in a way worth a reconnect (an error message, a non-200 answer)."""


class EtcdWatcher(Watcher):
    # the stream is re-opened after this long without a byte, so a silently dead connection is noticed
    READ_TIMEOUT = 2.0
    RECONNECT_DELAY = 0.1  # between attempts while etcd is down; small, the caller waits on a deadline

    def __init__(self, endpoint: str, prefix: str, start_revision: int) -> None:
        self._endpoint = endpoint
        self._prefix = prefix
        if start_revision <= 0:
            raise ValueError(f"etcd watch of {prefix!r}: start revision must be positive, got {start_revision}")
        self._next = start_revision  # the caller's view: after the last event get() returned
        self._resume = start_revision  # the reader thread's: after the last event it queued
        self._sock_lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._queue: queue.Queue[list[Event] | WatchCompacted] = queue.Queue()
        self._closed = threading.Event()
        self.reconnects = 0  # streams lost to errors (etcd restarted, connection reset), not idle re-opens
        self.connected = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"weft-etcd-watch-{prefix}")
        self._thread.start()

    @property
    def next_revision(self) -> int:
        return self._next

    def get(self, timeout: float) -> list[Event]:
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return []
        if isinstance(item, WatchCompacted):
            self._queue.put(item)  # stays broken until the caller resyncs with a new watch
            raise item
        if item:
            self._next = item[-1].revision + 1
        return item

    def close(self) -> None:
        self._closed.set()
        # wake the reader blocked in recv: shut its socket down (httpx's "network_stream" extension)
        with self._sock_lock:
            if self._sock is not None:
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=self.READ_TIMEOUT + 1)

    def _run(self) -> None:
        timeout = httpx.Timeout(5.0, read=self.READ_TIMEOUT)
        with httpx.Client(base_url=self._endpoint, timeout=timeout) as client:
            while not self._closed.is_set():
                try:
                    if not self._stream(client):
                        return
                    # the server ended the stream (shutting down): reconnect like after an error
                except httpx.ReadTimeout:
                    continue  # idle: re-open from the same revision (and notice a close request)
                except (httpx.TransportError, json.JSONDecodeError, _StreamError):
                    pass
                self.connected.clear()
                self.reconnects += 1
                if self._closed.wait(self.RECONNECT_DELAY):
                    return

    def _stream(self, client: httpx.Client) -> bool:
        """Read one watch stream into the queue; False when the watch is over (closed, compacted).

        ``self._resume`` (the revision after the last queued event) is updated as events are queued, so a
        stream that breaks midway is re-opened exactly where it stopped.
        """
        create: dict[str, Any] = {"key": _b64(self._prefix), "range_end": _b64(prefix_end(self._prefix)),
                                  "start_revision": str(self._resume), "progress_notify": True}
        with client.stream("POST", "/v3/watch", json={"create_request": create}) as resp:
            if resp.status_code != 200:
                raise _StreamError(f"watch: HTTP {resp.status_code}")
            stream = resp.extensions.get("network_stream")
            with self._sock_lock:
                self._sock = stream.get_extra_info("socket") if stream is not None else None
                if self._closed.is_set():
                    return False
            for line in resp.iter_lines():
                if self._closed.is_set():
                    return False
                if not line.strip():
                    continue
                msg = json.loads(line)
                if "error" in msg:
                    raise _StreamError(f"watch: {msg['error']}")  # e.g. no leader yet after a restart
                result: dict[str, Any] = msg.get("result", {})
                compact = int(result.get("compact_revision", 0))
                if compact:
                    self._queue.put(WatchCompacted(compact))
                    return False
                if result.get("created"):
                    self.connected.set()
                events = [self._event(raw) for raw in result.get("events", [])]
                if events:
                    self._resume = events[-1].revision + 1
                    self._queue.put(events)
        return True

    @staticmethod
    def _event(raw: dict[str, Any]) -> Event:
        kv = raw.get("kv", {})
        kind = EventType.DELETE if raw.get("type") == "DELETE" else EventType.PUT
        return Event(kind, _unb64(kv.get("key")).decode(), _unb64(kv.get("value")), int(kv.get("mod_revision", 0)))
