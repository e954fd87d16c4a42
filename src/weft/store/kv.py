"""The store interface: a revisioned key-value store with transactions, leases and watch (etcd v3 semantics).

Every write bumps one store-wide revision; a key remembers the revision that created it and the one
that last changed it. Watches deliver every change after a start revision in order; when that history
has been compacted away the watch raises ``WatchCompacted`` and the caller must list again (resync).
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass


class StoreError(Exception):
    """A store operation failed for a reason the caller should see (bad key, engine error)."""


class StoreUnavailable(StoreError):
    """The engine cannot be reached (etcd down); retry later, state is unchanged as far as we know."""


class LeaseNotFound(StoreError):
    """The lease expired or was revoked: its keys are gone and the holder must register again."""


class WatchCompacted(StoreError):
    """The events the watch needed were compacted away: list the prefix again and watch from there."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"watch history compacted up to revision {compact_revision}: resync needed")
        self.compact_revision = compact_revision


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int = 0


class EventType(enum.Enum):
    PUT = "PUT"
    DELETE = "DELETE"


@dataclass(frozen=True, slots=True)
class Event:
    type: EventType
    key: str
    value: bytes  # empty for DELETE
    revision: int  # the revision of the change (mod revision of the put, revision of the delete)


@dataclass(frozen=True, slots=True)
class Compare:
    """A transaction guard. ``prefix=True`` makes it hold for every key under ``key`` (vacuously for none).

    Exactly one of ``create_revision``, ``mod_revision``, ``value`` is set; equality is the only test,
    which is all create-only and compare-and-swap need. ``create_revision=0`` means "absent".
    """

    key: str
    create_revision: int | None = None
    mod_revision: int | None = None
    value: bytes | None = None
    prefix: bool = False

    def __post_init__(self) -> None:
        set_fields = [f for f in (self.create_revision, self.mod_revision, self.value) if f is not None]
        if len(set_fields) != 1:
            raise ValueError(f"Compare on {self.key!r}: set exactly one of create_revision, mod_revision, value")
        check_key(self.key)

    @classmethod
    def absent(cls, key: str, prefix: bool = False) -> Compare:
        return cls(key, create_revision=0, prefix=prefix)


@dataclass(frozen=True, slots=True)
class Put:
    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Delete:
    key: str
    prefix: bool = False


@dataclass(frozen=True, slots=True)
class TxnResult:
    succeeded: bool
    revision: int


def check_key(key: str) -> None:
    if not isinstance(key, str) or not key:
        raise ValueError(f"store key must be a non-empty string, got {key!r}")
    if "\x00" in key:
        raise ValueError(f"store key {key!r} contains a NUL byte")


def prefix_end(prefix: str) -> str:
    """The first key after every key that starts with ``prefix`` (etcd's range_end for a prefix)."""
    check_key(prefix)
    raw = prefix.encode()
    for i in range(len(raw) - 1, -1, -1):
        if raw[i] < 0xFF:
            return (raw[:i] + bytes([raw[i] + 1])).decode("utf-8", errors="surrogateescape")
    return "\x00"  # etcd's "to the end of the keyspace"


class Watcher(ABC):
    """Changes under a prefix after a start revision, in revision order, none lost or repeated."""

    @abstractmethod
    def get(self, timeout: float) -> list[Event]:
        """The next batch of events, or [] after ``timeout`` seconds. Raises ``WatchCompacted``."""

    @property
    @abstractmethod
    def next_revision(self) -> int:
        """The revision the watch would resume from (the last delivered event's revision + 1)."""

    @abstractmethod
    def close(self) -> None: ...


class Store(ABC):
    """A revisioned key-value store. Keys are strings ('/'-separated by convention), values bytes."""

    @abstractmethod
    def get(self, key: str) -> KeyValue | None: ...

    @abstractmethod
    def list_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        """Every key under ``prefix`` in key order, and the revision they were read at (watch from it + 1)."""

    @abstractmethod
    def put(self, key: str, value: bytes, lease: int = 0) -> int:
        """Write ``key``; returns the new revision. ``lease`` ties the key's life to that lease."""

    @abstractmethod
    def delete(self, key: str, prefix: bool = False) -> int:
        """Delete ``key`` (or every key under it); returns how many keys went."""

    @abstractmethod
    def txn(self, compares: list[Compare], success: list[Put | Delete], failure: list[Put | Delete] | None = None
            ) -> TxnResult:
        """If every compare holds apply ``success`` else ``failure``, atomically, at one revision."""

    def create(self, key: str, value: bytes, lease: int = 0) -> bool:
        """Create-only put: False (and nothing written) if the key exists."""
        return self.txn([Compare.absent(key)], [Put(key, value, lease)]).succeeded

    def cas(self, key: str, value: bytes, mod_revision: int, lease: int = 0) -> bool:
        """Put only if the key was last changed at ``mod_revision``."""
        return self.txn([Compare(key, mod_revision=mod_revision)], [Put(key, value, lease)]).succeeded

    @abstractmethod
    def grant_lease(self, ttl: float) -> int:
        """A new lease id; keys put with it are deleted when it is not kept alive for ``ttl`` seconds."""

    @abstractmethod
    def keepalive(self, lease: int) -> None:
        """Renew ``lease`` for another TTL. Raises ``LeaseNotFound`` if it already expired."""

    @abstractmethod
    def revoke_lease(self, lease: int) -> None:
        """End ``lease`` now, deleting its keys. Unknown leases are ignored."""

    @abstractmethod
    def watch(self, prefix: str, start_revision: int = 0) -> Watcher:
        """Watch keys under ``prefix`` from ``start_revision`` (0: changes after now)."""

    @abstractmethod
    def revision(self) -> int: ...

    @abstractmethod
    def compact(self, revision: int) -> None:
        """Forget history before ``revision`` (watches from earlier get ``WatchCompacted``)."""

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
