"""What an agent needs around the typed layers: a lease kept alive from a thread (its heartbeat), and a
consistent snapshot of the whole cluster state to resync from after a reconnect or a compacted watch.

The resync recipe: ``state = snapshot(store)``; apply it (replace, not merge: whatever is absent was
deleted while we were away); then ``store.watch(keys.root, state.revision + 1)``. On ``WatchCompacted``
or a new lease from the heartbeat, do it again.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from weft.store.cluster import Keys
from weft.store.kv import LeaseNotFound, Store, StoreError
from weft.store.records import Endpoint, Node, decode_json

log = logging.getLogger(__name__)


@dataclass
class ClusterState:
    revision: int
    nodes: dict[str, Node] = field(default_factory=dict)
    endpoints: dict[str, Endpoint] = field(default_factory=dict)
    identities: dict[int, tuple[str, ...]] = field(default_factory=dict)
    policies: dict[str, dict[str, Any]] = field(default_factory=dict)


def snapshot(store: Store, keys: Keys | None = None) -> ClusterState:
    """Everything under the root, read at one revision (one range read), decoded."""
    keys = keys or Keys()
    kvs, rev = store.list_prefix(keys.root)
    state = ClusterState(rev)
    for kv in kvs:
        name = kv.key.rsplit("/", 1)[1]
        if kv.key.startswith(keys.nodes):
            state.nodes[name] = Node.decode(kv.key, kv.value)
        elif kv.key.startswith(keys.endpoints):
            state.endpoints[name] = Endpoint.decode(kv.key, kv.value)
        elif kv.key.startswith(keys.ids):
            labels = json.loads(kv.value)
            if not isinstance(labels, list):
                raise StoreError(f"store key {kv.key!r}: expected a JSON list of labels")
            state.identities[int(name)] = tuple(str(x) for x in labels)
        elif kv.key.startswith(keys.policies):
            state.policies[name] = decode_json(kv.key, kv.value)
    return state


class Heartbeat:
    """Holds a lease for this node: renews it every ``ttl / 3`` seconds from a thread.

    ``on_lease(lease)`` runs with the first lease and again with a fresh one whenever the old one was
    lost (the store was unreachable for longer than the TTL, so the node's keys are gone): the agent
    republishes its node, endpoints and identity references there. Store outages are retried.
    """

    def __init__(self, store: Store, ttl: float, on_lease: Callable[[int], None]) -> None:
        if ttl <= 0:
            raise ValueError(f"heartbeat TTL must be positive, got {ttl}")
        self.store, self.ttl, self.on_lease = store, ttl, on_lease
        self.lease = 0
        self.renewals = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="weft-store-heartbeat")

    def start(self) -> int:
        """Grant the first lease and run ``on_lease`` in the caller's thread (errors surface here)."""
        self.lease = self.store.grant_lease(self.ttl)
        self.on_lease(self.lease)
        self._thread.start()
        return self.lease

    def _run(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                try:
                    self.store.keepalive(self.lease)
                    self.renewals += 1
                except LeaseNotFound:
                    log.warning("store lease %d lost: registering again", self.lease)
                    self.lease = self.store.grant_lease(self.ttl)
                    self.on_lease(self.lease)
            except StoreError as e:
                log.warning("store heartbeat: %s (retrying)", e)

    def stop(self, revoke: bool = True) -> None:
        """Stop renewing; ``revoke`` deletes the node's leased keys now (a clean leave)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        if revoke and self.lease:
            self.store.revoke_lease(self.lease)
