"""The datapath keeps forwarding while the agent is gone; a restarted agent reconciles the kernel
against its state on disk; an agent killed mid-ADD leaks nothing; DELs sent while it is away are
queued and applied."""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from weft.datapath.loader import EndpointEntry, NodeDatapath, default_object_path
from weft.lab.cluster import NETNS_DIR, Lab
from weft.lab.probe import probe

from labutil import STREAM_CLIENT, in_netns, links, pod_name, stream_progress, wait_until


def test_stream_survives_agent_sigkill_and_restart_reconciles(fresh_lab: Lab) -> None:
    lab = fresh_lab
    a = lab.pod_add(f"default/{pod_name('src')}")
    b = lab.pod_add(f"default/{pod_name('dst')}", serve=["tcp:5000"])
    c = lab.pod_add(f"default/{pod_name('victim')}", serve=["tcp:80"])
    dst = next(x for x in b.addresses if ":" not in x)
    endpoints = lab.client(lab.load().nodes[0]).call("endpoint.list")
    stream = subprocess.Popen(["nsenter", f"--net={NETNS_DIR / a.netns}", sys.executable, "-u", "-c", STREAM_CLIENT,
                               dst, "5000"], stdout=subprocess.PIPE, text=True)
    try:
        stream_progress(stream)
        state = lab.load()
        node = state.nodes[0]
        lab.stop_agent(state, node.name, signal.SIGKILL)
        # With the agent gone the stream goes on: programs and maps are pinned and attached.
        marks = [stream_progress(stream) for _ in range(5)]
        assert marks == sorted(marks) and stream.poll() is None

        # Disturb the kernel while the agent is away: a stale link, a stale map entry, a lost pod link.
        subprocess.run(["ip", "-n", node.netns, "link", "add", "lxcstale0000", "type", "veth", "peer", "name",
                        "tmpstale0"], check=True)
        dp = NodeDatapath(Path(lab.pin_root / node.name), default_object_path())
        dp.load()
        dp.upsert_endpoint(EndpointEntry(ip=ipaddress.ip_address("10.244.1.250"), ifindex=999,
                                         ep_id=999, identity=999, pod_mac="02:00:00:00:00:01",
                                         host_mac="02:00:00:00:00:02"))
        dp.close()
        host_links_before = {n for n in links(node.netns) if n.startswith("lxc") and n != "lxcstale0000"}
        victim_link = next(e["hostInterface"] for e in endpoints if e["pod"] == c.key)
        subprocess.run(["ip", "-n", node.netns, "link", "del", victim_link], check=True)

        lab.start_agent(state, node.name)
        report = lab.client(node).call("status")["last_reconcile"]
        assert "lxcstale0000" in report["stale_links"]
        assert "10.244.1.250" in report["stale_map_entries"]
        assert report["restored_links"] == [next(e["containerID"] for e in endpoints if e["pod"] == c.key) + "/eth0"]
        assert {n for n in links(node.netns) if n.startswith("lxc")} == host_links_before
        # The restored pod is reachable again, and the stream went on through all of it.
        victim_ip = next(x for x in c.addresses if ":" not in x)
        assert probe(a.netns, "tcp", victim_ip, 80).ok
        marks = [stream_progress(stream) for _ in range(3)]
        assert stream.poll() is None and marks == sorted(marks)
    finally:
        stream.kill()
        stream.wait()
        if stream.stdout is not None:
            stream.stdout.close()


def test_agent_killed_mid_add_leaks_nothing(fresh_lab: Lab) -> None:
    lab = fresh_lab
    state = lab.load()
    node = state.nodes[0]
    lab.stop_agent(state, node.name)
    os.environ["WEFT_FAULT"] = "add-after-allocate"
    try:
        lab.start_agent(state, node.name)
    finally:
        del os.environ["WEFT_FAULT"]
    name = f"{lab.name}-pod-crash"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        rt = lab.runtime(node)
        cid = uuid.uuid4().hex
        try:
            rt.add(cid, str(NETNS_DIR / name))
            raise AssertionError("ADD should have failed: the agent died in the middle")
        except Exception as exc:  # the plugin reports try-again-later
            assert "11" in str(exc) or "try again" in str(exc).lower(), exc
        wait_until("agent to die", lambda: not lab.agent_alive(node.name))
        lab.start_agent(state, node.name)
        st = lab.client(node).call("status")
        assert st["endpoints"] == 0
        assert all(v["used"] == 0 for v in st["ipam"].values()), st["ipam"]
        assert cid + "/eth0" in st["last_reconcile"]["rolled_back"]
        assert [n for n in links(node.netns) if n.startswith("lxc")] == []
        # And the retry the runtime makes now succeeds.
        result = rt.add(cid, str(NETNS_DIR / name))
        assert len(result["ips"]) == 2
        rt.delete(cid, str(NETNS_DIR / name))
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_del_while_agent_down_is_queued_and_applied(fresh_lab: Lab) -> None:
    lab = fresh_lab
    pod = lab.pod_add(f"default/{pod_name('q')}")
    state = lab.load()
    node = state.nodes[0]
    lab.stop_agent(state, node.name)
    rt = lab.runtime(node)
    start = time.monotonic()
    rt.delete(pod.container_id, str(NETNS_DIR / pod.netns))  # succeeds: queued
    assert time.monotonic() - start < 10
    lab.start_agent(state, node.name)
    st = lab.client(node).call("status")
    assert st["endpoints"] == 0 and all(v["used"] == 0 for v in st["ipam"].values())
    assert lab.client(node).call("sync")["drained"]
    assert in_netns(pod.netns, "ip", "link", "show", "eth0", check=False).returncode != 0
