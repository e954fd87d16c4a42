"""The node's long-lived netlink socket stays clean: the datapath's link operations by name leave
no unread message behind in it (pyroute2 0.9.7's lookups by name leave one per call, which grew
the agent with every pod ADD and DEL for as long as it ran)."""

from __future__ import annotations

import secrets
import subprocess
import sys

SCRIPT = r"""
import ipaddress, subprocess, sys
from pyroute2 import netns
netns.setns(sys.argv[1])
from weft.datapath import veth
from weft.datapath.netlink import node_ipr
ipr = node_ipr()
queue = ipr.asyncore.msg_queue.root  # replies nobody asked for end up here
for i in range(30):
    subprocess.run(["ip", "link", "add", f"lxcw{i}", "type", "veth", "peer", "name", f"pw{i}"], check=True)
    subprocess.run(["ip", "link", "set", f"lxcw{i}", "up"], check=True)
    veth.add_node_routes(f"lxcw{i}", [ipaddress.ip_address(f"10.77.0.{i + 1}")])
    assert veth.host_link_index(f"lxcw{i}") is not None
    assert veth.delete_host_link(f"lxcw{i}")
    assert not veth.delete_host_link(f"lxcw{i}"), "already gone"
    assert veth.host_link_index(f"lxcw{i}") is None
print(queue.qsize())
"""


def test_link_operations_leave_nothing_in_the_node_socket() -> None:
    name = f"wnl-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        out = subprocess.run([sys.executable, "-c", SCRIPT, name], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "0", f"{out.stdout.strip()} unread messages left in the node's netlink socket"
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


RECYCLE = r"""
from weft.datapath import netlink
first = netlink.node_ipr()
netlink.recycle_node_ipr()
assert netlink.node_ipr() is first, "not yet due: kept"
for _ in range(netlink.RECYCLE_AFTER):
    netlink.node_ipr()
netlink.recycle_node_ipr()
second = netlink.node_ipr()
assert second is not first, "due: replaced"
assert second.link("get", index=1)[0]["index"] == 1, "the new socket works"
print("ok")
"""


def test_the_node_socket_is_replaced_after_its_quota_of_callers() -> None:
    """pyroute2 keeps request objects for the life of a socket: the agent replaces its sockets
    between requests once they have served RECYCLE_AFTER callers (at most that much is kept)."""
    out = subprocess.run([sys.executable, "-c", RECYCLE], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
