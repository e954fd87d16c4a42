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


def node_ipr() -> IPRoute:
    ipr = getattr(_local, "ipr", None)
    if ipr is None:
        ipr = IPRoute()
        _local.ipr = ipr
    return ipr


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
