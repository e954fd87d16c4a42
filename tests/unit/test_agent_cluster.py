"""The pure parts of a node's cluster membership: what it derives from the cluster store's view
(tunnel entries, direct routes, ipcache entries), its settings, and identity numbering by the
store through the agent's allocator."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from pydantic import ValidationError

from weft.agent.cluster import RemoteView, StoreNumbering, direct_routes, parse_labels, remote_ipcache, tunnel_routes
from weft.agent.config import ClusterSettings, pick_underlay
from weft.agent.errors import TRY_AGAIN_LATER, AgentError
from weft.identity.allocator import IdentityAllocator, IdentityExhausted
from weft.store.cluster import Identities
from weft.store.kv import StoreUnavailable
from weft.store.records import Endpoint, Node
from weft.store.sqlite import SqliteStore
from weft.types.labels import Label

N1 = Node("node-1", ("172.30.1.1", "fd00:172:30::1:1"), ("10.244.1.0/24", "fd12::1:0/112"))
N2 = Node("node-2", ("172.30.1.2", "fd00:172:30::1:2"), ("10.244.2.0/24", "fd12::2:0/112"))


def view() -> RemoteView:
    return RemoteView(7, {"node-1": N1, "node-2": N2},
                      {"10.244.1.5": Endpoint("10.244.1.5", 300, "node-1", "default", "a"),
                       "10.244.2.5": Endpoint("10.244.2.5", 301, "node-2", "default", "b"),
                       "fd12::2:5": Endpoint("fd12::2:5", 301, "node-2", "default", "b")})


def test_tunnels_lead_to_the_other_nodes_only_over_the_clusters_underlay() -> None:
    assert tunnel_routes(view(), "node-1", (4, 6)) == {"10.244.2.0/24": "172.30.1.2", "fd12::2:0/112": "172.30.1.2"}
    assert tunnel_routes(view(), "node-1", (6,)) == {"10.244.2.0/24": "fd00:172:30::1:2",
                                                     "fd12::2:0/112": "fd00:172:30::1:2"}
    assert tunnel_routes(view(), "node-2", (4, 6))["10.244.1.0/24"] == "172.30.1.1"


def test_direct_routes_use_the_prefixes_own_family() -> None:
    assert direct_routes(view(), "node-1") == {"10.244.2.0/24": "172.30.1.2", "fd12::2:0/112": "fd00:172:30::1:2"}
    lone = RemoteView(1, {"node-3": Node("node-3", ("172.30.1.3",), ("fd12::3:0/112",))})
    assert direct_routes(lone, "node-1") == {}, "no IPv6 address to route an IPv6 prefix to"


def test_ipcache_has_other_nodes_pods_and_addresses_not_our_own() -> None:
    cache = remote_ipcache(view(), "node-1")
    net = ipaddress.ip_network
    assert cache[net("10.244.2.5/32")] == 301 and cache[net("fd12::2:5/128")] == 301
    assert net("10.244.1.5/32") not in cache, "the node's own pods are local endpoints"
    assert cache[net("172.30.1.2/32")] == 6 and cache[net("fd00:172:30::1:2/128")] == 6, "remote-node"
    assert net("172.30.1.1/32") not in cache


def test_settings_name_what_is_missing() -> None:
    with pytest.raises(ValidationError, match="store_path"):
        ClusterSettings(mode="overlay", store="sqlite", addresses=["172.30.1.1"])
    with pytest.raises(ValidationError, match="store_endpoint"):
        ClusterSettings(mode="direct", store="etcd", addresses=["172.30.1.1"])
    with pytest.raises(ValidationError):
        ClusterSettings(store="sqlite", store_path=Path("/x"), addresses=["not-an-ip"])
    with pytest.raises(ValidationError):
        ClusterSettings(store="sqlite", store_path=Path("/x"), addresses=[])
    with pytest.raises(ValueError, match="no IPv6"):
        pick_underlay(["172.30.1.1"], (6,))


def test_the_allocator_takes_cluster_numbers_from_the_store(tmp_path: Path) -> None:
    with SqliteStore(str(tmp_path / "s.db")) as store:
        node1 = IdentityAllocator(cluster=StoreNumbering(Identities(store), "node-1", lambda: 0))
        node2 = IdentityAllocator(cluster=StoreNumbering(Identities(store), "node-2", lambda: 0))
        labels = frozenset({Label("k8s", "app", "a")})
        first = node1.acquire(labels)
        assert node2.acquire(labels) == first, "one label set, one number on every node"
        assert node1.acquire(labels) == first and node1.refs[first] == 2
        other = node2.acquire(frozenset({Label("k8s", "app", "b")}))
        assert other != first
        # Node-local identities (toFQDNs selectors) never come from the store.
        local = node1.acquire(frozenset({Label("fqdn", "x.example", "")}), local=True)
        assert local >= 1 << 24 and Identities(store).labels_of(local) is None
        # The store drops a node's reference when its last user goes, and GC frees the number
        # once no node holds it.
        node1.release(first)
        node1.release(first)
        assert Identities(store).references(first) == ["node-2"]
        node2.release(first)
        assert first in Identities(store).collect_garbage()
        assert parse_labels(("k8s:app=a",)) == labels


def test_a_store_outage_is_a_retryable_error_and_changes_nothing(tmp_path: Path) -> None:
    class Down(Identities):
        def allocate(self, *args: object, **kwargs: object) -> int:
            raise StoreUnavailable("etcd at http://172.30.0.2:2379: connection refused")

    with SqliteStore(str(tmp_path / "s.db")) as store:
        alloc = IdentityAllocator(cluster=StoreNumbering(Down(store), "node-1", lambda: 0))
        with pytest.raises(AgentError) as info:
            alloc.acquire(frozenset({Label("k8s", "app", "a")}))
        assert info.value.code == TRY_AGAIN_LATER and "connection refused" in info.value.msg
        assert alloc.by_labels == {} and alloc.refs == {}


def test_a_number_the_node_holds_for_other_labels_is_refused(tmp_path: Path) -> None:
    with SqliteStore(str(tmp_path / "s.db")) as store:
        alloc = IdentityAllocator(cluster=StoreNumbering(Identities(store), "node-1", lambda: 0))
        # As if the store lost its data while the node kept numbers it had from it.
        alloc.by_labels[frozenset({Label("k8s", "app", "old")})] = 256
        with pytest.raises(IdentityExhausted, match="256"):
            alloc.acquire(frozenset({Label("k8s", "app", "new")}))
        assert alloc.renumber(frozenset({Label("k8s", "app", "old")}), 300) == 256


def test_a_record_that_does_not_decode_is_skipped_and_named(tmp_path: Path) -> None:
    from weft.agent.cluster import ClusterSync
    from weft.agent.config import NodeConfig
    from weft.store.cluster import Nodes

    settings = ClusterSettings(store="sqlite", store_path=tmp_path / "s.db", addresses=["172.30.1.1"])
    config = NodeConfig(node_name="node-1", state_dir=tmp_path, socket_path=tmp_path / "a.sock", pin_dir=tmp_path,
                        pod_block_v4="10.244.1.0/24", pod_block_v6="fd12::1:0/112", cluster=settings)
    with SqliteStore(str(tmp_path / "s.db")) as store:
        Nodes(store).register(N2, 0)
        store.put("weft/nodes/node-9", b"{not json")
        store.put("weft/identities/id/300", b'"k8s:app=a"')
        sync = ClusterSync(config, settings, store, lambda fn: fn())
        state = sync._snapshot()
        assert list(state.nodes) == ["node-2"] and state.identities == {}
        assert sorted(p.split(":")[0] for p in sync.bad_records) == ["weft/identities/id/300", "weft/nodes/node-9"]
        assert "not JSON" in next(p for p in sync.bad_records if "node-9" in p)
