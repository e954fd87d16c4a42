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
