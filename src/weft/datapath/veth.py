"""Pod interfaces: the veth pair between a pod's netns and the node's netns.

The agent runs inside the node's netns, so the host side is configured with a plain IPRoute
socket. Work inside a pod's netns runs in a dedicated short-lived thread that enters the netns
first (a netns belongs to a thread, not a process), so no thread that does other work ever
changes namespace.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netns import setns

from weft.datapath.netlink import link_index, node_ipr, recycle_node_ipr
from weft.types.addresses import IPAddress

log = logging.getLogger("weft.datapath.veth")
HOST_IF_PREFIX = "lxc"
RTNH_F_ONLINK = 4
T = TypeVar("T")


class LinkError(Exception):
    """A pod interface could not be set up or inspected."""


class LinkExistsError(LinkError):
    """The pod's interface name or the host-side name is taken."""


@dataclass(frozen=True)
class PodAddress:
    address: IPAddress
    gateway: IPAddress


@dataclass
class PodLink:
    """A veth pair just created. The pod side is configured in a thread of its own while the
    caller wires the host side; :meth:`wait` joins it and raises what went wrong there."""

    host_ifname: str
    host_ifindex: int
    host_mac: str
    pod_ifname: str
    pod_mac: str
    _pod_side: threading.Thread | None = None
    _pod_error: list[BaseException] | None = None

    def wait(self) -> None:
        if self._pod_side is not None:
            self._pod_side.join()
            self._pod_side = None
        if self._pod_error:
            raise self._pod_error[0]


def host_ifname_for(container_id: str, ifname: str) -> str:
    """A stable, unique host-side name within IFNAMSIZ (15): ``lxc`` + 11 hex digits."""
    digest = hashlib.sha256(f"{container_id}/{ifname}".encode()).hexdigest()
    return HOST_IF_PREFIX + digest[:11]


def run_in_netns(netns_path: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a fresh thread that has entered ``netns_path``; return its result or raise."""
    if not os.path.exists(netns_path):
        raise LinkError(f"network namespace {netns_path} does not exist")
    box: dict[str, object] = {}

    def worker() -> None:
        try:
            setns(netns_path, flags=0)  # flags=0: never create a missing netns
            box["result"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=worker, name=f"netns:{netns_path}")
    thread.start()
    thread.join()
    if "error" in box:
        err = box["error"]
        assert isinstance(err, BaseException)
        raise err
    return box["result"]  # type: ignore[return-value]


def random_mac() -> str:
    """A random unicast, locally administered MAC (chosen here, so no query is needed)."""
    raw = bytearray(os.urandom(6))
    raw[0] = (raw[0] & 0xFE) | 0x02
    return ":".join(f"{b:02x}" for b in raw)


def create_pod_link(
    netns_path: str,
    container_id: str,
    pod_ifname: str,
    addresses: list[PodAddress],
    mtu: int = 1500,
) -> PodLink:
    """Create the veth pair with its peer directly in the pod's netns, and start configuring the
    pod side (addresses as /32 and /128 without DAD, a default route per family through the
    gateway, "onlink": the datapath answers the gateway's ARP/NDP) in a thread that has entered
    the pod's netns. The caller wires the host side meanwhile, then calls ``wait()``. Undoes
    itself if the pair cannot be made; after that, undoing is the caller's (delete the host side)."""
    host_ifname = host_ifname_for(container_id, pod_ifname)
    host_mac, pod_mac = random_mac(), random_mac()
    try:
        ns_fd = os.open(netns_path, os.O_RDONLY)
    except OSError as exc:
        raise LinkError(f"cannot open network namespace {netns_path}: {exc.strerror}") from exc
    ipr = node_ipr()
    try:
        ipr.link(
            "add", ifname=host_ifname, kind="veth", mtu=mtu, address=host_mac,
            peer={"ifname": pod_ifname, "net_ns_fd": ns_fd, "mtu": mtu, "address": pod_mac},
        )
    except NetlinkError as exc:
        if exc.code == errno.EEXIST:
            raise LinkExistsError(
                f"interface {pod_ifname} already exists in {netns_path} or {host_ifname} on the node"
            ) from exc
        raise LinkError(f"creating veth {host_ifname}/{pod_ifname}: {exc}") from exc
    finally:
        os.close(ns_fd)
    try:
        index = socket.if_nametoindex(host_ifname)
        # No duplicate address detection on the host side: while its link-local address is
        # tentative (1-2 s) the node sends no neighbour solicitation out of it, so the node's first
        # IPv6 packets to the new pod would wait. Nothing else on this link can hold the address.
        _write_sysctl(f"/proc/sys/net/ipv6/conf/{host_ifname}/accept_dad", "0")
        ipr.link("set", index=index, state="up")
    except BaseException:
        delete_host_link(host_ifname)
        raise
    errors: list[BaseException] = []

    def pod_side() -> None:
        try:
            setns(netns_path, flags=0)  # flags=0: never create a missing netns
            _configure_pod_side(pod_ifname, addresses)
        except BaseException as exc:  # handed to the caller by wait()
            errors.append(exc)

    thread = threading.Thread(target=pod_side, name=f"netns:{netns_path}")
    thread.start()
    return PodLink(host_ifname, index, host_mac, pod_ifname, pod_mac, thread, errors)


def _write_sysctl(path: str, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError:
        pass  # absent for this family: nothing to configure


def _configure_pod_side(pod_ifname: str, addresses: list[PodAddress]) -> None:
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=pod_ifname)
        if not found:
            raise LinkError(f"{pod_ifname} did not appear in the pod's netns")
        index = found[0]
        for pa in addresses:
            if pa.address.version == 6:
                # Make sure IPv6 is on for the pod's interface even if the netns defaulted it off.
                _write_sysctl(f"/proc/sys/net/ipv6/conf/{pod_ifname}/disable_ipv6", "0")
                _write_sysctl(f"/proc/sys/net/ipv6/conf/{pod_ifname}/accept_dad", "0")
        ipr.link("set", index=index, state="up")
        for pa in addresses:
            kwargs: dict[str, object] = {}
            if pa.address.version == 6:
                kwargs["flags"] = 0x02 | 0x80  # IFA_F_NODAD | IFA_F_PERMANENT-like: usable at once
            ipr.addr("add", index=index, address=str(pa.address), prefixlen=pa.address.max_prefixlen,
                     **kwargs)
            family_default = "0.0.0.0/0" if pa.address.version == 4 else "::/0"
            # One route per family: "onlink" says the gateway is on the link, so no separate
            # host route to it is needed (the datapath answers its ARP/NDP).
            ipr.route("add", dst=family_default, gateway=str(pa.gateway), oif=index, flags=RTNH_F_ONLINK)



def delete_host_link(host_ifname: str) -> bool:
    """Delete the host side (the kernel removes the peer with it). False if it was already gone."""
    index = link_index(host_ifname)
    if index is None:
        return False
    try:
        node_ipr().link("del", index=index)
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:
            return False
        raise
    return True


def host_link_index(host_ifname: str) -> int | None:
    return link_index(host_ifname)


def list_host_links() -> dict[str, int]:
    """Every ``lxc*`` link in the calling thread's netns: name -> ifindex. if_nameindex(3) does
    the netlink dump in C and returns names only: a full decoded dump of hundreds of links would
    cost the agent megabytes of short-lived objects on every reconcile."""
    return {name: index for index, name in socket.if_nameindex() if name.startswith(HOST_IF_PREFIX)}


def add_node_routes(host_ifname: str, addresses: list[IPAddress], ifindex: int | None = None) -> None:
    """Routes in the node's netns to the pod through its veth, so the node itself reaches pods."""
    ipr = node_ipr()
    index = ifindex if ifindex is not None else socket.if_nametoindex(host_ifname)
    for ip in addresses:
        try:
            ipr.route("replace", dst=f"{ip}/{ip.max_prefixlen}", oif=index, scope=253)
        except NetlinkError as exc:
            # IPv6 is disabled on the host veth; such routes need no link-local there.
            if exc.code not in (errno.EACCES, errno.EPERM, errno.ENETUNREACH, errno.EINVAL):
                raise


@dataclass(frozen=True)
class PodSideState:
    ifname: str
    mac: str
    addresses: list[str]
    up: bool


def inspect_pod_side(netns_path: str, pod_ifname: str) -> PodSideState | None:
    """What the pod's interface looks like now (for CNI CHECK); None if it is missing."""

    def look() -> PodSideState | None:
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=pod_ifname)
            if not found:
                return None
            link = ipr.get_links(found[0])[0]
            addrs = [
                f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"
                for a in ipr.get_addr(index=found[0])
                if not ipaddress.ip_address(a.get_attr("IFA_ADDRESS")).is_link_local
            ]
            up = bool(link["flags"] & 1)
            return PodSideState(pod_ifname, str(link.get_attr("IFLA_ADDRESS")), addrs, up)

    return run_in_netns(netns_path, look)


def delete_pod_link(netns_path: str, pod_ifname: str) -> None:
    """Remove a leftover pod-side interface (before re-creating a lost pair)."""

    def remove() -> None:
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=pod_ifname)
            if found:
                ipr.link("del", index=found[0])

    run_in_netns(netns_path, remove)


class LinkReaper:
    """Deletes host-side links in the background.

    Unregistering a veth takes the kernel about 20 ms (it waits for RCU grace periods); a CNI
    DEL has already removed the endpoint's map entries, so nothing reaches the pod any more and
    the runtime need not wait for the link to vanish. A later ADD that would create a link of
    the same name first waits for its pending deletion (:meth:`wait`). Links still pending when
    the agent dies are found by the next reconcile (links without an endpoint are removed).
    """

    def __init__(self) -> None:
        self._queue: queue.Queue[str] = queue.Queue()
        self._pending: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="link-reaper", daemon=True)
        self._thread.start()

    def delete(self, host_ifname: str) -> None:
        with self._lock:
            self._pending.setdefault(host_ifname, threading.Event())
        self._queue.put(host_ifname)

    def wait(self, host_ifname: str, timeout: float = 30.0) -> None:
        with self._lock:
            event = self._pending.get(host_ifname)
        if event is not None and not event.wait(timeout):
            raise LinkError(f"{host_ifname} is still being deleted after {timeout:g}s")

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def drain(self, timeout: float = 30.0) -> bool:
        """Wait until every queued deletion is done; False if the deadline passed first."""
        deadline = time.monotonic() + timeout
        with self._lock:
            events = list(self._pending.values())
        return all(e.wait(max(0.0, deadline - time.monotonic())) for e in events)

    def _run(self) -> None:
        while True:
            name = self._queue.get()
            try:
                delete_host_link(name)
            except Exception as exc:  # the link may vanish with its netns at any moment
                log.warning("deleting %s: %s", name, exc)
            finally:
                recycle_node_ipr()
                with self._lock:
                    event = self._pending.pop(name, None)
                if event is not None:
                    event.set()
