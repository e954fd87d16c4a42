"""The cluster store: one revisioned key-value interface with watch and leases, two engines, typed layers.

Owns: the ``Store`` interface (``kv``), the embedded SQLite engine (``sqlite``), the etcd v3 engine over
etcd's JSON gRPC gateway (``etcd``), a helper that runs a real etcd server (``etcdserver``), and the typed
layers agents use: nodes, endpoints, cluster-wide identity allocation with per-node references and
garbage collection, policies (``nodes``, ``endpoints``, ``identities``, ``policies``).
May import: ``weft.types``, ``weft.identity`` (numbering), the standard library and httpx. Never the agent
or the datapath: the agent wires the store in.
"""

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
)

__all__ = [
    "Compare",
    "Delete",
    "Event",
    "EventType",
    "KeyValue",
    "LeaseNotFound",
    "Put",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "TxnResult",
    "WatchCompacted",
    "Watcher",
]
