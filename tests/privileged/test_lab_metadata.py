"""Namespaces, labels and named ports in the lab reach the agent's identities at once; the probe
command connects for real."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from weft.lab.cluster import Lab, LabError

from labutil import pod_name

WEFT = [sys.executable, "-m", "weft.cli.main"]


def endpoint(lab: Lab, key: str) -> dict[str, object]:
    node = lab.load().nodes[0]
    return next(e for e in lab.client(node).call("endpoint.list") if e["pod"] == key)


def test_namespace_and_pod_labels_drive_identity(lab: Lab) -> None:
    ns = pod_name("team")
    lab.namespace_add(ns, {"team": "blue"})
    pod = lab.pod_add(f"{ns}/{pod_name('p')}", labels={"app": "web"}, serve=["tcp:80/http-main", "udp:53/dns"])
    try:
        ep = endpoint(lab, pod.key)
        labels = set(ep["labels"])  # type: ignore[arg-type]
        assert {"k8s:app=web", f"k8s:io.kubernetes.pod.namespace={ns}",
                "k8s:io.cilium.k8s.namespace.labels.team=blue",
                f"k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name={ns}"} <= labels
        assert {"name": "http-main", "protocol": "TCP", "port": 80} in ep["namedPorts"]  # type: ignore[operator]
        first = ep["identity"]
        subprocess.run([*WEFT, "lab", "label", "pod", pod.key, "app=api", "--lab", lab.name], check=True,
                       capture_output=True)
        ep = endpoint(lab, pod.key)
        assert "k8s:app=api" in ep["labels"] and ep["identity"] != first  # type: ignore[operator]
        subprocess.run([*WEFT, "lab", "label", "namespace", ns, "team-", "--lab", lab.name], check=True,
                       capture_output=True)
        ep = endpoint(lab, pod.key)
        assert not any("namespace.labels.team=" in str(x) for x in ep["labels"])  # type: ignore[attr-defined]
        # The datapath holds the new identity for the pod's addresses.
        node = lab.load().nodes[0]
        assert lab.client(node).call("status")["endpoints"] >= 1
    finally:
        lab.pod_del(pod.key)


def test_probe_cli_reports_connected_refused_and_timeout(lab: Lab) -> None:
    a = lab.pod_add(f"default/{pod_name('pa')}")
    b = lab.pod_add(f"default/{pod_name('pb')}", serve=["tcp:80", "udp:53"])
    try:
        def run(*extra: str) -> tuple[int, dict[str, object]]:
            proc = subprocess.run([*WEFT, "probe", "--from", a.key, "--to", b.key, "--lab", lab.name, "-o", "json",
                                   "--timeout", "1", *extra], capture_output=True, text=True)
            return proc.returncode, json.loads(proc.stdout)
        rc, out = run("--port", "80")
        assert rc == 0 and out["result"] == "connected"
        rc, out = run("--port", "81")
        assert rc == 1 and out["result"] == "refused"
        rc, out = run("--port", "53", "--proto", "udp", "--family", "6")
        assert rc == 0 and out["result"] == "connected" and ":" in str(out["address"])
        rc, out = run("--port", "54", "--proto", "udp")
        assert rc == 1 and out["result"] == "refused", "the pod's ICMP port unreachable comes back"
    finally:
        lab.pod_del(a.key)
        lab.pod_del(b.key)


def _kernel_has_sctp() -> bool:
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_SCTP).close()
        return True
    except OSError:
        return False


def test_sctp_servers_where_the_kernel_allows(lab: Lab) -> None:
    ref = f"default/{pod_name('sctp')}"
    if _kernel_has_sctp():
        pod = lab.pod_add(ref, serve=["sctp:9000"])
        lab.pod_del(pod.key)
    else:
        with pytest.raises(LabError, match="servers of"):
            lab.pod_add(ref, serve=["sctp:9000"])
        log = (lab.base / "servers" / f"{lab.name}-pod-{ref.replace('/', '-')}.log").read_text()
        assert "does not support SCTP" in log
        assert ref not in lab.load().pods
