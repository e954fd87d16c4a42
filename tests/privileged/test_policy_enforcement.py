"""Policies enforced on real packets: apply through the CLI, allowed and denied connections
over IPv4 and IPv6, drops counted with their reason, policy trace, survival of an agent
restart, deletion, and a bad file that changes nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from weft.lab.cluster import Lab, PodInfo
from weft.lab.probe import probe

from conftest import one_node_lab
from labutil import STREAM_CLIENT, counters, stream_progress

WEFT = [sys.executable, "-m", "weft.cli.main"]

CNP = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: allow-frontend-to-backend
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
"""

DENY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: deny-frontend-udp
  namespace: default
spec:
  endpointSelector:
    matchLabels:
      app: backend
  ingressDeny:
  - fromEndpoints:
    - matchLabels:
        app: frontend
    toPorts:
    - ports:
      - port: "53"
        protocol: UDP
"""


def weft(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*WEFT, *args], capture_output=True, text=True, timeout=120, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"weft {' '.join(args)}: {proc.stdout}{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def policy_lab() -> Iterator[Lab]:
    yield from one_node_lab("p")


@pytest.fixture(scope="module")
def pods(policy_lab: Lab) -> dict[str, PodInfo]:
    return {
        "frontend": policy_lab.pod_add("default/frontend", labels={"app": "frontend"}),
        "other": policy_lab.pod_add("default/other", labels={"app": "other"}),
        "backend": policy_lab.pod_add("default/backend", labels={"app": "backend"},
                                      serve=["tcp:80", "tcp:81", "udp:53"]),
    }


def addr(pod: PodInfo, version: int) -> str:
    return next(a for a in pod.addresses if (":" in a) == (version == 6))


def outcome(src: PodInfo, dst: PodInfo, port: int, version: int = 4, proto: str = "tcp") -> str:
    return probe(src.netns, proto, addr(dst, version), port, timeout=1.0).outcome


def test_policy_lifecycle(policy_lab: Lab, pods: dict[str, PodInfo], tmp_path: Path) -> None:
    lab, fe, other, be = policy_lab, pods["frontend"], pods["other"], pods["backend"]
    node = lab.load().nodes[0]
    # No policy: everything flows.
    assert outcome(other, be, 81) == "connected"
    cnp = tmp_path / "cnp.yaml"
    cnp.write_text(CNP)
    dry = weft("apply", "-f", str(cnp), "--lab", lab.name, "--dry-run")
    assert "would be created" in dry.stdout
    assert outcome(other, be, 81) == "connected", "a dry run applies nothing"
    weft("apply", "-f", str(cnp), "--lab", lab.name)
    before = counters(lab.client(node).call("status"))
    for version in (4, 6):
        assert outcome(fe, be, 80, version) == "connected"
        assert outcome(fe, be, 81, version) == "timeout"
        assert outcome(other, be, 80, version) == "timeout"
    assert outcome(be, fe, 80) in ("refused", "connected"), "backend's egress is not selected"
    after = counters(lab.client(node).call("status"))
    assert after["drop_policy_ingress"] - before["drop_policy_ingress"] >= 4
    trace = json.loads(weft("policy", "trace", "--from", other.key, "--to", be.key, "--port", "80/tcp",
                            "--lab", lab.name, "-o", "json", check=False).stdout)
    assert trace["verdict"] == "denied" and any("allow-frontend-to-backend" in line for line in trace["lines"])
    ok = json.loads(weft("policy", "trace", "--from", fe.key, "--to", be.key, "--port", "80/tcp",
                         "--lab", lab.name, "-o", "json").stdout)
    assert ok["verdict"] == "allowed"

    # Explicit deny wins, and shows its own drop reason.
    deny = tmp_path / "deny.yaml"
    deny.write_text(DENY)
    weft("apply", "-f", str(deny), "--lab", lab.name)
    before = counters(lab.client(node).call("status"))
    assert outcome(fe, be, 53, proto="udp") == "timeout"
    assert counters(lab.client(node).call("status"))["drop_policy_deny"] > before["drop_policy_deny"]
    weft("delete", "-f", str(deny), "--lab", lab.name)

    # The agent restarts: policy and enforcement come back from its state, traffic keeps flowing.
    state = lab.load()
    lab.stop_agent(state, node.name)
    assert outcome(other, be, 80) == "timeout", "enforcement holds while the agent is away"
    assert outcome(fe, be, 80) == "connected"
    lab.start_agent(state, node.name)
    assert [p["name"] for p in json.loads(weft("policy", "list", "--lab", lab.name, "-o", "json").stdout)] == [
        "allow-frontend-to-backend"]
    assert outcome(other, be, 80) == "timeout" and outcome(fe, be, 80) == "connected"

    # A broken file is refused whole, with file and line, and changes nothing.
    bad = tmp_path / "bad.yaml"
    bad.write_text(CNP.replace('port: "80"', 'port: "80"\n        bogus: 1') + "---\n" + DENY)
    refused = weft("apply", "-f", str(bad), "--lab", lab.name, check=False)
    assert refused.returncode != 0 and f"{bad}:" in refused.stderr and "bogus" in refused.stderr
    names = [p["name"] for p in json.loads(weft("policy", "list", "--lab", lab.name, "-o", "json").stdout)]
    assert names == ["allow-frontend-to-backend"], "the deny in the same file was not applied"
    assert outcome(fe, be, 80) == "connected"

    weft("delete", "-f", str(cnp), "--lab", lab.name)
    assert outcome(other, be, 81) == "connected"
    assert json.loads(weft("policy", "list", "--lab", lab.name, "-o", "json").stdout) == []


def test_new_pods_are_enforced_from_their_first_packet(policy_lab: Lab, pods: dict[str, PodInfo],
                                                       tmp_path: Path) -> None:
    lab = policy_lab
    cnp = tmp_path / "cnp.yaml"
    cnp.write_text(CNP)
    weft("apply", "-f", str(cnp), "--lab", lab.name)
    try:
        late = lab.pod_add("default/late-backend", labels={"app": "backend"}, serve=["tcp:80", "tcp:81"])
        assert outcome(pods["other"], late, 80) == "timeout"
        assert outcome(pods["frontend"], late, 80) == "connected"
        # Label change: "other" becomes a frontend and is allowed at once.
        weft("lab", "label", "pod", pods["other"].key, "app=frontend", "--lab", lab.name)
        assert outcome(pods["other"], late, 80) == "connected"
        weft("lab", "label", "pod", pods["other"].key, "app=other", "--lab", lab.name)
        assert outcome(pods["other"], late, 80) == "timeout"
        lab.pod_del(late.key)
    finally:
        weft("delete", "-f", str(cnp), "--lab", lab.name)


def test_connectivity_matrix_expected_matches_observed(policy_lab: Lab, pods: dict[str, PodInfo],
                                                       tmp_path: Path) -> None:
    lab = policy_lab
    cnp = tmp_path / "cnp.yaml"
    cnp.write_text(CNP)
    weft("apply", "-f", str(cnp), "--lab", lab.name)
    try:
        out = weft("connectivity", "matrix", "--lab", lab.name, "--ports", "80,81", "--protocols", "tcp,udp",
                   "-o", "json")
        report = json.loads(out.stdout)
        cells = {(c["from"], c["to"], c["port"], c["protocol"]): c for c in report["cells"]}
        assert report["mismatches"] == 0
        assert len(cells) == 3 * 2 * 2 * 2
        assert cells[("default/frontend", "default/backend", 80, "tcp")]["observed"] == "allowed"
        assert cells[("default/frontend", "default/backend", 81, "tcp")]["observed"] == "denied"
        assert cells[("default/other", "default/backend", 80, "tcp")]["expected"] == "denied"
        assert cells[("default/backend", "default/other", 81, "udp")]["observed"] == "allowed", \
            "other's ingress is not enforced: the closed port answers with an ICMP error"
        table = weft("connectivity", "matrix", "--lab", lab.name, "--ports", "80")
        assert "0 mismatch" in table.stdout
    finally:
        weft("delete", "-f", str(cnp), "--lab", lab.name)


PROBE_LOOP = r"""
import socket, sys, time
host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
tries = passed = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    tries += 1
    try:
        socket.create_connection((host, port), timeout=0.2).close()
        passed += 1
    except OSError:
        pass
print(tries, passed)
"""


def test_policy_changes_under_live_traffic(policy_lab: Lab, pods: dict[str, PodInfo], tmp_path: Path) -> None:
    """Replacing and adding policies while an allowed stream runs and a denied peer keeps trying:
    the stream is never cut, and not one denied connection gets through."""
    lab, fe, other, be = policy_lab, pods["frontend"], pods["other"], pods["backend"]
    cnp = tmp_path / "cnp.yaml"
    cnp.write_text(CNP)
    weft("apply", "-f", str(cnp), "--lab", lab.name)
    stream = subprocess.Popen(["nsenter", f"--net=/run/netns/{fe.netns}", sys.executable, "-u", "-c", STREAM_CLIENT,
                               addr(be, 4), "80"], stdout=subprocess.PIPE, text=True)
    prober = subprocess.Popen(["nsenter", f"--net=/run/netns/{other.netns}", sys.executable, "-c", PROBE_LOOP,
                               addr(be, 4), "80", "6"], stdout=subprocess.PIPE, text=True)
    try:
        stream_progress(stream)
        wider = tmp_path / "wider.yaml"
        port80 = '      - port: "80"\n        protocol: TCP'
        wider.write_text(CNP.replace(port80, port80 + '\n      - port: "81"\n        protocol: TCP'))
        extra = tmp_path / "extra.yaml"
        extra.write_text(DENY)
        marks = [stream_progress(stream)]
        for step in (wider, extra, cnp):
            weft("apply", "-f", str(step), "--lab", lab.name)
            marks.append(stream_progress(stream))
        weft("delete", "-f", str(extra), "--lab", lab.name)
        marks.append(stream_progress(stream))
        assert marks == sorted(marks) and stream.poll() is None, "the allowed stream kept going"
        out, _ = prober.communicate(timeout=30)
        tries, passed = (int(x) for x in out.split())
        assert tries > 5 and passed == 0, f"{passed} of {tries} denied connections got through"
    finally:
        for proc in (stream, prober):
            proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        weft("delete", "-f", str(cnp), "--lab", lab.name, check=False)


def test_a_large_policy_file_is_applied(policy_lab: Lab, pods: dict[str, PodInfo], tmp_path: Path) -> None:
    """A file well over 64 KiB (one request line to the agent) goes through whole."""
    rules = "".join(f"  - fromCIDR:\n    - 172.{16 + i // 65536}.{(i // 256) % 256}.{i % 256}/32\n"
                    f"    toPorts:\n    - ports:\n      - port: \"{1000 + i}\"\n        protocol: TCP\n"
                    for i in range(700))
    big = tmp_path / "big.yaml"
    big.write_text(CNP + rules)
    assert big.stat().st_size > 64 * 1024
    weft("apply", "-f", str(big), "--lab", policy_lab.name)
    try:
        assert outcome(pods["frontend"], pods["backend"], 80) == "connected"
        assert outcome(pods["other"], pods["backend"], 80) == "timeout"
    finally:
        weft("delete", "-f", str(big), "--lab", policy_lab.name)
