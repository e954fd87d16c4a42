"""The seed's FQDN policy end to end in a lab with its world: real DNS (kube-dns = dnsmasq in a
pod, forwarding to the world's DNS), the node's DNS proxy reached through the datapath's
redirect, real connections to the world's servers. Covers the canonical and the literal reading
of the seed, A/AAAA, DNS over TCP, CNAMEs, the direct-IP bypass, and lookups and connections
that keep working while the agent is SIGKILLed and while the proxy restarts."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from weft.lab.cluster import Lab, PodInfo
from weft.lab.probe import probe

from conftest import one_node_lab
from labutil import counters, pod_name, wait_until

ROOT = Path(__file__).resolve().parents[2]
CANONICAL = (ROOT / "examples/policies/allow-genai-to-blobstorage.yaml").read_text()
LITERAL = (ROOT / "examples/policies/allow-genai-to-blobstorage-literal.yaml").read_text()
APP1_V4, APP1_V6 = "198.51.100.10", "2001:db8:100::10"
APP2_V4 = "198.51.100.11"
OTHER_V4 = "203.0.113.10"
WORLD_DNS = "198.51.100.53"

# Lookups and connections in a loop, as an application would do them (glibc's resolver through
# the pod's resolv.conf, then a TCP connection); prints one JSON summary.
LOOP = r"""
import json, socket, sys, time
allowed, denied, stop_file = sys.argv[1].split(","), sys.argv[2].split(","), sys.argv[3]
import os
out = {"lookups": 0, "lookup_failures": [], "connects": 0, "connect_failures": [], "denied_resolved": []}
while not os.path.exists(stop_file):
    for name in allowed:
        try:
            addr = socket.getaddrinfo(name, 80, socket.AF_INET, socket.SOCK_STREAM)[0][4]
            out["lookups"] += 1
        except OSError as e:
            out["lookup_failures"].append(f"{name}: {e}")
            continue
        s = socket.socket(); s.settimeout(3)
        try:
            s.connect(addr); s.sendall(b"ping"); s.recv(10); out["connects"] += 1
        except OSError as e:
            out["connect_failures"].append(f"{name} {addr}: {e}")
        finally:
            s.close()
    for name in denied:
        try:
            socket.getaddrinfo(name, 80, socket.AF_INET, socket.SOCK_STREAM)
            out["denied_resolved"].append(name)
        except OSError:
            pass
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def world_lab() -> Iterator[Lab]:
    yield from one_node_lab("q", world=True)


def apply(lab: Lab, text: str, name: str = "seed.yaml") -> None:
    node = lab.load().nodes[0]
    lab.client(node).call("policy.apply", {"files": [{"name": name, "text": text}]})


def delete(lab: Lab, text: str) -> None:
    node = lab.load().nodes[0]
    lab.client(node).call("policy.delete", {"files": [{"name": "seed.yaml", "text": text}]})


def dig(lab: Lab, pod: PodInfo, name: str, rtype: str = "A", *extra: str) -> tuple[str, list[str]]:
    """(status, answer values) of a query through the pod's resolver (or @server in extra)."""
    out = subprocess.run(lab.exec_argv(pod.key, ["dig", "+tries=1", "+time=2", *extra, name, rtype]),
                         capture_output=True, text=True, timeout=30, check=False).stdout
    status = next((line.split("status: ")[1].split(",")[0] for line in out.splitlines() if "status: " in line),
                  "TIMEOUT")
    values = [line.split()[-1] for line in out.splitlines()
              if not line.startswith(";") and len(line.split()) == 5 and line.split()[3] in ("A", "AAAA", "CNAME")]
    return status, values


def node_counters(lab: Lab) -> dict[str, int]:
    return counters(lab.client(lab.load().nodes[0]).call("status"))


@pytest.fixture
def genai(world_lab: Lab) -> Iterator[PodInfo]:
    pod = world_lab.pod_add(f"default/{pod_name('genai')}", labels={"app": "genai_backend"})
    try:
        yield pod
    finally:
        world_lab.pod_del(pod.key)


@pytest.mark.parametrize("text", [CANONICAL, LITERAL], ids=["canonical", "literal"])
def test_seed_policy(world_lab: Lab, genai: PodInfo, text: str) -> None:
    # Before any policy: everything resolves and connects.
    assert dig(world_lab, genai, "other.example")[0] == "NOERROR"
    apply(world_lab, text)
    try:
        # Nothing learned yet: a direct connection to app1 (never resolved) is dropped.
        before = node_counters(world_lab)
        assert probe(genai.netns, "tcp", APP1_V4, 80, timeout=1).outcome == "timeout"
        assert node_counters(world_lab)["drop_policy_egress"] > before["drop_policy_egress"]
        # Allowed names resolve through the proxy (A, AAAA, over TCP, through a CNAME)...
        assert dig(world_lab, genai, "app1.myblobstorage.com") == ("NOERROR", [APP1_V4])
        assert dig(world_lab, genai, "app1.myblobstorage.com", "AAAA") == ("NOERROR", [APP1_V6])
        assert dig(world_lab, genai, "app2.myblobstorage.com", "A", "+tcp") == ("NOERROR", [APP2_V4])
        assert dig(world_lab, genai, "www.myblobstorage.com")[1] == ["app1.myblobstorage.com.", APP1_V4]
        # ... and names outside the pattern are refused, not forwarded.
        assert dig(world_lab, genai, "other.example")[0] == "REFUSED"
        assert dig(world_lab, genai, "other.example", "A", "+tcp")[0] == "REFUSED"
        # app1 is reachable by name over both families; app2 resolved but is not in toFQDNs.
        assert probe(genai.netns, "tcp", "app1.myblobstorage.com", 80, family=4).outcome == "connected"
        assert probe(genai.netns, "tcp", "app1.myblobstorage.com", 80, family=6).outcome == "connected"
        assert probe(genai.netns, "tcp", APP2_V4, 80, timeout=1).outcome == "timeout"
        # Direct-IP bypass: an address never resolved through the proxy stays dropped.
        assert probe(genai.netns, "tcp", OTHER_V4, 80, timeout=1).outcome == "timeout"
        # DNS straight to the world's server: the canonical policy allows DNS to kube-dns only;
        # the literal one sends port 53 of every peer through the proxy, same names.
        direct = dig(world_lab, genai, "app1.myblobstorage.com", "A", f"@{WORLD_DNS}")
        refused = dig(world_lab, genai, "other.example", "A", f"@{WORLD_DNS}")
        if text is CANONICAL:
            assert direct[0] == "TIMEOUT" and refused[0] == "TIMEOUT"
        else:
            assert direct == ("NOERROR", [APP1_V4]) and refused[0] == "REFUSED"
        # What the proxy learned, as `weft fqdn cache list` shows it.
        node = world_lab.load().nodes[0]
        from weft.dnsproxy.control import ProxyClient
        entries = ProxyClient(node.proxy_socket).cache_list()
        mine = [e for e in entries if e.get("pod") == genai.key]
        names = {e["name"].rstrip(".") for e in mine}
        assert "app1.myblobstorage.com" in names
        assert not {"app2.myblobstorage.com", "other.example"} & names
    finally:
        delete(world_lab, text)


def test_pods_without_policy_are_not_redirected(world_lab: Lab) -> None:
    pod = world_lab.pod_add(f"default/{pod_name('free')}", labels={"app": "free"})
    try:
        apply(world_lab, CANONICAL)
        before = node_counters(world_lab)["redirect_dns_proxy"]
        assert dig(world_lab, pod, "other.example") == ("NOERROR", [OTHER_V4])
        assert probe(pod.netns, "tcp", OTHER_V4, 80).outcome == "connected"
        assert node_counters(world_lab)["redirect_dns_proxy"] == before
    finally:
        delete(world_lab, CANONICAL)
        world_lab.pod_del(pod.key)


WILDCARD_FQDN = textwrap.dedent("""\
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata:
      name: blob-anything
    spec:
      endpointSelector:
        matchLabels:
          app: genai_backend
      egress:
      - toEndpoints:
        - matchLabels:
            "k8s:io.kubernetes.pod.namespace": kube-system
            "k8s:k8s-app": kube-dns
        toPorts:
        - ports:
          - port: "53"
            protocol: ANY
          rules:
            dns:
            - matchPattern: "*.myblobstorage.com"
      - toFQDNs:
        - matchPattern: "*.myblobstorage.com"
        toPorts:
        - ports:
          - port: "80"
            protocol: TCP
    """)


def run_loop(lab: Lab, pod: PodInfo, allowed: list[str], denied: list[str],
             disturb: list[tuple[str, object]]) -> dict[str, object]:
    """Run the lookup+connect loop in the pod while ``disturb`` callables run, then stop it."""
    stop = Path(lab.base) / f"stop-{pod.name}"
    stop.unlink(missing_ok=True)
    proc = subprocess.Popen(lab.exec_argv(pod.key, [sys.executable, "-c", LOOP, ",".join(allowed), ",".join(denied),
                                                     str(stop)]), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        for _what, action in disturb:
            assert callable(action)
            action()
        stop.touch()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        stop.unlink(missing_ok=True)
    assert proc.returncode == 0, err
    result: dict[str, object] = json.loads(out)
    return result


def test_lookups_and_connections_survive_agent_sigkill(world_lab: Lab, genai: PodInfo) -> None:
    apply(world_lab, WILDCARD_FQDN, "wild.yaml")
    state = world_lab.load()
    node = state.nodes[0]
    try:
        def outage() -> None:
            world_lab.stop_agent(state, node.name, signal.SIGKILL)
            # While no agent runs: names never seen before resolve and become reachable, denied
            # names are refused (the loop below asks the proxy on its own).
            assert dig(world_lab, genai, "multi.myblobstorage.com")[0] == "NOERROR"
            assert probe(genai.netns, "tcp", "multi.myblobstorage.com", 80, family=4).outcome == "connected"
            assert dig(world_lab, genai, "other.example")[0] == "REFUSED"
            world_lab.start_agent(world_lab.load(), node.name)

        result = run_loop(world_lab, genai, ["app1.myblobstorage.com", "app2.myblobstorage.com",
                                             "www.myblobstorage.com"], ["other.example"],
                          [("kill", outage), ("kill", outage)])
        assert result["lookup_failures"] == [] and result["connect_failures"] == []
        assert result["denied_resolved"] == []
        assert isinstance(result["lookups"], int) and result["lookups"] >= 3
    finally:
        world_lab.client(world_lab.load().nodes[0]).call(
            "policy.delete", {"files": [{"name": "wild.yaml", "text": WILDCARD_FQDN}]})


def test_lookups_and_connections_survive_proxy_restarts(world_lab: Lab, genai: PodInfo) -> None:
    apply(world_lab, WILDCARD_FQDN, "wild.yaml")
    try:
        def restart() -> None:
            state = world_lab.load()
            old = state.nodes[0].proxy_pid
            new = world_lab.restart_dnsproxy(state, state.nodes[0].name)
            assert new != old
            # The learned addresses survive the restart: app1 stays reachable without a lookup.
            assert probe(genai.netns, "tcp", APP1_V4, 80, timeout=2).outcome == "connected"

        assert dig(world_lab, genai, "app1.myblobstorage.com")[0] == "NOERROR"
        result = run_loop(world_lab, genai, ["app1.myblobstorage.com", "app2.myblobstorage.com"],
                          ["other.example"], [("restart", restart)] * 3)
        assert result["lookup_failures"] == [] and result["connect_failures"] == []
        assert result["denied_resolved"] == []
        node = world_lab.load().nodes[0]
        health = world_lab.client(node).call("status")["dns_proxy"]
        assert health["healthy"] and health["pid"] == node.proxy_pid
    finally:
        world_lab.client(world_lab.load().nodes[0]).call(
            "policy.delete", {"files": [{"name": "wild.yaml", "text": WILDCARD_FQDN}]})


def test_fqdn_cli(world_lab: Lab, genai: PodInfo) -> None:
    apply(world_lab, CANONICAL)
    try:
        assert dig(world_lab, genai, "app1.myblobstorage.com")[0] == "NOERROR"
        weft = [sys.executable, "-m", "weft.cli.main"]
        out = subprocess.run([*weft, "fqdn", "cache", "list", "--lab", world_lab.name, "-o", "json"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        rows = json.loads(out)
        assert any(genai.key in json.dumps(r) and APP1_V4 in json.dumps(r) for r in rows)
        names = json.loads(subprocess.run([*weft, "fqdn", "names", "--lab", world_lab.name, "-o", "json"],
                                          capture_output=True, text=True, timeout=30, check=True).stdout)
        asked = {(r["pod"], r["name"].rstrip(".")): r for r in names}
        assert asked[(genai.key, "app1.myblobstorage.com")]["allowed"] >= 1
        status = subprocess.run([*weft, "status", "--lab", world_lab.name], capture_output=True, text=True,
                                timeout=30, check=True).stdout
        assert "DNS proxy: healthy" in status

        # Flows carry the names the pod resolved (from the proxy's saved cache, within a second
        # or so of the lookup), so `--to-fqdn` finds them.
        def named_flow() -> bool:
            assert probe(genai.netns, "tcp", APP1_V4, 80).outcome == "connected"
            out = subprocess.run([*weft, "observe", "--lab", world_lab.name, "--from-pod", genai.key, "--to-fqdn",
                                  "app1.myblobstorage.com", "--all", "-o", "json"], capture_output=True, text=True,
                                 timeout=30, check=True).stdout
            return any("app1.myblobstorage.com" in line for line in out.splitlines())

        wait_until("a flow named app1.myblobstorage.com", named_flow, timeout=20, interval=0.5)
    finally:
        delete(world_lab, CANONICAL)
