"""Multi-node through the lab: node namespaces on an underlay bridge, an agent each, a cluster
store shared by them. Overlay mode (VXLAN by the datapath, the sender's identity carried) on the
embedded SQLite store; direct mode (pods addressed from the underlay, routed by the datapath) on
a real etcd server. Every claim is shown with real packets between pods of different nodes.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from weft.lab.cluster import NETNS_DIR, Lab, PodInfo
from weft.lab.probe import probe
from weft.lab.runtime import CniError

from conftest import unique_lab_name
from labutil import STREAM_CLIENT, counters, in_netns, pod_name, stream_progress, wait_until

SERVE = ["tcp:80", "udp:80"]
REPO = Path(__file__).resolve().parents[2]


def policy_file(tmp: Path, name: str, target: dict[str, str], *allowed: dict[str, str]) -> Path:
    doc = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
           "metadata": {"name": name, "namespace": "default"},
           "spec": {"endpointSelector": {"matchLabels": target},
                    "ingress": [{"fromEndpoints": [{"matchLabels": peer} for peer in allowed],
                                 "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"},
                                                        {"port": "80", "protocol": "UDP"}]}]}]}}
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(doc))
    return path


def apply(lab: Lab, path: Path, delete: bool = False) -> None:
    """`weft apply` / `weft delete`, as a user runs it."""
    subprocess.run([sys.executable, "-m", "weft.cli.main", "delete" if delete else "apply", "--lab", lab.name,
                    "-f", str(path)], check=True, capture_output=True, text=True)


def address(pod: PodInfo, family: int) -> str:
    return next(a for a in pod.addresses if ipaddress.ip_address(a).version == family)


def status(lab: Lab, node: str) -> dict[str, Any]:
    result: dict[str, Any] = lab.client(lab.node(lab.load(), node)).call("status", {})
    return result


def reaches(lab: Lab, src: PodInfo, dst: PodInfo, family: int = 4, proto: str = "tcp", timeout: float = 1.0) -> bool:
    return probe(src.netns, proto, address(dst, family), 80, timeout=timeout).ok


def identity(lab: Lab, pod: PodInfo) -> int:
    for ep in lab.client(lab.node(lab.load(), pod.node)).call("endpoint.list", {}):
        if ep["pod"] == pod.key:
            return int(ep["identity"])
    raise AssertionError(f"{pod.key} has no endpoint")


def ipcache(lab: Lab, node: str) -> dict[str, int]:
    """The node's ipcache as its kernel map holds it."""
    script = ("import json,sys; from pathlib import Path; "
              "from weft.datapath.loader import NodeDatapath, default_object_path; "
              "dp = NodeDatapath(Path(sys.argv[1]), default_object_path()); dp.load(); "
              "print(json.dumps({str(k): v for k, v in dp.ipcache().items()})); dp.close()")
    out = in_netns(lab.node(lab.load(), node).netns, sys.executable, "-c", script, str(lab.pin_root / node))
    result: dict[str, int] = json.loads(out.stdout)
    return result


class Stream:
    """A TCP echo stream from one pod to another, checked for progress (no reset, no stall)."""

    def __init__(self, src: PodInfo, host: str) -> None:
        self.proc = subprocess.Popen(["nsenter", f"--net={NETNS_DIR / src.netns}", sys.executable, "-u", "-c",
                                      STREAM_CLIENT, host, "80"], stdout=subprocess.PIPE, text=True)
        stream_progress(self.proc)

    def advancing(self, marks: int = 3) -> None:
        seen = [stream_progress(self.proc) for _ in range(marks)]
        assert self.proc.poll() is None and seen == sorted(seen), seen

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


# ---------------------------------------------------------------------------- overlay, SQLite
@pytest.fixture(scope="module")
def overlay() -> Iterator[Lab]:
    lab = Lab(unique_lab_name("ov"))
    try:
        lab.up(nodes=2, ip_family="dual", mode="overlay", store="sqlite")
        yield lab
    finally:
        lab.down(quiet=True)


def pods(lab: Lab, prefix: str, placement: dict[str, tuple[str, dict[str, str]]]) -> dict[str, PodInfo]:
    out = {}
    for key, (node, labels) in placement.items():
        out[key] = lab.pod_add(f"default/{pod_name(prefix + key)}", node_name=node, labels=labels, serve=SERVE)
    return out


@pytest.mark.parametrize("proto", ["tcp", "udp"])
@pytest.mark.parametrize("family", [4, 6])
def test_overlay_cross_node(overlay: Lab, proto: str, family: int) -> None:
    p = pods(overlay, f"x{proto}{family}", {"a": ("node-1", {"app": "x"}), "b": ("node-2", {"app": "y"})})
    before = {n: counters(status(overlay, n)) for n in ("node-1", "node-2")}
    assert reaches(overlay, p["a"], p["b"], family, proto), f"a -> b {proto} IPv{family}"
    assert reaches(overlay, p["b"], p["a"], family, proto), f"b -> a {proto} IPv{family}"
    after = {n: counters(status(overlay, n)) for n in ("node-1", "node-2")}
    for node in ("node-1", "node-2"):
        assert after[node][f"to_overlay_v{family}"] > before[node][f"to_overlay_v{family}"], node
        assert after[node][f"from_overlay_v{family}"] > before[node][f"from_overlay_v{family}"], node


def test_overlay_pods_get_an_mtu_that_fits_vxlan_and_full_segments_pass(overlay: Lab) -> None:
    p = pods(overlay, "mtu", {"a": ("node-1", {"app": "m"}), "b": ("node-2", {"app": "m"})})
    link = json.loads(in_netns(p["a"].netns, "ip", "-j", "link", "show", "eth0").stdout)[0]
    assert link["mtu"] == 1450, "1500 on the underlay less VXLAN over IPv4 (50 octets)"
    for family in (4, 6):
        # 1 MiB through the echo server: full-size segments, each encapsulated.
        script = ("import socket,sys; s=socket.create_connection((sys.argv[1],80),timeout=5); data=b'z'*(1<<20); "
                  "import threading; threading.Thread(target=s.sendall,args=(data,)).start(); got=0\n"
                  "while got < len(data):\n    chunk=s.recv(65536)\n    assert chunk\n    got+=len(chunk)\nprint(got)")
        out = in_netns(p["a"].netns, sys.executable, "-c", script, address(p["b"], family), timeout=30)
        assert out.stdout.strip() == str(1 << 20), f"IPv{family}: {out.stderr}"


def test_identities_are_cluster_wide(overlay: Lab) -> None:
    p = pods(overlay, "id", {"a1": ("node-1", {"app": "same"}), "a2": ("node-2", {"app": "same"}),
                             "o": ("node-2", {"app": "other"})})
    assert identity(overlay, p["a1"]) == identity(overlay, p["a2"]), "one label set, one identity on every node"
    assert identity(overlay, p["o"]) != identity(overlay, p["a1"])
    # Each node's ipcache knows the other node's pods by that identity.
    for pod, other in (("a1", "node-2"), ("o", "node-1")):
        wait_until(f"{other} learns {pod}", lambda pod=pod, other=other:
                   ipcache(overlay, other).get(f"{address(p[pod], 4)}/32") == identity(overlay, p[pod]))


def test_policy_holds_across_nodes(overlay: Lab, tmp_path: Path) -> None:
    p = pods(overlay, "pol", {"client": ("node-1", {"app": "pclient"}), "other": ("node-1", {"app": "pother"}),
                              "server": ("node-2", {"app": "pserver"})})
    pol = policy_file(tmp_path, "pserver-from-pclient", {"app": "pserver"}, {"app": "pclient"})
    apply(overlay, pol)
    try:
        before = counters(status(overlay, "node-2"))
        for family in (4, 6):
            assert reaches(overlay, p["client"], p["server"], family), f"allowed peer, IPv{family}"
            assert not reaches(overlay, p["other"], p["server"], family), f"peer not allowed, IPv{family}"
            assert not reaches(overlay, p["other"], p["server"], family, "udp")
        assert counters(status(overlay, "node-2"))["drop_policy_ingress"] > before["drop_policy_ingress"]
        # weft connectivity matrix spans nodes: the policy model and the packets agree.
        out = subprocess.run([sys.executable, "-m", "weft.cli.main", "connectivity", "matrix", "--lab", overlay.name,
                              "-o", "json"], capture_output=True, text=True, timeout=120)
        cells = json.loads(out.stdout)["cells"]
        mine = {(c["from"], c["to"]): c for c in cells
                if c["from"] in (p["client"].key, p["other"].key) and c["to"] == p["server"].key}
        assert mine[(p["client"].key, p["server"].key)]["expected"] == "allowed"
        assert mine[(p["other"].key, p["server"].key)]["expected"] == "denied"
        assert all(c["match"] for c in mine.values()), mine
    finally:
        apply(overlay, pol, delete=True)


def test_the_carried_identity_decides_not_a_stale_address(overlay: Lab, tmp_path: Path) -> None:
    """node-2's agent is stopped, so its ipcache keeps saying the client's address belongs to
    the allowed identity; the client is relabelled (its address now stands for another
    identity). node-2 still refuses it: the packet carries the sender's real identity."""
    p = pods(overlay, "stale", {"client": ("node-1", {"app": "sclient"}), "server": ("node-2", {"app": "sserver"})})
    pol = policy_file(tmp_path, "sserver-from-sclient", {"app": "sserver"}, {"app": "sclient"})
    apply(overlay, pol)
    state = overlay.load()
    try:
        assert reaches(overlay, p["client"], p["server"])
        old = identity(overlay, p["client"])
        overlay.stop_agent(state, "node-2")
        overlay.label("pod", p["client"].key, {"app": "intruder"})
        assert identity(overlay, p["client"]) != old
        assert ipcache(overlay, "node-2")[f"{address(p['client'], 4)}/32"] == old, "node-2's view is stale"
        assert not reaches(overlay, p["client"], p["server"]), "the old address's rights are not inherited"
    finally:
        if not overlay.agent_alive("node-2"):
            overlay.start_agent(overlay.load(), "node-2")
        apply(overlay, pol, delete=True)
    # node-2's agent caught up from the store.
    wait_until("node-2 learns the new identity", lambda:
               ipcache(overlay, "node-2").get(f"{address(p['client'], 4)}/32") == identity(overlay, p["client"]))


def test_agent_restart_under_traffic_and_policies_from_the_store(overlay: Lab, tmp_path: Path) -> None:
    """Streams across nodes go on while each agent restarts; a policy changed while node-2's
    agent was down is in force there once it is back (it reads the cluster store)."""
    p = pods(overlay, "rs", {"client": ("node-1", {"app": "rclient"}), "other": ("node-1", {"app": "rother"}),
                             "server": ("node-2", {"app": "rserver"})})
    stream = Stream(p["client"], address(p["server"], 4))
    try:
        state = overlay.load()
        for node in ("node-1", "node-2"):
            overlay.stop_agent(state, node)
            stream.advancing()
            if node == "node-2":
                # Applied through node-1 only: node-2 learns it from the store when it is back.
                pol = policy_file(tmp_path, "rserver-from-rclient", {"app": "rserver"}, {"app": "rclient"})
                overlay.client(overlay.node(state, "node-1")).call(
                    "policy.apply", {"files": [{"name": pol.name, "text": pol.read_text()}]})
            overlay.start_agent(state, node)
            stream.advancing()
        wait_until("node-2 has the policy", lambda: any(
            pol["name"] == "rserver-from-rclient"
            for pol in overlay.client(overlay.node(overlay.load(), "node-2")).call("policy.list", {})))
        assert not reaches(overlay, p["other"], p["server"]), "the policy from the store is enforced"
        assert reaches(overlay, p["client"], p["server"])
        stream.advancing()
        cluster = status(overlay, "node-2")["cluster"]
        assert cluster["connected"] and sorted(cluster["nodes"]) == ["node-1", "node-2"]
    finally:
        stream.close()
        apply(overlay, policy_file(tmp_path, "rserver-from-rclient", {"app": "rserver"}, {"app": "rclient"}),
              delete=True)


SEED_POLICY = REPO / "examples" / "policies" / "allow-genai-to-blobstorage.yaml"


def test_fqdn_policy_on_a_node_without_kube_dns(overlay: Lab) -> None:
    """kube-dns runs on node-1; a pod on node-2 under the seed's toFQDNs policy resolves
    through node-2's DNS proxy (which reaches kube-dns across nodes) and gets exactly the
    learnt address."""
    genai = overlay.pod_add(f"default/{pod_name('genai')}", node_name="node-2", labels={"app": "genai_backend"})
    apply(overlay, SEED_POLICY)
    try:
        assert probe(genai.netns, "tcp", "app1.myblobstorage.com", 80, timeout=3.0, family=4).ok
        app2 = overlay.world_address("app2.myblobstorage.com")[0]
        assert probe(genai.netns, "tcp", app2, 80, timeout=1.0).outcome == "timeout", "not in toFQDNs"
        refused = probe(genai.netns, "tcp", "other.example", 80, timeout=3.0, family=4).outcome
        assert refused.startswith("error:cannot resolve"), refused
    finally:
        apply(overlay, SEED_POLICY, delete=True)


def test_observe_spans_nodes(overlay: Lab) -> None:
    p = pods(overlay, "obs", {"a": ("node-1", {"app": "oa"}), "b": ("node-2", {"app": "ob"})})
    assert reaches(overlay, p["a"], p["b"])
    out = subprocess.run([sys.executable, "-m", "weft.cli.main", "observe", "--lab", overlay.name, "--from-pod",
                          p["a"].key, "--to-pod", p["b"].key, "--last", "50", "-o", "json"],
                         capture_output=True, text=True, timeout=60, check=True)
    flows = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    assert {f["node_name"] for f in flows} == {"node-1", "node-2"}, "the sending and the receiving node"
    # Each node names the pod of the other node too (learnt from the cluster store).
    for f in flows:
        assert f["source"]["pod_name"] == p["a"].name and f["destination"]["pod_name"] == p["b"].name, f


def test_node_removal_cleans_up_everywhere(overlay: Lab) -> None:
    """Last in this module: node-2 leaves; node-1 drops its tunnel entries and its pods."""
    p = pods(overlay, "rm", {"a": ("node-1", {"app": "rma"}), "b": ("node-2", {"app": "rmb"})})
    assert reaches(overlay, p["a"], p["b"])
    assert status(overlay, "node-1")["cluster"]["tunnels"], "node-1 has tunnels to node-2"
    b_net = f"{address(p['b'], 4)}/32"
    assert b_net in ipcache(overlay, "node-1")
    overlay.node_remove("node-2")
    wait_until("node-1 forgets node-2", lambda: status(overlay, "node-1")["cluster"]["nodes"] == ["node-1"])
    cluster = status(overlay, "node-1")["cluster"]
    assert cluster["tunnels"] == {} and cluster["remote_endpoints"] == 0
    assert b_net not in ipcache(overlay, "node-1")
    assert not (NETNS_DIR / p["b"].netns).exists() and not (overlay.pin_root / "node-2").exists()


# ---------------------------------------------------------------------------- direct, etcd
@pytest.fixture(scope="module")
def direct() -> Iterator[Lab]:
    lab = Lab(unique_lab_name("dr"))
    try:
        lab.up(nodes=2, ip_family="dual", mode="direct", store="etcd")
        yield lab
    finally:
        lab.down(quiet=True)


@pytest.mark.parametrize("proto", ["tcp", "udp"])
@pytest.mark.parametrize("family", [4, 6])
def test_direct_cross_node(direct: Lab, proto: str, family: int) -> None:
    p = pods(direct, f"d{proto}{family}", {"a": ("node-1", {"app": "x"}), "b": ("node-2", {"app": "y"})})
    underlay = ipaddress.ip_network("172.30.0.0/16" if family == 4 else "fd00:172:30::/64")
    assert ipaddress.ip_address(address(p["a"], family)) in underlay, "pods are addressed from the underlay"
    before = {n: counters(status(direct, n)) for n in ("node-1", "node-2")}
    assert reaches(direct, p["a"], p["b"], family, proto)
    assert reaches(direct, p["b"], p["a"], family, proto)
    after = {n: counters(status(direct, n)) for n in ("node-1", "node-2")}
    for node in ("node-1", "node-2"):
        assert after[node][f"routed_v{family}"] > before[node][f"routed_v{family}"], node
        assert after[node][f"from_netdev_v{family}"] > before[node][f"from_netdev_v{family}"], node
        assert after[node][f"to_overlay_v{family}"] == before[node][f"to_overlay_v{family}"], "no encapsulation"


def test_direct_policy_across_nodes(direct: Lab, tmp_path: Path) -> None:
    p = pods(direct, "dpol", {"client": ("node-1", {"app": "dclient"}), "other": ("node-1", {"app": "dother"}),
                              "server": ("node-2", {"app": "dserver"})})
    pol = policy_file(tmp_path, "dserver-from-dclient", {"app": "dserver"}, {"app": "dclient"})
    apply(direct, pol)
    try:
        for family in (4, 6):
            assert reaches(direct, p["client"], p["server"], family)
            assert not reaches(direct, p["other"], p["server"], family)
    finally:
        apply(direct, pol, delete=True)


def test_simultaneous_allocations_end_with_one_identity(direct: Lab) -> None:
    """Two agents allocate the identity of a new label set at the same moment."""
    for round_ in range(3):
        labels = {"app": f"race{round_}"}
        made: dict[str, PodInfo] = {}
        start = threading.Barrier(2)

        errors: list[BaseException] = []

        def add(node: str, labels: dict[str, str] = labels, made: dict[str, PodInfo] = made,
                start: threading.Barrier = start, errors: list[BaseException] = errors) -> None:
            start.wait()
            try:
                made[node] = direct.pod_add(f"default/{pod_name('race')}", node_name=node, labels=labels)
            except BaseException as exc:  # reported by the test, not lost in the thread
                errors.append(exc)

        threads = [threading.Thread(target=add, args=(n,)) for n in ("node-1", "node-2")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert set(made) == {"node-1", "node-2"}
        assert {p.key for p in direct.load().pods.values()} >= {p.key for p in made.values()}, "both in lab.json"
        assert identity(direct, made["node-1"]) == identity(direct, made["node-2"]), f"round {round_}"


def test_etcd_restart_under_traffic_then_new_identities_propagate(direct: Lab, tmp_path: Path) -> None:
    p = pods(direct, "et", {"client": ("node-1", {"app": "eclient"}), "server": ("node-2", {"app": "eserver"})})
    pol = policy_file(tmp_path, "eserver-from-enew", {"app": "eserver"}, {"app": "eclient"}, {"app": "enew"})
    apply(direct, pol)
    stream = Stream(p["client"], address(p["server"], 4))
    try:
        state = direct.load()
        direct.stop_store(state)
        stream.advancing()
        wait_until("agents notice the store is gone",
                   lambda: not status(direct, "node-1")["cluster"]["connected"], timeout=30)
        # Meanwhile: a pod of a label set the node already has an identity for is added (its
        # endpoint reaches the store later); one that needs a new identity is refused, "try
        # again later", leaving nothing behind.
        late = direct.pod_add(f"default/{pod_name('elate')}", node_name="node-1", labels={"app": "eclient"})
        endpoints_before = len(direct.client(direct.node(state, "node-1")).call("endpoint.list", {}))
        with pytest.raises(CniError, match="cluster store"):
            direct.pod_add(f"default/{pod_name('enope')}", node_name="node-1", labels={"app": "enovel"})
        assert len(direct.client(direct.node(state, "node-1")).call("endpoint.list", {})) == endpoints_before
        direct.start_store(state)
        wait_until("agents resync with the store", lambda: all(
            status(direct, n)["cluster"]["connected"] for n in ("node-1", "node-2")), timeout=30)
        stream.advancing()
        wait_until("the pod added during the outage is known on node-2", lambda:
                   ipcache(direct, "node-2").get(f"{address(late, 4)}/32") == identity(direct, late))
        assert reaches(direct, late, p["server"])
        # A pod made after the restart: its identity reaches node-2, whose policy lets it in.
        new = direct.pod_add(f"default/{pod_name('enew')}", node_name="node-1", labels={"app": "enew"})
        wait_until("node-2 enforces the new identity", lambda: reaches(direct, new, p["server"], timeout=0.5),
                   timeout=10)
        stream.advancing()
    finally:
        stream.close()
        if not direct.load().store_pid:
            direct.start_store(direct.load())
        apply(direct, pol, delete=True)


def test_unused_identities_are_collected(direct: Lab) -> None:
    a = direct.pod_add(f"default/{pod_name('gc')}", node_name="node-1", labels={"app": "gc-only"})
    ident = identity(direct, a)
    direct.pod_del(a.key)
    client = direct.client(direct.node(direct.load(), "node-2"))
    assert ident in status(direct, "node-2")["cluster"]["identities"]

    def collected() -> bool:
        client.call("cluster.gc", {})  # any node may collect (the periodic pass does the same)
        return ident not in status(direct, "node-2")["cluster"]["identities"]

    wait_until("the identity is collected", collected, timeout=15)


def test_direct_node_removal_removes_the_routes(direct: Lab) -> None:
    """Last of the direct lab: node-2 leaves; node-1's routes and tunnel entries to it go."""
    def routes() -> list[str]:
        out = in_netns(direct.node(direct.load(), "node-1").netns, "ip", "-j", "route", "show", "proto", "201").stdout
        v6 = in_netns(direct.node(direct.load(), "node-1").netns, "ip", "-6", "-j", "route", "show", "proto",
                      "201").stdout
        return sorted(r["dst"] for r in json.loads(out) + json.loads(v6))

    assert routes() == ["172.30.130.0/24", "fd00:172:30:0:8002::/80"]
    direct.node_remove("node-2")
    wait_until("node-1 forgets node-2", lambda: status(direct, "node-1")["cluster"]["nodes"] == ["node-1"])
    assert routes() == [] and status(direct, "node-1")["cluster"]["tunnels"] == {}


def test_ipv6_only_overlay_tunnels_over_the_ipv6_underlay() -> None:
    lab = Lab(unique_lab_name("o6"))
    try:
        lab.up(nodes=2, ip_family="ipv6", mode="overlay")
        p = pods(lab, "v6", {"a": ("node-1", {"app": "a6"}), "b": ("node-2", {"app": "b6"})})
        link = json.loads(in_netns(p["a"].netns, "ip", "-j", "link", "show", "eth0").stdout)[0]
        assert link["mtu"] == 1430, "1500 less VXLAN over IPv6 (70 octets)"
        tunnels = status(lab, "node-1")["cluster"]["tunnels"]
        assert tunnels and all(ipaddress.ip_address(gw).version == 6 for gw in tunnels.values()), tunnels
        assert reaches(lab, p["a"], p["b"], 6) and reaches(lab, p["b"], p["a"], 6, "udp")
    finally:
        lab.down(quiet=True)
