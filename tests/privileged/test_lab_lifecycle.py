"""The lab through the real CLI: families, spreading pods over nodes, a clear error on IPAM
exhaustion with nothing leaked, exec, and ``lab down`` cleaning up after a crash."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from weft.lab.cluster import BPF_DIR, LABS_DIR, NETNS_DIR, Lab

from conftest import unique_lab_name

WEFT = [sys.executable, "-m", "weft.cli.main"]


def weft(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*WEFT, *args], capture_output=True, text=True, timeout=120, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"weft {' '.join(args)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
    return proc


def leftovers(name: str) -> list[str]:
    found = [f"netns {p.name}" for p in NETNS_DIR.iterdir() if p.name.startswith(f"{name}-")] \
        if NETNS_DIR.is_dir() else []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if f"WEFT_LAB={name}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(f"process {entry.name}")
            except OSError:
                continue
    for path in (LABS_DIR / name, BPF_DIR / name):
        if path.exists():
            found.append(str(path))
    return found


@pytest.fixture
def lab_name() -> Iterator[str]:
    name = unique_lab_name("c")
    try:
        yield name
    finally:
        Lab(name).down()
        assert leftovers(name) == []


def test_ipv4_only_small_blocks_spread_and_exhaustion(lab_name: str) -> None:
    # No world: kube-dns would take node-1's only address.
    weft("lab", "up", "--lab", lab_name, "--nodes", "2", "--ip-family", "ipv4", "--node-mask-v4", "30", "--no-world")
    weft("lab", "pod", "add", "default/one", "--lab", lab_name)
    weft("lab", "pod", "add", "default/two", "--lab", lab_name)
    pods = json.loads(weft("lab", "pod", "list", "--lab", lab_name, "-o", "json").stdout)
    assert sorted(p["node"] for p in pods) == ["node-1", "node-2"], "pods spread over the nodes"
    assert all(len(p["addresses"]) == 1 and ":" not in p["addresses"][0] for p in pods)
    # A /30 per node holds one pod: the third ADD on node-1 fails clearly and leaks nothing.
    failed = weft("lab", "pod", "add", "default/three", "--lab", lab_name, "--node", "node-1", check=False)
    assert failed.returncode != 0
    assert "no free IPv4 address" in failed.stdout + failed.stderr
    status = json.loads(weft("status", "--lab", lab_name, "--node", "node-1", "-o", "json").stdout)[0]
    assert status["ipam"]["ipv4"]["used"] == 1 and status["endpoints"] == 1
    assert not (NETNS_DIR / f"{lab_name}-pod-default-three").exists()
    out = weft("lab", "exec", "default/one", "--lab", lab_name, "--", "ip", "-4", "-o", "addr", "show", "eth0").stdout
    assert pods[0]["addresses"][0] in out or pods[1]["addresses"][0] in out


def test_ipv6_only_pods_talk(lab_name: str) -> None:
    weft("lab", "up", "--lab", lab_name, "--ip-family", "ipv6")
    weft("lab", "pod", "add", "default/a", "--lab", lab_name)
    weft("lab", "pod", "add", "default/b", "--lab", lab_name, "--serve", "tcp:8080")
    pods = {p["pod"]: p for p in json.loads(weft("lab", "pod", "list", "--lab", lab_name, "-o", "json").stdout)}
    b6 = pods["default/b"]["addresses"]
    assert len(b6) == 1 and ":" in b6[0]
    assert weft("lab", "exec", "default/a", "--lab", lab_name, "--", "ping", "-c1", "-W2", b6[0]).returncode == 0
    v4 = weft("lab", "exec", "default/a", "--lab", lab_name, "--", "ip", "-4", "-o", "addr", "show", "eth0").stdout
    assert v4.strip() == ""


def test_down_after_a_crash_removes_everything(lab_name: str) -> None:
    weft("lab", "up", "--lab", lab_name)
    weft("lab", "pod", "add", "default/a", "--lab", lab_name, "--serve", "tcp:80,udp:53,http:8080")
    assert leftovers(lab_name), "the lab made things"
    # A crash of the CLI and the loss of its state file: down still finds everything by name.
    (LABS_DIR / lab_name / "lab.json").unlink()
    assert os.path.exists(NETNS_DIR / f"{lab_name}-node-1")
    weft("lab", "down", "--lab", lab_name)
    assert leftovers(lab_name) == []


def test_bad_cli_input_is_explained(lab_name: str) -> None:
    weft("lab", "up", "--lab", lab_name)
    bad = weft("lab", "pod", "add", "Default/UPPER", "--lab", lab_name, check=False)
    assert bad.returncode != 0 and "DNS-1123" in bad.stdout + bad.stderr
    bad = weft("lab", "pod", "add", "default/x", "--lab", lab_name, "--serve", "tcp:99999", check=False)
    assert bad.returncode != 0 and "out of range" in bad.stdout + bad.stderr
    bad = weft("lab", "pod", "add", "default/x", "--lab", lab_name, "--labels", "novalue", check=False)
    assert bad.returncode != 0 and "key=value" in bad.stdout + bad.stderr
    assert not (NETNS_DIR / f"{lab_name}-pod-default-x").exists()
