"""The node in its cluster: the agent's side of the cluster store.

What this node tells the others (under a lease its heartbeat keeps alive): its node record
(underlay addresses, pod CIDRs), its endpoints (address -> identity) and its references to the
cluster identities its endpoints use; cluster identities themselves are numbered by the store,
so every node gives a label set the same number. What it learns from them (a watch of the whole
cluster, resynced from a snapshot after any store trouble): other nodes (-> weft_tunnel, and in
direct mode the routes to their pod prefixes), other nodes' endpoints and identities (-> the
ipcache and the policy's identities), and the cluster's policies.

Threads: the heartbeat and the watch run on threads of their own and only read the store;
everything that changes the node (its state, its maps, its routes) is handed to the agent's
datapath worker, the node's single writer (``run_on_worker``).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from weft.agent.config import ClusterSettings, NodeConfig, pick_underlay
from weft.agent.errors import TRY_AGAIN_LATER, AgentError
from weft.identity.allocator import CLUSTER_MAX, CLUSTER_MIN, RESERVED
from weft.policy import Policy
from weft.store.cluster import Endpoints, Identities, Keys, Nodes, Policies
from weft.store.kv import Store, StoreError
from weft.store.records import Endpoint, Node, decode_json
from weft.store.session import ClusterState, Heartbeat
from weft.types.addresses import IPNetwork
from weft.types.labels import Label, LabelSet

log = logging.getLogger("weft.agent.cluster")
RETRY_S = 0.5  # after the store failed a read or a watch


def open_store(settings: ClusterSettings) -> Store:
    if settings.store == "etcd":
        from weft.store.etcd import EtcdStore
        assert settings.store_endpoint is not None
        return EtcdStore(settings.store_endpoint)
    from weft.store.sqlite import SqliteStore
    assert settings.store_path is not None
    settings.store_path.parent.mkdir(parents=True, exist_ok=True)
    return SqliteStore(str(settings.store_path))


@dataclass
class RemoteView:
    """The rest of the cluster as the node applies it (built from a store snapshot)."""

    revision: int
    nodes: dict[str, Node] = field(default_factory=dict)
    endpoints: dict[str, Endpoint] = field(default_factory=dict)
    identities: dict[int, LabelSet] = field(default_factory=dict)
    policies: dict[str, dict[str, Any]] = field(default_factory=dict)


def parse_labels(labels: tuple[str, ...]) -> LabelSet:
    return frozenset(Label.parse(text) for text in labels)


class StoreNumbering:
    """Cluster identities numbered by the store; this node holds one reference per identity
    its endpoints use (released when the last one goes). A release the store cannot take now
    is retried by :meth:`retry`."""

    def __init__(self, identities: Identities, node: str, lease: Callable[[], int]) -> None:
        self.identities, self.node, self.lease = identities, node, lease
        self.pending_releases: set[int] = set()

    def allocate(self, labels: LabelSet) -> int:
        try:
            ident = self.identities.allocate(labels, self.node, self.lease())
        except StoreError as exc:
            raise AgentError(TRY_AGAIN_LATER, f"cluster store: no identity for {sorted(map(str, labels))} now: "
                             f"{exc}") from exc
        self.pending_releases.discard(ident)
        return ident

    def release(self, ident: int) -> None:
        try:
            self.identities.release(ident, self.node)
            self.pending_releases.discard(ident)
        except StoreError as exc:
            log.warning("cluster store: identity %d not released now (%s); retrying later", ident, exc)
            self.pending_releases.add(ident)

    def retry(self, held: set[int]) -> None:
        for ident in sorted(self.pending_releases - held):
            self.release(ident)
        self.pending_releases &= set(self.pending_releases - held)


class ClusterSync:
    """Joins the node to the cluster store and keeps the node in step with it."""

    def __init__(self, config: NodeConfig, settings: ClusterSettings, store: Store,
                 run_on_worker: Callable[[Callable[[], object]], object]) -> None:
        self.config, self.settings, self.store = config, settings, store
        self.node = config.node_name
        self.run_on_worker = run_on_worker
        self.nodes, self.endpoints = Nodes(store), Endpoints(store)
        self.identities, self.policies = Identities(store), Policies(store)
        self.numbering = StoreNumbering(self.identities, self.node, lambda: self.lease)
        self.heartbeat = Heartbeat(store, settings.lease_ttl_s, self._on_lease)
        self.lease = 0
        self.connected = False
        self.last_error = ""
        self.applied_revision = 0
        self.resyncs = 0
        self.bad_records: list[str] = []  # store records that did not decode (skipped)
        self.keys = Keys()
        self._started = False
        self._republish = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="weft-cluster-watch")
        # Set by the agent: (re)publish the node's own keys; apply what the others say.
        self.on_lease: Callable[[int], None] = lambda lease: None
        self.on_resync: Callable[[], object] = lambda: None
        self.apply: Callable[[RemoteView], None] = lambda view: None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        # The lease stays: an agent restarting within its TTL changes nothing for other nodes.
        self.heartbeat.stop(revoke=False)
        self.store.close()

    def _on_lease(self, lease: int) -> None:
        """A new lease (the first, or after the old one expired): the node's keys again."""
        self.lease = lease
        try:
            self.run_on_worker(lambda: self.on_lease(lease))
            self._republish = False
        except Exception as exc:
            # Retried with the next resync of the watch (the heartbeat thread must live on).
            log.warning("cluster store: the node's keys not published now: %s", exc)
            self._republish = True

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if not self._started:
                    self.heartbeat.start()  # grants the first lease, publishes, then renews
                    self._started = True
                if self._republish:
                    self._on_lease(self.lease)
                self._follow()
            except (StoreError, OSError) as exc:
                self.connected = False
                self.last_error = str(exc)
                log.warning("cluster store: %s (resyncing in %.1f s)", exc, RETRY_S)
            except Exception as exc:  # a bug must not end the node's view of the cluster
                self.connected = False
                self.last_error = str(exc)
                log.exception("cluster sync failed (resyncing in %.1f s)", RETRY_S)
            self._stop.wait(RETRY_S)

    def _follow(self) -> None:
        """A snapshot, applied whole, then the watch from the revision after it; any trouble
        ends here and the caller starts over with a new snapshot (what changed meanwhile is
        in it)."""
        state = self._snapshot()
        self.resyncs += 1
        self._apply(state)
        # What the node published while the store was away may be missing there.
        self.run_on_worker(self.on_resync)
        watcher = self.store.watch(self.keys.root, state.revision + 1)
        self.connected, self.last_error = True, ""
        try:
            # etcd's watcher reconnects by itself and resumes where it stopped; it says whether
            # it is connected now.
            link = getattr(watcher, "connected", None)
            while not self._stop.is_set():
                events = watcher.get(0.5)
                if isinstance(link, threading.Event):
                    was, self.connected = self.connected, link.is_set()
                    if self.connected and not was:
                        # Back after an outage: make up for what the store missed meanwhile.
                        self.run_on_worker(self.on_resync)
                if not events:
                    continue
                # A batch of changes: re-read them as one consistent snapshot is simplest and
                # cheap at lab scale; the events only say that something changed.
                state = self._snapshot()
                self._apply(state)
        finally:
            watcher.close()

    def _snapshot(self) -> ClusterState:
        """The store's state at one revision; a record that does not decode (written by
        something else, or corrupt) is left out and named in the status, never applied."""
        kvs, rev = self.store.list_prefix(self.keys.root)
        state = ClusterState(rev)
        bad: list[str] = []
        for kv in kvs:
            name = kv.key.rsplit("/", 1)[1]
            try:
                if kv.key.startswith(self.keys.nodes):
                    state.nodes[name] = Node.decode(kv.key, kv.value)
                elif kv.key.startswith(self.keys.endpoints):
                    state.endpoints[name] = Endpoint.decode(kv.key, kv.value)
                elif kv.key.startswith(self.keys.ids):
                    labels = json.loads(kv.value)
                    if not isinstance(labels, list) or not labels:
                        raise StoreError(f"store key {kv.key!r}: expected a JSON list of labels")
                    state.identities[int(name)] = tuple(str(x) for x in labels)
                elif kv.key.startswith(self.keys.policies):
                    state.policies[name] = decode_json(kv.key, kv.value)
            except (StoreError, ValueError) as exc:
                bad.append(f"{kv.key}: {exc}")
        if bad != self.bad_records:
            for problem in bad:
                log.error("cluster store: record skipped: %s", problem)
        self.bad_records = bad
        return state

    def _apply(self, state: ClusterState) -> None:
        view = RemoteView(state.revision, dict(state.nodes), dict(state.endpoints),
                          {ident: parse_labels(labels) for ident, labels in state.identities.items()},
                          dict(state.policies))
        self.run_on_worker(lambda: self.apply(view))
        self.applied_revision = state.revision

    # ------------------------------------------------------------------ what the node publishes
    def register_node(self, pod_cidrs: list[str], lease: int, if_changed: bool = False) -> None:
        """The node's record under ``lease``; ``if_changed``: only when the store's differs (a
        write wakes every node's watch)."""
        node = Node(self.node, tuple(self.settings.addresses), tuple(pod_cidrs))
        if if_changed and self.nodes.get(self.node) == node:
            return
        self.nodes.register(node, lease)

    def publish_endpoint(self, ip: str, identity: int, namespace: str, pod: str) -> None:
        try:
            self.endpoints.publish(Endpoint(ip, identity, self.node, namespace, pod), self.lease)
        except StoreError as exc:
            # The next lease (or resync) republishes every endpoint of the node.
            log.warning("cluster store: endpoint %s not published now: %s", ip, exc)

    def withdraw_endpoint(self, ip: str) -> None:
        try:
            current = self.endpoints.get(ip)
            if current is not None and current.node == self.node:
                self.endpoints.withdraw(ip)
        except StoreError as exc:
            log.warning("cluster store: endpoint %s not withdrawn now: %s", ip, exc)

    def published_endpoints(self) -> dict[str, Endpoint]:
        eps, _ = self.endpoints.list(self.node)
        return {ep.ip: ep for ep in eps}

    def put_policies(self, policies: list[Policy], delete: bool) -> int:
        """A policy change made on this node, into the store first (before it is applied
        here); returns the store's revision after it."""
        from weft.agent.policy import store_name
        try:
            for pol in policies:
                name = store_name(pol.key)
                if delete:
                    self.policies.delete(name)
                elif self.policies.get(name) != pol.to_dict():
                    self.policies.put(name, pol.to_dict())
            return self.store.revision()
        except StoreError as exc:
            raise AgentError(TRY_AGAIN_LATER, f"cluster store: policy change not stored: {exc}") from exc

    def collect_garbage(self) -> list[int]:
        freed = self.identities.collect_garbage()
        if freed:
            log.info("cluster identities no node uses any more, freed: %s", freed)
        return freed

    def status(self) -> dict[str, Any]:
        return {"store": self.settings.store, "mode": self.settings.mode, "connected": self.connected,
                "lease": self.lease, "revision": self.applied_revision, "resyncs": self.resyncs,
                "error": self.last_error, "lease_renewals": self.heartbeat.renewals,
                "bad_records": list(self.bad_records)}


# ---------------------------------------------------------------------- view -> node state
def remote_ipcache(view: RemoteView, node: str) -> dict[IPNetwork, int]:
    """Other nodes' pods -> their identities, other nodes' addresses -> remote-node."""
    out: dict[IPNetwork, int] = {}
    for other in view.nodes.values():
        if other.name == node:
            continue
        for addr in other.addresses:
            out[ipaddress.ip_network(addr)] = RESERVED["remote-node"]
    for ep in view.endpoints.values():
        if ep.node != node and CLUSTER_MIN <= ep.identity <= CLUSTER_MAX:
            out[ipaddress.ip_network(ep.ip)] = ep.identity
    return out


def tunnel_routes(view: RemoteView, node: str, families: tuple[int, ...]) -> dict[str, str]:
    """Overlay: other nodes' pod prefixes -> the node's tunnel address (IPv4 when the cluster
    runs IPv4, else IPv6)."""
    return _prefix_routes(view, node, lambda cidr: families)


def direct_routes(view: RemoteView, node: str) -> dict[str, str]:
    """Direct routing: other nodes' pod prefixes -> the node's address of the prefix's family."""
    return _prefix_routes(view, node, lambda cidr: (ipaddress.ip_network(cidr).version,))


def _prefix_routes(view: RemoteView, node: str, families: Callable[[str], tuple[int, ...]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for other in view.nodes.values():
        if other.name == node:
            continue
        for cidr in other.pod_cidrs:
            try:
                out[cidr] = pick_underlay(other.addresses, families(cidr))
            except ValueError as exc:
                log.warning("node %s: pod prefix %s unreachable: %s", other.name, cidr, exc)
    return out
