"""One behavioural suite for the cluster store, run against both engines: SQLite (a file in a temp dir)
and etcd (Debian's real etcd server on 127.0.0.1, ports picked free; no root needed).

Tests on the shared etcd server keep to their own key root, so they stay independent.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import pytest

from weft.store import Compare, Delete, EventType, LeaseNotFound, Put, Store, StoreUnavailable, WatchCompacted
from weft.store.cluster import Endpoints, Identities, Keys, Nodes, Policies
from weft.store.etcd import EtcdStore, EtcdWatcher
from weft.store.etcdserver import EtcdServer
from weft.store.kv import Event, Watcher
from weft.store.records import Endpoint, Node
from weft.store.session import Heartbeat, snapshot
from weft.store.sqlite import SqliteStore

from labutil import wait_until

StoreFactory = Callable[[], Store]


@pytest.fixture(scope="module")
def etcd_server() -> Iterator[EtcdServer]:
    server = EtcdServer(name=f"wst-{secrets.token_hex(3)}")
    try:
        server.start()
        yield server
    finally:
        server.stop(cleanup=True)


@pytest.fixture(params=["sqlite", "etcd"])
def new_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """Opens as many clients of one store as a test wants (each its own connection), closing them all."""
    opened: list[Store] = []

    def factory() -> Store:
        if request.param == "sqlite":
            store: Store = SqliteStore(str(tmp_path / "store.db"))
        else:
            store = EtcdStore(request.getfixturevalue("etcd_server").endpoint)
        opened.append(store)
        return store

    yield factory
    for store in opened:
        store.close()


@pytest.fixture
def store(new_store: StoreFactory) -> Store:
    return new_store()


@pytest.fixture
def root() -> str:
    return f"t{secrets.token_hex(4)}/"


def drain(watcher: Watcher, count: int, timeout: float = 15.0) -> list[Event]:
    """Exactly ``count`` events (fails on a timeout; extra events show up in the next drain)."""
    events: list[Event] = []
    deadline = time.monotonic() + timeout
    while len(events) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out: got {len(events)} of {count} events: {events}")
        events += watcher.get(timeout=0.2)
    return events


def test_crud_and_prefix_list(store: Store, root: str) -> None:
    rev1 = store.put(root + "a/1", b"one")
    rev2 = store.put(root + "a/2", b"two")
    store.put(root + "b/1", b"other")
    assert rev2 > rev1
    kv = store.get(root + "a/1")
    assert kv is not None and kv.value == b"one" and kv.create_revision == kv.mod_revision == rev1
    store.put(root + "a/1", b"uno")
    kv = store.get(root + "a/1")
    assert kv is not None and kv.value == b"uno" and kv.create_revision == rev1 and kv.mod_revision > rev2
    kvs, rev = store.list_prefix(root + "a/")
    assert [(k.key, k.value) for k in kvs] == [(root + "a/1", b"uno"), (root + "a/2", b"two")]
    assert rev == store.revision()
    assert store.delete(root + "a/1") == 1
    assert store.get(root + "a/1") is None
    assert store.delete(root + "a/1") == 0
    assert store.delete(root, prefix=True) == 2
    assert store.list_prefix(root)[0] == []
    with pytest.raises(ValueError, match="non-empty"):
        store.put("", b"x")


def test_create_only_and_cas(store: Store, root: str) -> None:
    key = root + "k"
    assert store.create(key, b"first")
    assert not store.create(key, b"second")
    kv = store.get(key)
    assert kv is not None and kv.value == b"first"
    assert store.cas(key, b"swapped", kv.mod_revision)
    assert not store.cas(key, b"stale", kv.mod_revision)  # the swap moved the revision on
    kv2 = store.get(key)
    assert kv2 is not None and kv2.value == b"swapped"


def test_txn_is_atomic_and_runs_the_failure_branch(store: Store, root: str) -> None:
    store.put(root + "x", b"1")
    res = store.txn([Compare(root + "x", value=b"1"), Compare.absent(root + "y")],
                    [Put(root + "y", b"2"), Delete(root + "x")], [Put(root + "failed", b"")])
    assert res.succeeded
    assert store.get(root + "x") is None and store.get(root + "y") is not None
    # one compare fails: nothing of the success branch happens, the failure branch does
    res = store.txn([Compare.absent(root + "z"), Compare.absent(root + "y")],
                    [Put(root + "z", b"3")], [Put(root + "failed", b"yes")])
    assert not res.succeeded
    assert store.get(root + "z") is None
    failed = store.get(root + "failed")
    assert failed is not None and failed.value == b"yes"
    # a prefix compare holds for every key under it, and vacuously for none
    assert store.txn([Compare.absent(root + "empty/", prefix=True)], []).succeeded
    assert not store.txn([Compare.absent(root, prefix=True)], []).succeeded


def test_watch_from_revision_and_resume(store: Store, root: str) -> None:
    first = store.put(root + "a", b"1")
    store.put(root + "b", b"2")
    store.put("elsewhere/" + root, b"not watched")
    store.delete(root + "a")
    watcher = store.watch(root, start_revision=first)
    events = drain(watcher, 3)
    assert [(e.type, e.key, e.value) for e in events] == [
        (EventType.PUT, root + "a", b"1"), (EventType.PUT, root + "b", b"2"), (EventType.DELETE, root + "a", b"")]
    assert [e.revision for e in events] == sorted(e.revision for e in events)
    resume = watcher.next_revision
    assert resume == events[-1].revision + 1
    watcher.close()
    # changes while nobody watches are delivered to a watch resumed from where the last one stopped
    store.put(root + "c", b"3")
    store.put(root + "b", b"22")
    watcher = store.watch(root, start_revision=resume)
    assert [(e.key, e.value) for e in drain(watcher, 2)] == [(root + "c", b"3"), (root + "b", b"22")]
    assert watcher.get(timeout=0.3) == []
    watcher.close()
    store.delete("elsewhere/" + root)


def test_watch_of_compacted_history_says_resync(store: Store, root: str) -> None:
    start = store.put(root + "a", b"1")
    store.put(root + "a", b"2")
    store.compact(store.put(root + "a", b"3"))
    watcher = store.watch(root, start_revision=start)
    with pytest.raises(WatchCompacted) as info:
        drain(watcher, 1, timeout=10)
    assert info.value.compact_revision > start
    watcher.close()
    # the resync: list, then watch from the listed revision + 1
    kvs, rev = store.list_prefix(root)
    assert [k.value for k in kvs] == [b"3"]
    watcher = store.watch(root, start_revision=rev + 1)
    store.put(root + "a", b"4")
    assert [e.value for e in drain(watcher, 1)] == [b"4"]
    watcher.close()


def test_lease_expiry_deletes_keys_and_keepalive_keeps_them(store: Store, root: str) -> None:
    dying = store.grant_lease(1)
    kept = store.grant_lease(1)
    store.put(root + "dying", b"", lease=dying)
    store.put(root + "kept", b"", lease=kept)
    store.put(root + "plain", b"")
    watcher = store.watch(root)

    def dying_gone() -> bool:
        store.keepalive(kept)
        return store.get(root + "dying") is None

    wait_until("the key of the unrenewed lease to be deleted", dying_gone, timeout=15, interval=0.2)
    assert store.get(root + "kept") is not None and store.get(root + "plain") is not None
    assert [(e.type, e.key) for e in drain(watcher, 1)] == [(EventType.DELETE, root + "dying")]
    with pytest.raises(LeaseNotFound):
        store.keepalive(dying)
    with pytest.raises(LeaseNotFound):
        store.put(root + "late", b"", lease=dying)
    store.revoke_lease(kept)
    assert store.get(root + "kept") is None
    watcher.close()


def test_concurrent_allocators_agree_and_never_share_ids(new_store: StoreFactory, root: str) -> None:
    """Each round: two agents allocate the same labels at the same moment while two others race for
    another label set; both pairs must end with one identity each, and no id may serve two label sets."""
    rounds = 25
    clients = [Identities(new_store(), Keys(root)) for _ in range(4)]
    results: dict[tuple[int, int], int] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def agent(n: int) -> None:
        try:
            for r in range(rounds):
                labels = [f"k8s:app=a{r}"] if n < 2 else [f"k8s:app=b{r}", "k8s:tier=x"]
                barrier.wait(timeout=30)
                results[(n, r)] = clients[n].allocate(labels, node=f"node{n}")
        except BaseException as e:
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=agent, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    ids_a = [results[(0, r)] for r in range(rounds)]
    ids_b = [results[(2, r)] for r in range(rounds)]
    assert ids_a == [results[(1, r)] for r in range(rounds)]
    assert ids_b == [results[(3, r)] for r in range(rounds)]
    assert len(set(ids_a + ids_b)) == 2 * rounds
    table, _ = clients[0].all()
    assert len(table) == 2 * rounds
    for r in range(rounds):
        assert table[ids_a[r]] == (f"k8s:app=a{r}",)
        assert sorted(clients[0].references(ids_a[r])) == ["node0", "node1"]


ALLOCATOR_PROCESS = """
import json, sys
from weft.store.cluster import Identities, Keys
from weft.store.etcd import EtcdStore
from weft.store.sqlite import SqliteStore
kind, where, root, node, start_at = sys.argv[1:6]
store = SqliteStore(where) if kind == "sqlite" else EtcdStore(where)
ids = Identities(store, Keys(root))
import time
time.sleep(max(0.0, float(start_at) - time.time()))  # both processes start allocating at the same instant
print(json.dumps([ids.allocate([f"k8s:app=p{i}"], node=node) for i in range(30)]))
store.close()
"""


def test_allocating_processes_agree(new_store: StoreFactory, root: str) -> None:
    """Two separate processes (separate SQLite connections / etcd clients) allocate the same 30 label
    sets in the same order starting at the same instant: each label set gets one id, each id one set."""
    store = new_store()
    if isinstance(store, SqliteStore):
        kind, where = "sqlite", store.path
    else:
        kind, where = "etcd", cast(EtcdStore, store).endpoint
    start_at = str(time.time() + 1.5)  # time for both interpreters to start
    procs = [subprocess.Popen([sys.executable, "-c", ALLOCATOR_PROCESS, kind, where, root, f"n{n}", start_at],
                              stdout=subprocess.PIPE, text=True) for n in range(2)]
    outputs = [p.communicate(timeout=60)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    first, second = (json.loads(out) for out in outputs)
    assert first == second and len(set(first)) == 30
    ids = Identities(store, Keys(root))
    assert all(sorted(ids.references(i)) == ["n0", "n1"] for i in first)


def test_gc_never_takes_an_identity_being_allocated(new_store: StoreFactory, root: str) -> None:
    """An allocator re-taking an identity races a GC that sees it unreferenced: either the GC wins (and
    the allocator makes a fresh mapping) or the reference lands first (and the GC leaves it); an
    allocated id always maps back to its labels while the reference is held."""
    allocator, collector = Identities(new_store(), Keys(root)), Identities(new_store(), Keys(root))
    stop = threading.Event()
    freed: list[int] = []

    def gc_loop() -> None:
        while not stop.is_set():
            freed.extend(collector.collect_garbage())

    gc = threading.Thread(target=gc_loop)
    gc.start()
    try:
        for _ in range(60):
            ident = allocator.allocate(["k8s:app=churn"], node="n1")
            assert allocator.labels_of(ident) == ("k8s:app=churn",)
            assert allocator.lookup(["k8s:app=churn"]) == ident
            allocator.release(ident, "n1")
    finally:
        stop.set()
        gc.join(timeout=30)
    assert freed, "the collector never freed the released identity: the race was not exercised"


def test_identity_gc_when_last_reference_goes(store: Store, root: str) -> None:
    ids = Identities(store, Keys(root))
    web = ids.allocate(["k8s:app=web"], node="n1")
    assert web == 256
    assert ids.allocate(["k8s:app=web"], node="n2") == web
    db = ids.allocate(["k8s:app=db"], node="n1")
    assert db == 257
    assert ids.release(web, "n1")
    assert ids.collect_garbage() == []  # n2 still uses web
    assert ids.release(web, "n2")
    assert ids.collect_garbage() == [web]
    assert ids.lookup(["k8s:app=web"]) is None and ids.labels_of(web) is None
    assert ids.labels_of(db) == ("k8s:app=db",)
    # the freed id is reused, for new labels; re-allocating the old labels gets a fresh mapping
    assert ids.allocate(["k8s:app=cache"], node="n1") == web
    assert ids.allocate(["k8s:app=web"], node="n1") == 258


def test_node_removal_removes_its_endpoints_and_references(store: Store, root: str) -> None:
    keys = Keys(root)
    nodes, eps, ids = Nodes(store, keys), Endpoints(store, keys), Identities(store, keys)
    nodes.register(Node("n1", ("192.168.0.1", "fd00::1"), ("10.1.0.0/24",)), lease=0)
    nodes.register(Node("n2", ("192.168.0.2",), ("10.2.0.0/24",)), lease=0)
    shared = ids.allocate(["k8s:app=web"], node="n1")
    assert ids.allocate(["k8s:app=web"], node="n2") == shared
    only_n1 = ids.allocate(["k8s:app=db"], node="n1")
    eps.publish(Endpoint("10.1.0.5", shared, "n1", "default", "web-1"))
    eps.publish(Endpoint("10.1.0.6", only_n1, "n1", "default", "db-1"))
    eps.publish(Endpoint("10.2.0.5", shared, "n2", "default", "web-2"))
    watcher = store.watch(root + "endpoints/")

    assert nodes.remove("n1") == 1 + 2 + 2
    assert nodes.get("n1") is None and nodes.get("n2") is not None
    assert [e.ip for e in eps.list()[0]] == ["10.2.0.5"]
    assert {e.key for e in drain(watcher, 2)} == {root + "endpoints/10.1.0.5", root + "endpoints/10.1.0.6"}
    assert ids.references(shared) == ["n2"] and ids.references(only_n1) == []
    assert ids.collect_garbage() == [only_n1]
    assert ids.lookup(["k8s:app=web"]) == shared
    watcher.close()


def test_a_dead_nodes_lease_takes_all_its_keys(store: Store, root: str) -> None:
    keys = Keys(root)
    nodes, eps, ids = Nodes(store, keys), Endpoints(store, keys), Identities(store, keys)
    lease = store.grant_lease(30)
    nodes.register(Node("n1", ("192.168.0.1",), ("10.1.0.0/24",)), lease)
    ident = ids.allocate(["k8s:app=web"], node="n1", lease=lease)
    eps.publish(Endpoint("10.1.0.5", ident, "n1", "default", "web-1"), lease)
    store.revoke_lease(lease)  # what expiry does, without waiting a TTL
    assert nodes.list()[0] == [] and eps.list()[0] == [] and ids.references(ident) == []
    assert ids.collect_garbage() == [ident]


def test_policies_roundtrip_and_reject_bad_names(store: Store, root: str) -> None:
    pols = Policies(store, Keys(root))
    doc = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "spec": {"endpointSelector": {}}}
    pols.put("allow-dns", doc)
    assert pols.get("allow-dns") == doc
    assert pols.list()[0] == {"allow-dns": doc}
    with pytest.raises(ValueError, match="policy name 'a/b'"):
        pols.put("a/b", doc)
    assert pols.delete("allow-dns") and pols.get("allow-dns") is None


def test_heartbeat_keeps_the_node_and_registers_again_after_losing_its_lease(store: Store, root: str) -> None:
    nodes = Nodes(store, Keys(root))
    node = Node("n1", ("192.168.0.1",), ("10.1.0.0/24",))
    leases: list[int] = []

    def register(lease: int) -> None:
        leases.append(lease)
        nodes.register(node, lease)

    beat = Heartbeat(store, ttl=1, on_lease=register)
    first = beat.start()
    try:
        # alive well past its TTL (etcd raises 1 s to its 2 s minimum) because it is renewed
        wait_until("eight renewals (2.7 s)", lambda: beat.renewals >= 8, timeout=15)
        assert nodes.get("n1") == node
        store.revoke_lease(first)  # what an outage longer than the TTL does
        assert nodes.get("n1") is None
        wait_until("the node to register again", lambda: nodes.get("n1") is not None, timeout=15)
        assert len(leases) == 2 and leases[1] != first
    finally:
        beat.stop()
    assert nodes.get("n1") is None  # a clean leave revokes the lease


def test_snapshot_then_watch_resyncs_everything(store: Store, root: str) -> None:
    keys = Keys(root)
    Nodes(store, keys).register(Node("n1", ("fd00::1",), ("fd10::/64",)), 0)
    ident = Identities(store, keys).allocate(["k8s:app=web"], node="n1")
    Endpoints(store, keys).publish(Endpoint("fd10::5", ident, "n1", "default", "web-1"))
    Policies(store, keys).put("p1", {"spec": {}})
    state = snapshot(store, keys)
    assert list(state.nodes) == ["n1"] and list(state.endpoints) == ["fd10::5"]
    assert state.identities == {ident: ("k8s:app=web",)} and state.policies == {"p1": {"spec": {}}}
    watcher = store.watch(root, state.revision + 1)
    Endpoints(store, keys).withdraw("fd10::5")
    assert [(e.type, e.key) for e in drain(watcher, 1)] == [(EventType.DELETE, root + "endpoints/fd10::5")]
    watcher.close()


def test_sqlite_is_shared_between_processes(tmp_path: Path) -> None:
    path = str(tmp_path / "store.db")
    store = SqliteStore(path)
    watcher = store.watch("shared/")
    code = ("import sys; from weft.store.sqlite import SqliteStore\n"
            "s = SqliteStore(sys.argv[1])\n"
            "[s.put(f'shared/{i}', str(i).encode()) for i in range(20)]\n"
            "s.close()\n")
    subprocess.run([sys.executable, "-c", code, path], check=True, timeout=60)
    assert [e.value for e in drain(watcher, 20)] == [str(i).encode() for i in range(20)]
    watcher.close()
    store.close()


def test_etcd_restart_mid_watch_loses_no_event(root: str) -> None:
    server = EtcdServer(name=f"wsr-{secrets.token_hex(3)}")
    store = EtcdStore(server.endpoint)
    try:
        server.start()
        nodes = Nodes(store, Keys(root))
        lease = store.grant_lease(60)
        nodes.register(Node("n1", ("192.168.0.1",), ("10.1.0.0/24",)), lease)
        watcher = store.watch(root)
        assert isinstance(watcher, EtcdWatcher)
        wait_until("the watch to be established", watcher.connected.is_set)
        store.put(root + "before", b"1")
        assert [e.key for e in drain(watcher, 1)] == [root + "before"]

        server.stop()
        with pytest.raises(StoreUnavailable):  # the outage is reported, not hidden
            store.put(root + "during", b"")
        wait_until("the watcher to notice the outage", lambda: not watcher.connected.is_set())
        server.start()
        # writes right after the restart, while the watcher may still be reconnecting
        for i in range(5):
            store.put(f"{root}after/{i}", str(i).encode())
        events = drain(watcher, 5)
        assert [e.key for e in events] == [f"{root}after/{i}" for i in range(5)]
        assert watcher.reconnects >= 1
        assert watcher.get(timeout=0.3) == []
        # the agent's resync after a reconnect: its node and lease survived (persisted), state re-listed
        store.keepalive(lease)
        assert [n.name for n in nodes.list()[0]] == ["n1"]
    finally:
        store.close()
        server.stop(cleanup=True)
