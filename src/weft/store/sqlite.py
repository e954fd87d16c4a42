"""The embedded engine: one SQLite file (WAL) shared by every process on a machine.

Each write transaction takes SQLite's write lock (BEGIN IMMEDIATE), bumps the revision in ``meta`` and
appends its changes to ``events``; watchers poll ``events`` for rows after their revision on their own
connection. Leases carry a wall-clock deadline (several processes share them); a sweeper thread in every
process holding the store deletes expired leases and their keys, so a dead process's keys vanish as
long as any process holds the store. History is trimmed to the last ``history`` revisions.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable

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
    TxnResult,
    WatchCompacted,
    Watcher,
    check_key,
    prefix_end,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB NOT NULL, create_rev INTEGER NOT NULL,
                               mod_rev INTEGER NOT NULL, lease INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS kv_lease ON kv (lease);
CREATE TABLE IF NOT EXISTS events (rev INTEGER NOT NULL, seq INTEGER NOT NULL, key TEXT NOT NULL,
                                   type TEXT NOT NULL, value BLOB NOT NULL, PRIMARY KEY (rev, seq));
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS leases (id INTEGER PRIMARY KEY AUTOINCREMENT, ttl REAL NOT NULL, expires REAL NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('revision', 1), ('compact', 0);
"""


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def _range_clause(key: str, prefix: bool) -> tuple[str, tuple[str, ...]]:
    if prefix:
        return "key >= ? AND key < ?", (key, prefix_end(key))
    return "key = ?", (key,)


class SqliteStore(Store):
    def __init__(self, path: str, sweep_interval: float = 0.1, history: int = 100_000,
                 poll_interval: float = 0.02) -> None:
        self.path = path
        self.poll_interval = poll_interval
        self.history = history
        self._lock = threading.Lock()
        self._conn = _connect(path)
        with self._lock:
            self._conn.executescript("BEGIN IMMEDIATE;" + SCHEMA + "COMMIT;")
        self._closed = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep_loop, args=(sweep_interval,), daemon=True,
                                         name="weft-store-sweeper")
        self._sweeper.start()

    # -- reads

    def get(self, key: str) -> KeyValue | None:
        check_key(key)
        with self._lock:
            row = self._conn.execute("SELECT key, value, create_rev, mod_rev, lease FROM kv WHERE key = ?",
                                     (key,)).fetchone()
        return KeyValue(row[0], bytes(row[1]), row[2], row[3], row[4]) if row else None

    def list_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        clause, args = _range_clause(prefix, True)
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                rows = self._conn.execute(
                    f"SELECT key, value, create_rev, mod_rev, lease FROM kv WHERE {clause} ORDER BY key", args
                ).fetchall()
                rev = self._revision_locked()
            finally:
                self._conn.execute("COMMIT")
        return [KeyValue(r[0], bytes(r[1]), r[2], r[3], r[4]) for r in rows], rev

    def revision(self) -> int:
        with self._lock:
            return self._revision_locked()

    def _revision_locked(self) -> int:
        return int(self._conn.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()[0])

    # -- writes

    def put(self, key: str, value: bytes, lease: int = 0) -> int:
        return self.txn([], [Put(key, value, lease)]).revision

    def delete(self, key: str, prefix: bool = False) -> int:
        check_key(key)
        with self._lock, self._write() as cur:
            return self._apply_delete(cur, Delete(key, prefix))

    def txn(self, compares: list[Compare], success: list[Put | Delete], failure: list[Put | Delete] | None = None
            ) -> TxnResult:
        for op in [*success, *(failure or [])]:
            check_key(op.key)
            if isinstance(op, Put) and not isinstance(op.value, bytes):
                raise ValueError(f"value for {op.key!r} must be bytes, got {type(op.value).__name__}")
        with self._lock, self._write() as cur:
            ok = all(self._holds(cur, c) for c in compares)
            ops = success if ok else (failure or [])
            for op in ops:
                if isinstance(op, Put):
                    self._apply_put(cur, op)
                else:
                    self._apply_delete(cur, op)
            return TxnResult(ok, cur.revision)

    def _write(self) -> _WriteTxn:
        if self._closed.is_set():
            raise StoreError(f"store {self.path} is closed")
        return _WriteTxn(self._conn)

    def _holds(self, cur: _WriteTxn, c: Compare) -> bool:
        clause, args = _range_clause(c.key, c.prefix)
        rows = cur.conn.execute(f"SELECT value, create_rev, mod_rev FROM kv WHERE {clause}", args).fetchall()
        if not rows:
            # etcd compares a missing key as an empty one: revisions 0, and no value to match
            return c.value is None and (c.create_revision == 0 if c.create_revision is not None
                                        else c.mod_revision == 0)
        for value, create_rev, mod_rev in rows:
            if c.value is not None and bytes(value) != c.value:
                return False
            if c.create_revision is not None and create_rev != c.create_revision:
                return False
            if c.mod_revision is not None and mod_rev != c.mod_revision:
                return False
        return True

    def _apply_put(self, cur: _WriteTxn, op: Put) -> None:
        if op.lease and cur.conn.execute("SELECT 1 FROM leases WHERE id = ?", (op.lease,)).fetchone() is None:
            raise LeaseNotFound(f"put {op.key!r}: lease {op.lease} not found (expired or revoked)")
        rev = cur.bump()
        old = cur.conn.execute("SELECT create_rev FROM kv WHERE key = ?", (op.key,)).fetchone()
        create_rev = old[0] if old else rev
        cur.conn.execute("INSERT OR REPLACE INTO kv VALUES (?, ?, ?, ?, ?)", (op.key, op.value, create_rev, rev,
                                                                             op.lease))
        cur.event(op.key, EventType.PUT, op.value)

    def _apply_delete(self, cur: _WriteTxn, op: Delete) -> int:
        clause, args = _range_clause(op.key, op.prefix)
        keys = [r[0] for r in cur.conn.execute(f"SELECT key FROM kv WHERE {clause} ORDER BY key", args)]
        return self._delete_keys(cur, keys)

    def _delete_keys(self, cur: _WriteTxn, keys: Iterable[str]) -> int:
        n = 0
        for key in keys:
            cur.bump()
            cur.conn.execute("DELETE FROM kv WHERE key = ?", (key,))
            cur.event(key, EventType.DELETE, b"")
            n += 1
        return n

    # -- leases

    def grant_lease(self, ttl: float) -> int:
        if ttl <= 0:
            raise ValueError(f"lease TTL must be positive, got {ttl}")
        with self._lock, self._write() as cur:
            return int(cur.conn.execute("INSERT INTO leases (ttl, expires) VALUES (?, ?)",
                                        (ttl, time.time() + ttl)).lastrowid or 0)

    def keepalive(self, lease: int) -> None:
        self._expire_leases()
        with self._lock, self._write() as cur:
            changed = cur.conn.execute("UPDATE leases SET expires = ? + ttl WHERE id = ?", (time.time(), lease))
            if changed.rowcount == 0:
                raise LeaseNotFound(f"lease {lease} not found (expired or revoked)")

    def revoke_lease(self, lease: int) -> None:
        with self._lock, self._write() as cur:
            self._end_leases(cur, [lease])

    def _end_leases(self, cur: _WriteTxn, leases: list[int]) -> None:
        for lease in leases:
            cur.conn.execute("DELETE FROM leases WHERE id = ?", (lease,))
            keys = [r[0] for r in cur.conn.execute("SELECT key FROM kv WHERE lease = ? ORDER BY key", (lease,))]
            self._delete_keys(cur, keys)

    def _expire_leases(self) -> None:
        with self._lock:
            if self._closed.is_set():
                return
            now = time.time()
            # a read first: the common case (nothing expired) must not take the write lock
            if self._conn.execute("SELECT 1 FROM leases WHERE expires < ? LIMIT 1", (now,)).fetchone() is None:
                return
            with self._write() as cur:
                expired = [r[0] for r in cur.conn.execute("SELECT id FROM leases WHERE expires < ?", (now,))]
                self._end_leases(cur, expired)

    def _sweep_loop(self, interval: float) -> None:
        while not self._closed.wait(interval):
            try:
                self._expire_leases()
                self._trim_history()
            except (sqlite3.Error, StoreError):
                continue  # busy, or closing under us: the next sweep retries (or the loop ends)

    def _trim_history(self) -> None:
        with self._lock:
            if self._closed.is_set():
                return
            rev = self._revision_locked()
            compact = int(self._conn.execute("SELECT value FROM meta WHERE name = 'compact'").fetchone()[0])
        if rev - compact > self.history * 2:
            self.compact(rev - self.history)

    # -- history

    def compact(self, revision: int) -> None:
        with self._lock, self._write() as cur:
            current = int(cur.conn.execute("SELECT value FROM meta WHERE name = 'compact'").fetchone()[0])
            if revision > cur.revision:
                raise StoreError(f"compact to {revision}: beyond the current revision {cur.revision}")
            if revision <= current:
                return
            cur.conn.execute("DELETE FROM events WHERE rev < ?", (revision,))
            cur.conn.execute("UPDATE meta SET value = ? WHERE name = 'compact'", (revision,))

    def watch(self, prefix: str, start_revision: int = 0) -> Watcher:
        check_key(prefix)
        return SqliteWatcher(self, prefix, start_revision or self.revision() + 1)

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._sweeper.join(timeout=5)
        with self._lock:
            self._conn.close()


class _WriteTxn:
    """BEGIN IMMEDIATE .. COMMIT (ROLLBACK on error), with the revision counter of this transaction."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.revision = 0
        self._bumped = False
        self._seq = 0

    def __enter__(self) -> _WriteTxn:
        self.conn.execute("BEGIN IMMEDIATE")
        self.revision = int(self.conn.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()[0])
        return self

    def bump(self) -> int:
        # one revision per transaction, like etcd: every change of a txn shares it
        if not self._bumped:
            self.revision += 1
            self._bumped = True
            self.conn.execute("UPDATE meta SET value = ? WHERE name = 'revision'", (self.revision,))
        return self.revision

    def event(self, key: str, kind: EventType, value: bytes) -> None:
        self.conn.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?)", (self.revision, self._seq, key, kind.value,
                                                                        value))
        self._seq += 1

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.conn.execute("ROLLBACK" if exc_type is not None else "COMMIT")


class SqliteWatcher(Watcher):
    def __init__(self, store: SqliteStore, prefix: str, start_revision: int) -> None:
        self._conn = _connect(store.path)
        self._poll = store.poll_interval
        self._prefix = prefix
        self._end = prefix_end(prefix)
        self._next = start_revision

    @property
    def next_revision(self) -> int:
        return self._next

    def get(self, timeout: float) -> list[Event]:
        deadline = time.monotonic() + timeout
        while True:
            self._conn.execute("BEGIN")
            try:
                compact = int(self._conn.execute("SELECT value FROM meta WHERE name = 'compact'").fetchone()[0])
                if self._next < compact:
                    raise WatchCompacted(compact)
                rows = self._conn.execute(
                    "SELECT rev, key, type, value FROM events WHERE rev >= ? AND key >= ? AND key < ? "
                    "ORDER BY rev, seq", (self._next, self._prefix, self._end)).fetchall()
                head = int(self._conn.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()[0])
            finally:
                self._conn.execute("COMMIT")
            if rows:
                self._next = max(self._next, head + 1)
                return [Event(EventType(t), k, bytes(v), rev) for rev, k, t, v in rows]
            # nothing for us up to head: later polls start after it (history before it is irrelevant)
            self._next = max(self._next, head + 1)
            if time.monotonic() >= deadline:
                return []
            time.sleep(self._poll)

    def close(self) -> None:
        self._conn.close()
