"""Every CNI verb through the real weft-cni executable and a real agent, across spec versions;
bad input gets the spec's error and leaks nothing; ADD/DEL cycles leave nothing behind."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from weft.lab.cluster import NETNS_DIR, Lab, NodeInfo

from labutil import in_netns, links, pod_name

VERSIONS = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]


@dataclass
class Call:
    rc: int
    out: dict[str, Any] | None
    raw: str


class Plugin:
    """Execs weft-cni exactly as a runtime does: CNI_* environment, netconf on stdin."""

    def __init__(self, lab: Lab, node: NodeInfo) -> None:
        self.path = lab.bin_dir / "weft-cni"
        self.socket = node.socket_path
        self.node_netns = str(NETNS_DIR / node.netns)

    def conf(self, version: str, **extra: Any) -> dict[str, Any]:
        return {"cniVersion": version, "name": "weft", "type": "weft-cni", "agentSocket": self.socket, **extra}

    def run(self, command: str, conf: dict[str, Any] | str | bytes, container_id: str = "", netns: str = "",
            ifname: str = "eth0", args: str = "", drop: tuple[str, ...] = ()) -> Call:
        env = {"PATH": os.environ["PATH"], "CNI_COMMAND": command, "CNI_CONTAINERID": container_id,
               "CNI_NETNS": netns, "CNI_IFNAME": ifname, "CNI_ARGS": args, "CNI_PATH": str(self.path.parent)}
        for key in drop:
            env.pop(key, None)
        if isinstance(conf, dict):
            conf = json.dumps(conf)
        data = conf if isinstance(conf, bytes) else conf.encode()
        proc = subprocess.run(["nsenter", f"--net={self.node_netns}", str(self.path)], input=data, env=env,
                              capture_output=True, timeout=60, check=False)
        raw = proc.stdout.decode().strip()
        return Call(proc.returncode, json.loads(raw) if raw else None, raw)


@pytest.fixture(scope="module")
def plugin(lab: Lab) -> Plugin:
    return Plugin(lab, lab.load().nodes[0])


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"wtcni-{pod_name('p')}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    yield str(NETNS_DIR / name)
    subprocess.run(["ip", "netns", "del", name], check=False)


def snapshot(lab: Lab) -> tuple[set[str], set[str], dict[str, Any]]:
    """What the node holds: host links, endpoint map addresses, IPAM usage."""
    node = lab.load().nodes[0]
    # DEL leaves the slow unregistering of the veth to a background thread: wait for it.
    assert lab.client(node).call("sync")["drained"]
    status = lab.client(node).call("status")
    host_links = {n for n in links(node.netns) if n.startswith("lxc")}
    eps = {e["containerID"] for e in lab.client(node).call("endpoint.list")}
    return host_links, eps, {k: v["used"] for k, v in status["ipam"].items()} | {
        "map": status["maps"]["weft_endpoints"]["entries"]}


@pytest.mark.parametrize("version", VERSIONS)
def test_add_check_del_per_version(lab: Lab, plugin: Plugin, netns: str, version: str) -> None:
    before = snapshot(lab)
    cid = uuid.uuid4().hex
    add = plugin.run("ADD", plugin.conf(version), cid, netns, args="K8S_POD_NAMESPACE=default;K8S_POD_NAME=v")
    assert add.rc == 0, add.raw
    assert add.out is not None and add.out["cniVersion"] == version
    ips = add.out["ips"]
    assert len(ips) == 2
    if version in ("0.3.0", "0.3.1", "0.4.0"):
        assert sorted(ip["version"] for ip in ips) == ["4", "6"]
    else:
        assert all("version" not in ip for ip in ips)
    sandbox = [i for i in add.out["interfaces"] if i.get("sandbox")]
    assert sandbox and sandbox[0]["name"] == "eth0" and sandbox[0]["sandbox"] == netns
    assert all(ip["interface"] == add.out["interfaces"].index(sandbox[0]) for ip in ips)
    conf_prev = plugin.conf(version, prevResult=add.out)
    check = plugin.run("CHECK", conf_prev, cid, netns)
    if version in ("0.3.0", "0.3.1"):
        assert check.rc != 0 and check.out is not None and check.out["code"] == 1, "CHECK arrived in 0.4.0"
    else:
        assert check.rc == 0 and check.out is None, check.raw
    assert plugin.run("DEL", conf_prev, cid, netns).rc == 0
    assert plugin.run("DEL", conf_prev, cid, netns).rc == 0, "DEL is idempotent"
    assert snapshot(lab) == before


def test_del_with_empty_netns_and_no_prev_result(lab: Lab, plugin: Plugin, netns: str) -> None:
    before = snapshot(lab)
    cid = uuid.uuid4().hex
    assert plugin.run("ADD", plugin.conf("1.0.0"), cid, netns).rc == 0
    # containerd's StopPodSandbox: DEL with the netns; RemovePodSandbox: DEL again with CNI_NETNS empty.
    subprocess.run(["ip", "netns", "del", Path(netns).name], check=True)
    gone = plugin.run("DEL", plugin.conf("1.0.0"), cid, "")
    assert gone.rc == 0, gone.raw
    assert plugin.run("DEL", plugin.conf("1.0.0"), cid, "").rc == 0
    assert snapshot(lab) == before


def test_check_detects_a_missing_interface(lab: Lab, plugin: Plugin, netns: str) -> None:
    cid = uuid.uuid4().hex
    add = plugin.run("ADD", plugin.conf("1.0.0"), cid, netns)
    assert add.rc == 0
    subprocess.run(["nsenter", f"--net={netns}", "ip", "link", "del", "eth0"], check=True)
    check = plugin.run("CHECK", plugin.conf("1.0.0", prevResult=add.out), cid, netns)
    assert check.rc != 0 and check.out is not None and "eth0" in check.out["msg"] + check.out.get("details", "")
    assert plugin.run("DEL", plugin.conf("1.0.0"), cid, netns).rc == 0


def test_status_gc_and_version(lab: Lab, plugin: Plugin) -> None:
    status = plugin.run("STATUS", plugin.conf("1.1.0"))
    assert status.rc == 0 and status.out is None, status.raw
    old = plugin.run("STATUS", plugin.conf("1.0.0"))
    assert old.rc != 0 and old.out is not None and old.out["code"] == 1
    version = plugin.run("VERSION", {"cniVersion": "1.1.0"})
    assert version.rc == 0 and version.out is not None
    assert set(VERSIONS) <= set(version.out["supportedVersions"])


def test_gc_releases_attachments_not_listed(lab: Lab, plugin: Plugin) -> None:
    before = snapshot(lab)
    made = []
    for _ in range(2):
        name = f"wtcni-{pod_name('gc')}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        cid = uuid.uuid4().hex
        assert plugin.run("ADD", plugin.conf("1.1.0"), cid, str(NETNS_DIR / name)).rc == 0
        made.append((name, cid))
    try:
        # Keep every attachment the node already had plus the first new one: only the second goes.
        node = lab.load().nodes[0]
        valid = [{"containerID": e["containerID"], "ifname": e["ifname"]}
                 for e in lab.client(node).call("endpoint.list") if e["containerID"] != made[1][1]]
        gc = plugin.run("GC", plugin.conf("1.1.0", **{"cni.dev/valid-attachments": valid}))
        assert gc.rc == 0, gc.raw
        left = {e["containerID"] for e in lab.client(node).call("endpoint.list")}
        assert made[0][1] in left and made[1][1] not in left
        assert lab.client(node).call("sync")["drained"]
        assert in_netns(made[1][0], "ip", "link", "show", "eth0", check=False).returncode != 0
    finally:
        for name, cid in made:
            plugin.run("DEL", plugin.conf("1.1.0"), cid, str(NETNS_DIR / name))
            subprocess.run(["ip", "netns", "del", name], check=False)
    assert snapshot(lab) == before


@pytest.mark.parametrize(
    ("case", "expected_code"),
    [("broken-json", 6), ("unknown-version", 1), ("missing-netns-env", 4), ("bogus-netns", 4),
     ("missing-name", 7), ("unknown-command", 4)],
)
def test_bad_input_gets_spec_error_and_leaks_nothing(lab: Lab, plugin: Plugin, netns: str, case: str,
                                                      expected_code: int) -> None:
    before = snapshot(lab)
    cid = uuid.uuid4().hex
    conf: Any = plugin.conf("1.0.0")
    command, ns, drop = "ADD", netns, ()
    if case == "broken-json":
        conf = '{"cniVersion": "1.0.0", "name": '
    elif case == "unknown-version":
        conf = plugin.conf("9.9.9")
    elif case == "missing-netns-env":
        drop = ("CNI_NETNS",)
    elif case == "bogus-netns":
        ns = "/run/netns/does-not-exist-weft"
    elif case == "missing-name":
        conf = {k: v for k, v in conf.items() if k != "name"}
    elif case == "unknown-command":
        command = "FROB"
    call = plugin.run(command, conf, cid, ns, drop=drop)
    assert call.rc != 0
    assert call.out is not None and call.out["code"] == expected_code, call.raw
    assert call.out["msg"]
    assert snapshot(lab) == before
    assert links(Path(netns).name) == ["lo"]


def test_duplicate_add_is_refused_and_keeps_the_first(lab: Lab, plugin: Plugin, netns: str) -> None:
    cid = uuid.uuid4().hex
    first = plugin.run("ADD", plugin.conf("1.0.0"), cid, netns)
    assert first.rc == 0
    mid = snapshot(lab)
    again = plugin.run("ADD", plugin.conf("1.0.0"), cid, netns)
    assert again.rc != 0 and again.out is not None and "already" in again.out["msg"]
    other = plugin.run("ADD", plugin.conf("1.0.0"), uuid.uuid4().hex, netns)  # eth0 taken in that netns
    assert other.rc != 0 and other.out is not None
    assert snapshot(lab) == mid, "neither failed ADD leaked or disturbed anything"
    assert plugin.run("CHECK", plugin.conf("1.0.0", prevResult=first.out), cid, netns).rc == 0
    assert plugin.run("DEL", plugin.conf("1.0.0"), cid, netns).rc == 0


def test_two_hundred_add_del_cycles_leave_nothing(lab: Lab, plugin: Plugin, netns: str) -> None:
    before = snapshot(lab)
    for i in range(200):
        cid = f"cycle{i:03d}" + uuid.uuid4().hex[:8]
        add = plugin.run("ADD", plugin.conf("1.0.0"), cid, netns)
        assert add.rc == 0, f"cycle {i}: {add.raw}"
        assert plugin.run("DEL", plugin.conf("1.0.0", prevResult=add.out), cid, netns).rc == 0
    assert snapshot(lab) == before
    assert links(Path(netns).name) == ["lo"]
