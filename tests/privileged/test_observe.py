"""weft observe on real packets: allowed connections show FORWARDED with their SYN, drops show
their reason (policy default deny, explicit deny, TCP without a connection), output formats, and
a burst beyond the event ring's capacity shows up as lost events in status and in observe.
One lab for the module."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from weft.lab.cluster import Lab, PodInfo
from weft.lab.probe import probe

from conftest import one_node_lab
from labutil import in_netns, wait_until

WEFT = [sys.executable, "-m", "weft.cli.main"]

ALLOW = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: allow-frontend
  namespace: default
spec:
  endpointSelector:
    matchLabels:
      app: backend
  ingress:
  - fromEndpoints:
    - matchLabels:
        app: frontend
    toPorts:
    - ports:
      - port: "80"
        protocol: TCP
      - port: "53"
        protocol: UDP
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: deny-udp-53
  namespace: default
spec:
  endpointSelector:
    matchLabels:
      app: backend
  ingressDeny:
  - fromEndpoints:
    - matchLabels:
        app: other
    toPorts:
    - ports:
      - port: "53"
        protocol: UDP
"""

# A TCP ACK that belongs to no connection, sent through a raw socket (the kernel adds the IP header).
RAW_ACK = r"""
import socket, struct, sys
src, dst, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
hdr = struct.pack("!HHIIBBHHH", 40404, port, 1, 1, 5 << 4, 0x10, 65535, 0, 0)
pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(hdr))
data = pseudo + hdr
total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
while total >> 16:
    total = (total & 0xFFFF) + (total >> 16)
hdr = hdr[:16] + struct.pack("!H", ~total & 0xFFFF) + hdr[18:]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
s.bind((src, 0))
s.sendto(hdr, (dst, 0))
"""

UDP_BURST = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(int(sys.argv[3])):
    s.sendto(b"x", (sys.argv[1], int(sys.argv[2])))
"""


def weft(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*WEFT, *args], capture_output=True, text=True, timeout=60, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"weft {' '.join(args)}: {proc.stdout}{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    yield from one_node_lab("o")


@pytest.fixture(scope="module")
def pods(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> dict[str, PodInfo]:
    made = {
        "frontend": lab.pod_add("default/frontend", labels={"app": "frontend"}),
        "other": lab.pod_add("default/other", labels={"app": "other"}),
        "backend": lab.pod_add("default/backend", labels={"app": "backend"}, serve=["tcp:80", "tcp:81", "udp:53"]),
    }
    policy = tmp_path_factory.mktemp("observe") / "policy.yaml"
    policy.write_text(ALLOW)
    weft("apply", "-f", str(policy), "--lab", lab.name)
    return made


def v4(pod: PodInfo) -> str:
    return next(a for a in pod.addresses if ":" not in a)


def observe(lab: Lab, *args: str) -> list[dict[str, Any]]:
    out = weft("observe", "--lab", lab.name, "-o", "jsonpb", "--all", *args).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def flows_of(lab: Lab, *args: str) -> list[dict[str, Any]]:
    return [r["flow"] for r in observe(lab, *args) if "flow" in r]


def wait_for_flow(lab: Lab, what: str, *args: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []

    def seen() -> bool:
        found[:] = flows_of(lab, *args)
        return bool(found)

    try:
        wait_until(what, seen, timeout=10, interval=0.2)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; flows held:\n" + weft("observe", "--lab", lab.name, "--all").stdout) from None
    return found


def test_allowed_tcp_connection_is_forwarded_with_its_syn(lab: Lab, pods: dict[str, PodInfo]) -> None:
    fe, be = pods["frontend"], pods["backend"]
    assert probe(fe.netns, "tcp", v4(be), 80, timeout=2).outcome == "connected"
    [syn] = wait_for_flow(lab, "the SYN's flow", "--from-pod", "default/frontend", "--to-pod", "default/backend",
                          "--to-port", "80", "--type", "trace", "--verdict", "FORWARDED", "--protocol", "tcp")[:1]
    assert syn["l4"]["TCP"]["flags"] == {"SYN": True}
    assert syn["source"]["pod_name"] == "frontend" and syn["destination"]["namespace"] == "default"
    assert "k8s:app=frontend" in syn["source"]["labels"] and syn["source"]["identity"] >= 256
    assert syn["traffic_direction"] == "EGRESS" and syn["is_reply"] is False
    assert syn["trace_observation_point"] == "TO_ENDPOINT" and syn["Type"] == "L3_L4"
    assert syn["interface"]["name"].startswith("lxc") or syn["interface"]["name"]
    replies = flows_of(lab, "--from-pod", "default/backend", "--to-pod", "default/frontend", "--from-port", "80")
    assert any(r["is_reply"] and r["l4"]["TCP"]["flags"].get("SYN") and r["l4"]["TCP"]["flags"].get("ACK")
               for r in replies), "the SYN-ACK is reported once"
    verdicts = flows_of(lab, "--type", "policy-verdict", "--to-pod", "default/backend", "--to-port", "80",
                        "--verdict", "FORWARDED")
    assert verdicts, "the connection's policy verdict is a flow of its own"
    # The policy that allowed it, from the entry's cookie (Hubble's ingress_allowed_by).
    allowed_by = [p for v in verdicts for p in v.get("ingress_allowed_by", [])]
    assert allowed_by and all(p["kind"] == "CiliumNetworkPolicy" and p["namespace"] == "default"
                              for p in allowed_by), verdicts[:1]


def test_drops_show_their_reasons(lab: Lab, pods: dict[str, PodInfo]) -> None:
    fe, other, be = pods["frontend"], pods["other"], pods["backend"]
    assert probe(other.netns, "tcp", v4(be), 80, timeout=0.5).outcome == "timeout"
    [denied] = wait_for_flow(lab, "the default-deny drop", "--from-pod", "default/other", "--to-port", "80",
                             "--verdict", "DROPPED", "--type", "drop")[:1]
    assert denied["drop_reason_desc"] == "POLICY_DENIED" and denied["traffic_direction"] == "INGRESS"
    assert probe(other.netns, "udp", v4(be), 53, timeout=0.5).outcome in ("timeout", "refused")
    [deny] = wait_for_flow(lab, "the explicit deny", "--from-pod", "default/other", "--protocol", "udp",
                           "--drop-reason-desc", "POLICY_DENY")[:1]
    assert deny["l4"]["UDP"]["destination_port"] == 53
    assert deny.get("ingress_denied_by") or deny.get("egress_denied_by"), "the deny rule's policy is named"
    in_netns(fe.netns, sys.executable, "-c", RAW_ACK, v4(fe), v4(be), "81")
    [no_ct] = wait_for_flow(lab, "the ACK without connection", "--from-ip", v4(fe), "--to-port", "81",
                            "--verdict", "DROPPED")[:1]
    assert no_ct["drop_reason_desc"] == "CT_NO_MAP_FOUND" and no_ct["l4"]["TCP"]["flags"] == {"ACK": True}
    # --not: every drop but the explicit deny's.
    rest = flows_of(lab, "--verdict", "DROPPED", "--not", "--drop-reason-desc", "POLICY_DENY")
    assert rest and all(f["drop_reason_desc"] != "POLICY_DENY" for f in rest)


def test_output_formats(lab: Lab, pods: dict[str, PodInfo]) -> None:
    compact = weft("observe", "--lab", lab.name, "--last", "5", "--verdict", "DROPPED", "--type", "drop").stdout
    lines = compact.splitlines()
    assert 0 < len(lines) <= 5 and all("DROPPED" in line and " -> " in line for line in lines)
    assert "\x1b[" not in compact, "no colour when stdout is not a terminal"
    table = weft("observe", "--lab", lab.name, "--last", "3", "-o", "table").stdout.splitlines()
    assert table[0].split()[:3] == ["TIMESTAMP", "NODE", "SOURCE"] and len(table) == 4
    plain = weft("observe", "--lab", lab.name, "--last", "1", "-o", "json").stdout
    assert "verdict" in json.loads(plain) and "flow" not in json.loads(plain)
    bad = weft("observe", "--lab", lab.name, "--verdict", "MAYBE", check=False)
    assert bad.returncode != 0 and "FORWARDED" in bad.stderr and "DROPPED" in bad.stderr


def test_a_burst_beyond_the_rings_shows_lost_events(lab: Lab, pods: dict[str, PodInfo]) -> None:
    """The kernel ring: 4 KiB (42 events) while no agent reads it, a burst of 300 drops; the flow
    ring: 16 flows, a follower 100 flows behind."""
    state = lab.load()
    node = state.nodes[0]
    config_path = Path(node.config_path)
    config = json.loads(config_path.read_text())
    config["flows"] = {"events_ring_bytes": 4096, "ring_capacity": 16}
    config_path.write_text(json.dumps(config))
    lab.stop_agent(state, node.name)
    lab.start_agent(state, node.name)
    client = lab.client(node)
    wait_until("the agent's new event ring", lambda: client.call("status")["flows"]["events_ring_bytes"] == 4096)

    lab.stop_agent(state, node.name)
    other, be = pods["other"], pods["backend"]
    in_netns(other.netns, sys.executable, "-c", UDP_BURST, v4(be), "53", "300")  # each one an explicit-deny drop
    lab.start_agent(state, node.name)

    def kernel_lost() -> int:
        return int(client.call("status")["flows"]["lost"]["PERF_EVENT_RING_BUFFER"])

    wait_until("lost events in status", lambda: kernel_lost() >= 300 - 42)
    lost = [r for r in observe(lab) if "lost_events" in r]
    assert any(r["lost_events"]["source"] == "PERF_EVENT_RING_BUFFER" and r["lost_events"]["num_events_lost"] >= 258
               for r in lost), lost
    assert "EVENTS LOST: PERF_EVENT_RING_BUFFER" in weft("observe", "--lab", lab.name, "--all").stdout
    # A follower that does not ask while 50 more drops come: far more than 16 flows behind.
    cursor = client.call("flows.get", {"last": 0})["cursor"]
    in_netns(other.netns, sys.executable, "-c", UDP_BURST, v4(be), "53", "50")
    wait_until("flows past the follower", lambda: client.call("status")["flows"]["ring"]["total"] > cursor + 32)
    behind = client.call("flows.get", {"after": cursor})["responses"]
    first = behind[0]["lost_events"]
    assert first["source"] == "HUBBLE_RING_BUFFER" and first["num_events_lost"] > 0
    assert len(behind) <= 17, "the rest is what the ring still holds"
