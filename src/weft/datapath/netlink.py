"""One rtnetlink socket per thread, kept open, for the netns the thread runs in (the node's).

Opening an ``IPRoute`` costs about a millisecond (socket, bind, its event loop); the agent's
datapath worker makes several netlink calls per pod, so it keeps one. Threads that enter a
pod's netns must not use this: they open their own socket inside that netns.
"""

from __future__ import annotations

import socket
import threading

from pyroute2 import IPRoute

_local = threading.local()


RECYCLE_AFTER = 64  # uses of a thread's socket before recycle_node_ipr() replaces it


def node_ipr() -> IPRoute:
    ipr = getattr(_local, "ipr", None)
    if ipr is None:
        ipr = IPRoute()
        _local.ipr = ipr
        _local.uses = 0
    _local.uses += 1
    return ipr


def recycle_node_ipr() -> None:
    """Replace the thread's socket once it has served RECYCLE_AFTER callers: pyroute2 0.9.7
    keeps about 0.8 KiB of request objects per link operation alive for as long as its socket
    lives, which grew the agent by that much per pod ADD and DEL. Call it only where no caller
    holds the socket (the end of a CNI request, between two queued deletions); closing costs a
    millisecond or so, once in RECYCLE_AFTER."""
    if getattr(_local, "uses", 0) >= RECYCLE_AFTER:
        close_node_ipr()


def close_node_ipr() -> None:
    ipr = getattr(_local, "ipr", None)
    if ipr is not None:
        ipr.close()
        _local.ipr = None


def link_index(ifname: str) -> int | None:
    """The index of a link in the calling thread's netns, None if there is none. By
    if_nametoindex(3), not IPRoute.link_lookup: pyroute2 0.9.7 leaves one unread message in its
    socket's queue per lookup by name, for as long as the socket lives (a per-thread one here),
    which made the agent grow with every ADD and every reconcile."""
    try:
        return socket.if_nametoindex(ifname)
    except OSError:
        return None


# Routes the agent installs to other nodes' pod prefixes (direct mode) carry this protocol
# number, so the agent recognises its own among the node's routes (as Cilium's do with theirs).
RTPROT_WEFT = 201


def ensure_vxlan(ifname: str, port: int) -> int:
    """The node's collect-metadata ("external") VXLAN device, created if missing, up; returns its
    index. The datapath sets each packet's tunnel key (remote node, VNI = the sender's
    identity), so the device needs no VNI, remote or learning of its own."""
    ipr = node_ipr()
    index = link_index(ifname)
    if index is None:
        ipr.link("add", ifname=ifname, kind="vxlan", vxlan_collect_metadata=1, vxlan_port=port, vxlan_learning=0)
        index = link_index(ifname)
        if index is None:
            raise OSError(f"VXLAN device {ifname} not found after creating it")
    ipr.link("set", index=index, state="up")
    return index


def node_routes() -> dict[str, str]:
    """The routes the agent installed (protocol RTPROT_WEFT): destination prefix -> gateway."""
    out: dict[str, str] = {}
    ipr = node_ipr()
    for family in (socket.AF_INET, socket.AF_INET6):
        for route in ipr.get_routes(family=family, table=254):
            if route["proto"] != RTPROT_WEFT:
                continue
            dst, gw = route.get_attr("RTA_DST"), route.get_attr("RTA_GATEWAY")
            if dst is not None and gw is not None:
                out[f"{dst}/{route['dst_len']}"] = str(gw)
    return out


def sync_node_routes(desired: dict[str, str], device: str) -> dict[str, int]:
    """Bring the agent's routes to ``desired`` (prefix -> gateway on ``device``): other nodes'
    pod prefixes via their underlay address, as a cloud's route table would have them."""
    ipr = node_ipr()
    current = node_routes()
    index = link_index(device)
    written = removed = 0
    for dst, gw in desired.items():
        if current.get(dst) != gw and index is not None:
            ipr.route("replace", dst=dst, gateway=gw, oif=index, proto=RTPROT_WEFT)
            written += 1
    for dst in current:
        if dst not in desired:
            ipr.route("del", dst=dst, proto=RTPROT_WEFT)
            removed += 1
    return {"written": written, "removed": removed}
