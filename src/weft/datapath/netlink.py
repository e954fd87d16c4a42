"""One rtnetlink socket per thread, kept open, for the netns the thread runs in (the node's).

Opening an ``IPRoute`` costs about a millisecond (socket, bind, its event loop); the agent's
datapath worker makes several netlink calls per pod, so it keeps one. Threads that enter a
pod's netns must not use this: they open their own socket inside that netns.
"""

from __future__ import annotations

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
