"""The node's routing for the redirect: packets the datapath marked for the proxy are delivered
locally (to the socket it assigned) instead of forwarded to their destination.

Equivalent of ``ip rule add fwmark 0x0a00/0x0f00 lookup 2005 pref 9`` and ``ip route replace local
0.0.0.0/0 dev lo table 2005`` (and the same for IPv6), made idempotent: the proxy runs this at
every start, in its own netns (the node's). Uses pyroute2 synchronously: call it before the
event loop starts (pyroute2 runs an event loop of its own).
"""

from __future__ import annotations

import socket

from pyroute2 import IPRoute

from weft.datapath import abi

RULE_PRIORITY = 9  # before "lookup main" (32766), as Cilium's proxy rule
RT_SCOPE_HOST = 254


def install_proxy_routing() -> list[str]:
    """Install what is missing; return what was added or replaced, for the log."""
    changed: list[str] = []
    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        for family, name in ((socket.AF_INET, "IPv4"), (socket.AF_INET6, "IPv6")):
            have_rule = any(
                r.get("fwmark") == abi.MARK_TO_PROXY and r.get("fwmask") == abi.MARK_MASK
                and r.get("table") == abi.PROXY_ROUTE_TABLE
                for r in ipr.get_rules(family=family)
            )
            if not have_rule:
                ipr.rule("add", family=family, fwmark=abi.MARK_TO_PROXY, fwmask=abi.MARK_MASK,
                         table=abi.PROXY_ROUTE_TABLE, priority=RULE_PRIORITY)
                changed.append(f"{name} rule fwmark {abi.MARK_TO_PROXY:#x}/{abi.MARK_MASK:#x} "
                               f"lookup {abi.PROXY_ROUTE_TABLE}")
            have_route = any(
                r.get("dst_len") == 0 and r.get("type") == 2 and r.get("oif") == lo
                for r in ipr.get_routes(family=family, table=abi.PROXY_ROUTE_TABLE)
            )
            if not have_route:
                extra = {"scope": RT_SCOPE_HOST} if family == socket.AF_INET else {}
                ipr.route("replace", family=family, table=abi.PROXY_ROUTE_TABLE, type="local", oif=lo, dst_len=0,
                          **extra)
                changed.append(f"{name} route local default dev lo table {abi.PROXY_ROUTE_TABLE}")
    return changed
