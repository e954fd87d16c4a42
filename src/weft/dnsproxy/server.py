"""The DNS proxy process: transparent sockets, the query path, learning, expiry, state, hand-over.

One process, one asyncio loop (measured: about 55,000 plain UDP forwards/s on this project's 2-vCPU
machines, so the parse/decide/learn work fits a 20,000 queries/s budget in one core; see the
package README in docs). UDP sockets are read in batches from ``add_reader`` callbacks, with no
task or future per query; TCP uses asyncio streams.

Query path (UDP): ``recvmsg`` on the transparent listener gives the pod's address and, from
IP_ORIGDSTADDR, the original destination -> the endpoint (by source address) -> the peer identity
of the destination (pinned maps) -> the endpoint's DNS rules decide. Denied: answered REFUSED (or
NXDOMAIN) from the original destination, never forwarded. Allowed: forwarded from the node's own
address with a fresh transaction id; the response is matched by socket, id, source and question;
the addresses of every name of its CNAME chain that a toFQDNs selector of the endpoint matches are
written into ``weft_fqdn`` (a synchronous map update) and only then is the response sent to the pod
from a transparent socket bound to the original destination address and port.

Upstream failures: no answer within ``upstream_timeout_s`` -> the pod gets nothing (as Cilium: its
resolver retries); a send error or an unusable response -> SERVFAIL.

Restart without outage: a new process asks the running one for its listening sockets over the
control socket (``handover``, SCM_RIGHTS); the old one stops reading them at once, finishes its
in-flight queries, saves its state and says ``done``; the new one merges that state. The sockets
never close, so queued queries are served by the new process.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import json
import logging
import os
import random
import socket
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weft.datapath import abi
from weft.dnsproxy import control
from weft.dnsproxy.config import DnsProxySettings, ProxyRules, default_socket_path, rules_path
from weft.dnsproxy.dpmaps import ProxyMaps, Slots, ct_alive, ct_pair, packed
from weft.dnsproxy.l7ring import REQUEST, RESPONSE, VERDICT_DROPPED, VERDICT_ERROR, VERDICT_FORWARDED, L7Ring
from weft.dnsproxy.rules import CompiledEndpoint, CompiledRules, RulesError, merge_slots
from weft.dnsproxy.wire import (
    RCODE_NXDOMAIN,
    RCODE_REFUSED,
    RCODE_SERVFAIL,
    DnsMessageError,
    WireQuery,
    error_response,
    parse_wire_query,
    parse_wire_response,
    rcode_of,
    rcode_text,
    same_question,
)
from weft.fqdn.cache import NameCache
from weft.fqdn.dnsmsg import CATEGORIES, Response
from weft.types.addresses import IPAddress

log = logging.getLogger("weft.dnsproxy")

SOL_IP, SOL_IPV6 = 0, 41
IP_TRANSPARENT, IP_RECVORIGDSTADDR = 19, 20
IPV6_RECVORIGDSTADDR, IPV6_TRANSPARENT = 74, 75
SO_RCVBUFFORCE = 33  # root may exceed net.core.rmem_max (not in Python's socket module)
PROTO_TCP, PROTO_UDP = 6, 17

# A query larger than this is "oversized": real ones are under 300 octets, and 1232 is the EDNS
# size DNS Flag Day 2020 settled on, so nothing legitimate comes near it over UDP.
MAX_UDP_QUERY = 1232
MAX_QUERY_SIZE = 4096  # over TCP
MAX_UDP_RESPONSE = 65535
UDP_BATCH = 64  # datagrams read per wake-up before yielding to the loop
RECV_BUF = 4 << 20  # socket buffers: bursts must queue, not drop
UPSTREAM_SOCKETS = 4  # per family: more source ports, and 4 x 65536 transaction ids in flight
REPLY_SOCKETS_MAX = 256  # transparent sockets bound to original destinations, kept open
TCP_IDLE_S = 10.0  # an idle DNS-over-TCP client is closed (RFC 7766 leaves it to the server)
TCP_CLIENTS_MAX = 1024
TCP_DRAIN_IDLE_S = 0.5  # on hand-over, how long an idle TCP client may still send a query
EXPIRY_INTERVAL_S = 1.0
SAVE_INTERVAL_S = 1.0
SAVE_INTERVAL_MAX_S = 10.0
CT_WALK_CHUNK = 256  # conntrack entries read between two yields to the loop
RECENT_MAX = 65536
PARSED_MAX = 4096  # responses kept parsed, by their bytes after the id
NAMES_PER_ENDPOINT = 1024  # names kept in the `names` report per endpoint
HANDOVER_DONE_TIMEOUT_S = 30.0
LISTENER_NAMES = ("udp4", "udp6", "tcp4", "tcp6")

COUNTERS = (
    "queries", "queries_udp", "queries_tcp", "allowed", "denied", "forwarded", "responses",
    "upstream_errors", "upstream_timeouts", "upstream_malformed", "upstream_unmatched", "servfail_sent",
    "unknown_source", "no_original_destination", "learned_addresses", "refreshed_addresses",
    "rejected_addresses", "skipped_cluster_addresses", "evictions", "expired", "zombies", "slot_replacements",
    "map_errors", "send_errors", "tcp_connections", "tcp_rejected", "throttled", "handovers",
    *(f"malformed_{c}" for c in CATEGORIES),
)


@dataclass(slots=True)
class Pending:
    """A UDP query forwarded upstream, waiting for its response."""

    query: WireQuery
    endpoint: CompiledEndpoint
    client: tuple[Any, ...]  # the pod's (address, port[, flow, scope])
    orig: tuple[str, int]  # original destination: where the query went and whence the answer comes
    v6: bool
    started: float


@dataclass
class NameStats:
    count: int = 0
    allowed: int = 0
    denied: int = 0
    last_rcode: str = ""
    last_seen: float = 0.0  # wall clock


@dataclass
class TcpClient:
    busy: bool = False
    task: asyncio.Task[None] | None = None


@dataclass
class ProxyPaths:
    state_dir: Path
    pin_dir: Path
    socket_path: Path

    @property
    def cache_path(self) -> Path:
        return self.state_dir / "dnsproxy" / "cache.json"

    @property
    def rules_path(self) -> Path:
        return rules_path(self.state_dir)


def boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _parse_origdst(ancdata: Iterable[tuple[int, int, bytes]]) -> tuple[str, int] | None:
    for level, kind, data in ancdata:
        if level == SOL_IP and kind == IP_RECVORIGDSTADDR and len(data) >= 8:
            return socket.inet_ntop(socket.AF_INET, data[4:8]), (data[2] << 8) | data[3]
        if level == SOL_IPV6 and kind == IPV6_RECVORIGDSTADDR and len(data) >= 24:
            return socket.inet_ntop(socket.AF_INET6, data[8:24]), (data[2] << 8) | data[3]
    return None


def open_listeners(port: int) -> dict[str, socket.socket]:
    """The four transparent listeners, bound to the wildcard addresses on ``port``."""
    out: dict[str, socket.socket] = {}
    try:
        for name, family, kind in (("udp4", socket.AF_INET, socket.SOCK_DGRAM),
                                   ("udp6", socket.AF_INET6, socket.SOCK_DGRAM),
                                   ("tcp4", socket.AF_INET, socket.SOCK_STREAM),
                                   ("tcp6", socket.AF_INET6, socket.SOCK_STREAM)):
            sock = socket.socket(family, kind)
            out[name] = sock
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
            else:
                sock.setsockopt(SOL_IP, IP_TRANSPARENT, 1)
            if kind == socket.SOCK_DGRAM:
                sock.setsockopt(SOL_IPV6 if family == socket.AF_INET6 else SOL_IP,
                                IPV6_RECVORIGDSTADDR if family == socket.AF_INET6 else IP_RECVORIGDSTADDR, 1)
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECV_BUF)
            else:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
            if kind == socket.SOCK_STREAM:
                sock.listen(1024)
            sock.setblocking(False)
    except BaseException:
        for sock in out.values():
            sock.close()
        raise
    return out


class RateLimitedLog:
    """At most ``per_second`` lines a second; the rest are counted and summarized."""

    def __init__(self, per_second: int = 20) -> None:
        self.per_second = per_second
        self.window = 0
        self.used = 0
        self.suppressed = 0

    def warning(self, msg: str, *args: object) -> None:
        now = int(time.monotonic())
        if now != self.window:
            if self.suppressed:
                log.warning("(%d similar lines suppressed)", self.suppressed)
            self.window, self.used, self.suppressed = now, 0, 0
        if self.used < self.per_second:
            self.used += 1
            log.warning(msg, *args)
        else:
            self.suppressed += 1


class DnsProxy:
    def __init__(self, settings: DnsProxySettings, paths: ProxyPaths, node_name: str = "") -> None:
        self.settings = settings
        self.paths = paths
        self.node_name = node_name
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.rules = CompiledRules.empty()
        self.rules_error = ""
        self.rules_loaded_at = 0.0
        self.maps = ProxyMaps(paths.pin_dir)
        self.maps_error = ""
        self.cache = NameCache(min_ttl=settings.min_ttl, grace=settings.grace_seconds,
                               max_ips_per_name=settings.max_ips_per_name, is_live=self._is_live)
        # (ep_id, address) -> map slots not explained by the name cache: written by a previous
        # process whose state we did not get. They expire like any slot.
        self.orphans: dict[tuple[int, IPAddress], Slots] = {}
        # (ep_id, packed address) pairs with a live connection, from the last conntrack walk.
        self.live_pairs: set[tuple[int, bytes]] = set()
        # (ep_id, response bytes after the id) -> when it was last learned: the same answer again
        # within the slack skips parsing, the cache and the map (see _learn_from).
        self.recent: dict[tuple[int, bytes], float] = {}
        self.slack = min(settings.grace_seconds / 2, 2.0)
        self.parsed: dict[bytes, Response] = {}
        self.next_expiry = 0.0  # monotonic seconds: no learned entry expires before this
        self.save_interval = SAVE_INTERVAL_S
        self.names: dict[int, dict[str, NameStats]] = {}
        self.deny_rcode = RCODE_NXDOMAIN if settings.deny_response == "nxdomain" else RCODE_REFUSED
        self.started_wall = time.time()
        self.listeners: dict[str, socket.socket] = {}
        self.upstream: dict[bool, list[socket.socket]] = {}
        self.pending: dict[tuple[bool, int, int], Pending] = {}
        # (deadline, key, the query's start time): not the Pending itself, so an answered query is
        # freed at once rather than when its deadline passes (at 20,000 queries/s and a 2 s
        # timeout that is 40,000 objects kept alive for nothing).
        self.timeouts: collections.deque[tuple[float, tuple[bool, int, int], float]] = collections.deque()
        self.reply_socks: collections.OrderedDict[tuple[str, int], socket.socket] = collections.OrderedDict()
        self.tcp_clients: dict[int, TcpClient] = {}
        self._rr = 0
        self._buf = bytearray(MAX_UDP_RESPONSE)
        self._view = memoryview(self._buf)
        self._tasks: list[asyncio.Task[None]] = []
        self.dirty = False
        self.serving = False
        self.paused = False  # expiry and saving stop while a hand-over is under way
        self.stopping = asyncio.Event()
        self.control: control.ControlServer | None = None
        self.denied_log = RateLimitedLog()
        self.drop_log = RateLimitedLog()
        self.handed_over_from = 0
        self.l7 = L7Ring()  # L7 DNS records for the agent's flows (see weft.dnsproxy.l7ring)

    # ================================================================== start-up
    def load_rules(self) -> dict[str, Any]:
        """Read rules.json: missing = no endpoints; unreadable = keep the previous rules and
        report the error. Endpoints that vanished lose their learned addresses."""
        path = self.paths.rules_path
        try:
            compiled = CompiledRules.compile(ProxyRules.load(path)) if path.exists() else CompiledRules.empty()
        except (OSError, ValueError, RulesError) as exc:
            self.rules_error = f"{path}: {exc}"
            log.error("rules not loaded, keeping revision %d: %s", self.rules.revision, self.rules_error)
            return {"loaded": False, "revision": self.rules.revision, "error": self.rules_error}
        old = self.rules
        self.rules = compiled
        self.rules_error = ""
        self.rules_loaded_at = time.time()
        self.recent.clear()
        self.maps.forget_peers()
        vanished = [ep for ep in old.endpoints if ep not in compiled.endpoints]
        changed = [ep for ep, new in compiled.endpoints.items()
                   if ep in old.endpoints and old.endpoints[ep].selectors != new.selectors]
        for ep_id in vanished:
            self._forget_endpoint(ep_id)
        for ep_id in changed:
            self._resync_endpoint(ep_id)
        for ep_id in vanished:
            self.names.pop(ep_id, None)
        log.info("rules revision %d: %d endpoint(s)%s%s", compiled.revision, len(compiled.endpoints),
                 f", {len(vanished)} gone" if vanished else "",
                 f", {len(changed)} with new selectors" if changed else "")
        return {"loaded": True, "revision": compiled.revision, "endpoints": len(compiled.endpoints),
                "vanished": vanished, "selectors_changed": changed}

    def open_maps(self) -> bool:
        if self.maps.is_open:
            return True
        try:
            self.maps.open()
        except OSError as exc:
            self.maps_error = f"datapath maps under {self.paths.pin_dir} not available: {exc}"
            return False
        self.maps_error = ""
        log.info("datapath maps opened under %s", self.paths.pin_dir)
        self.reconcile_map()
        return True

    def load_state(self) -> None:
        """The name cache as the previous process saved it (if any)."""
        path = self.paths.cache_path
        if not path.exists():
            return
        try:
            data = json.loads(path.read_text())
            self.cache = NameCache.from_json(data, time.time(), time.monotonic(), boot_id(), is_live=self._is_live,
                                             min_ttl=self.settings.min_ttl, grace=self.settings.grace_seconds,
                                             max_ips_per_name=self.settings.max_ips_per_name)
        except (OSError, ValueError) as exc:
            log.error("name cache %s not readable, starting from the datapath's entries only: %s", path, exc)
            return
        self.next_expiry = 0.0
        log.info("name cache restored: %d entries", len(self.cache))

    def merge_state(self) -> None:
        """After a hand-over: add what the old process learned after our start (its final save)."""
        path = self.paths.cache_path
        try:
            theirs = json.loads(path.read_text())
            wall, mono, boot = time.time(), time.monotonic(), boot_id()
            ours = self.cache.to_json(wall, mono, boot)
            other = NameCache.from_json(theirs, wall, mono, boot).to_json(wall, mono, boot)
        except (OSError, ValueError) as exc:
            log.error("state of the previous process not merged: %s", exc)
            return
        rows: dict[tuple[int, str, str], dict[str, Any]] = {}
        for row in [*other["entries"], *ours["entries"]]:
            key = (row["ep"], row["name"], row["address"])
            have = rows.get(key)
            if have is None or row["expiry"] > have["expiry"]:
                rows[key] = row
        ours["entries"] = list(rows.values())
        self.cache = NameCache.from_json(ours, wall, mono, boot, is_live=self._is_live,
                                         min_ttl=self.settings.min_ttl, grace=self.settings.grace_seconds,
                                         max_ips_per_name=self.settings.max_ips_per_name)
        self.recent.clear()
        self.dirty = True
        self.next_expiry = 0.0
        log.info("merged the previous process's state: %d entries", len(self.cache))

    def reconcile_map(self) -> None:
        """Make weft_fqdn and the cache agree: entries the cache explains are rewritten if
        missing; slots it does not explain are kept as orphans (they expire unless live)."""
        if not self.maps.is_open:
            return
        explained: dict[tuple[int, IPAddress], Slots] = {}
        for ep_id in self.cache.endpoints():
            for address in self.cache.addresses_for(ep_id):
                explained[(ep_id, address)] = self._desired_from_cache(ep_id, address)
        self.orphans.clear()
        try:
            for ep_id, address, slots in list(self.maps.fqdn_entries()):
                want = explained.get((ep_id, address), {})
                extra = {ident: exp for ident, exp in slots.items() if ident not in want}
                if extra:
                    self.orphans[(ep_id, address)] = extra
            for (ep_id, address), want in explained.items():
                if want:
                    self._merge_write(ep_id, address, want)
        except OSError as exc:
            self.counters["map_errors"] += 1
            log.error("weft_fqdn reconcile failed: %s", exc)
        self.next_expiry = 0.0
        if self.orphans:
            log.info("%d datapath entries not in the name cache kept until they expire", len(self.orphans))

    # ================================================================== serving
    def serve_sockets(self, listeners: dict[str, socket.socket]) -> None:
        loop = asyncio.get_running_loop()
        self.listeners = listeners
        for v6 in (False, True):
            family = socket.AF_INET6 if v6 else socket.AF_INET
            socks = []
            for _ in range(UPSTREAM_SOCKETS):
                s = socket.socket(family, socket.SOCK_DGRAM)
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECV_BUF)
                s.bind(("::" if v6 else "0.0.0.0", 0))
                s.setblocking(False)
                socks.append(s)
            self.upstream[v6] = socks
            for index, s in enumerate(socks):
                loop.add_reader(s.fileno(), self._on_upstream, s, v6, index)
        loop.add_reader(listeners["udp4"].fileno(), self._on_udp, listeners["udp4"], False)
        loop.add_reader(listeners["udp6"].fileno(), self._on_udp, listeners["udp6"], True)
        loop.add_reader(listeners["tcp4"].fileno(), self._on_accept, listeners["tcp4"])
        loop.add_reader(listeners["tcp6"].fileno(), self._on_accept, listeners["tcp6"])
        self.serving = True

    def stop_listening(self) -> None:
        """Stop reading the listeners (a successor reads them now, or we are stopping)."""
        loop = asyncio.get_running_loop()
        for sock in self.listeners.values():
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(sock.fileno())
        self.serving = False

    # ------------------------------------------------------------------ UDP queries
    def _on_udp(self, sock: socket.socket, v6: bool) -> None:
        view = self._view
        for _ in range(UDP_BATCH):
            if not self.serving:
                return
            try:
                size, ancdata, _flags, peer = sock.recvmsg_into([view], 64)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.drop_log.warning("recvmsg on the %s listener: %s", "udp6" if v6 else "udp4", exc)
                return
            orig = _parse_origdst(ancdata)
            if orig is None:
                self.counters["no_original_destination"] += 1
                continue
            self._query(bytes(view[:size]), peer, orig, v6, PROTO_UDP)

    def _query(self, data: bytes, peer: tuple[Any, ...], orig: tuple[str, int], v6: bool, proto: int) -> None:
        counters = self.counters
        counters["queries"] += 1
        counters["queries_udp" if proto == PROTO_UDP else "queries_tcp"] += 1
        try:
            query = parse_wire_query(data, max_size=MAX_UDP_QUERY if proto == PROTO_UDP else MAX_QUERY_SIZE)
        except DnsMessageError as exc:
            counters["malformed_" + exc.category] += 1
            self.drop_log.warning("dropped a malformed query from %s to %s:%d (%s)", peer[0], orig[0], orig[1], exc)
            return
        endpoint = self.rules.by_address.get(peer[0])
        if endpoint is None:
            counters["unknown_source"] += 1
            self.denied_log.warning("query for %s from unknown source %s refused", query.qname, peer[0])
            self._reply_udp(orig, peer, v6, error_response(query, RCODE_REFUSED))
            return
        wall_ns = time.time_ns()
        if not self.maps.is_open:
            # Without the maps nothing can be learned or decided: the datapath is not loaded.
            self._note(endpoint, query.qname, False, "SERVFAIL")
            servfail = self._servfail(query)
            self._l7(wall_ns, REQUEST, endpoint, query, peer, orig, proto, VERDICT_FORWARDED)
            self._l7(wall_ns, RESPONSE, endpoint, query, peer, orig, proto, VERDICT_ERROR, 0, servfail)
            self._reply_udp(orig, peer, v6, servfail)
            return
        peer_identity = self.maps.peer(orig[0]).identity
        if not endpoint.allows(peer_identity, proto, orig[1], query.qname):
            counters["denied"] += 1
            # As Cilium's proxy: a denied query is one L7 REQUEST record with verdict DROPPED.
            self._l7(wall_ns, REQUEST, endpoint, query, peer, orig, proto, VERDICT_DROPPED)
            rcode = rcode_text(self.deny_rcode)
            self._note(endpoint, query.qname, False, rcode)
            self.denied_log.warning("denied %s %s from %s (%s) to %s:%d (identity %d): %s", query.qtype_text,
                                    query.qname, peer[0], endpoint.pod, orig[0], orig[1], peer_identity, rcode)
            self._reply_udp(orig, peer, v6, error_response(query, self.deny_rcode))
            return
        counters["allowed"] += 1
        self._l7(wall_ns, REQUEST, endpoint, query, peer, orig, proto, VERDICT_FORWARDED)
        if len(self.pending) >= self.settings.max_pending:
            # Overload: the upstream is not keeping up. Dropped (the pod's resolver retries), as
            # Cilium's DNS proxy concurrency limit does, and counted: memory stays bounded.
            counters["throttled"] += 1
            self._note(endpoint, query.qname, True, "THROTTLED")
            return
        self._forward_udp(query, endpoint, peer, orig, v6)

    def _forward_udp(self, query: WireQuery, endpoint: CompiledEndpoint, peer: tuple[Any, ...],
                     orig: tuple[str, int], v6: bool) -> None:
        socks = self.upstream[v6]
        self._rr = index = (self._rr + 1) % len(socks)
        getrandbits = random.getrandbits
        txid = getrandbits(16)
        key = (v6, index, txid)
        while key in self.pending:
            txid = getrandbits(16)
            key = (v6, index, txid)
        try:
            socks[index].sendto(struct.pack("!H", txid) + query.raw[2:], orig)
        except OSError as exc:
            self.counters["upstream_errors"] += 1
            self.drop_log.warning("forwarding %s to %s:%d failed: %s", query.qname, orig[0], orig[1], exc)
            self._note(endpoint, query.qname, True, "SERVFAIL")
            servfail = self._servfail(query)
            self._l7(time.time_ns(), RESPONSE, endpoint, query, peer, orig, PROTO_UDP, VERDICT_ERROR, 0, servfail)
            self._reply_udp(orig, peer, v6, servfail)
            return
        self.counters["forwarded"] += 1
        now = time.monotonic()
        pending = Pending(query, endpoint, peer, orig, v6, now)
        self.pending[key] = pending
        self.timeouts.append((now + self.settings.upstream_timeout_s, key, now))

    def _on_upstream(self, sock: socket.socket, v6: bool, index: int) -> None:
        view = self._view
        for _ in range(UDP_BATCH):
            try:
                size, source = sock.recvfrom_into(view)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # e.g. ECONNREFUSED from an ICMP port unreachable: the query times out or was answered.
                continue
            if size < 12:
                self.counters["upstream_unmatched"] += 1
                continue
            key = (v6, index, (view[0] << 8) | view[1])
            pending = self.pending.get(key)
            data = bytes(view[:size])
            if pending is None or (source[0], source[1]) != pending.orig or not same_question(pending.query, data):
                # Late (timed out), or not from where the query went: never passed on.
                self.counters["upstream_unmatched"] += 1
                continue
            del self.pending[key]
            self._answer(pending, data)

    def _answer(self, pending: Pending, data: bytes) -> None:
        """Learn from the response, then release it to the pod (UDP)."""
        servfails = self.counters["servfail_sent"]
        out = self._learn_from(pending.endpoint, pending.query, data)
        latency_ns = int((time.monotonic() - pending.started) * 1e9)
        # A SERVFAIL of our own (unusable answer, datapath not updated) is an error, as Cilium reports it.
        verdict = VERDICT_ERROR if self.counters["servfail_sent"] != servfails else VERDICT_FORWARDED
        self._l7(time.time_ns(), RESPONSE, pending.endpoint, pending.query, pending.client, pending.orig, PROTO_UDP,
                 verdict, latency_ns, out)
        self._reply_udp(pending.orig, pending.client, pending.v6, out)

    def _l7(self, wall_ns: int, kind: int, endpoint: CompiledEndpoint, query: WireQuery, client: tuple[Any, ...],
            orig: tuple[str, int], proto: int, verdict: str, latency_ns: int = 0, wire: bytes = b"") -> None:
        """One L7 record: a tuple appended to the ring, nothing parsed or built here."""
        self.l7.add(wall_ns, kind, endpoint.ep_id, endpoint.pod, client, orig, proto, query.qname, query.qtype_text,
                    verdict, latency_ns, wire)

    def _learn_from(self, endpoint: CompiledEndpoint, query: WireQuery, data: bytes) -> bytes:
        """The bytes to send to the pod for upstream response ``data``: the response with the
        pod's transaction id, after its addresses are in the datapath; SERVFAIL if it is unusable."""
        self.counters["responses"] += 1
        rcode = rcode_of(data)
        if endpoint.selectors and rcode == 0:
            body = data[2:]
            now = time.monotonic()
            memo_key = (endpoint.ep_id, body)
            learned_at = self.recent.get(memo_key)
            # The same answer to the same endpoint within the slack: the datapath already allows
            # its addresses until at least their TTL plus half the grace from now; skip it all.
            if learned_at is None or now - learned_at > self.slack:
                # A resolver sends the same bytes for the same answer (until its TTL ticks).
                response = self.parsed.get(body)
                try:
                    if response is None:
                        response = parse_wire_response(data, max_size=MAX_UDP_RESPONSE)
                        if len(self.parsed) >= PARSED_MAX:
                            self.parsed.clear()
                        self.parsed[body] = response
                except DnsMessageError as exc:
                    self.counters["upstream_malformed"] += 1
                    self.drop_log.warning("unusable response for %s from upstream (%s): SERVFAIL", query.qname, exc)
                    self._note(endpoint, query.qname, True, "SERVFAIL")
                    return self._servfail(query)
                if response.answers:
                    try:
                        self._learn(endpoint, response, now)
                    except OSError as exc:
                        # Not in the datapath: releasing the answer would let the pod connect and fail.
                        self.counters["map_errors"] += 1
                        log.error("weft_fqdn update for %s failed: %s; SERVFAIL", query.qname, exc)
                        self._note(endpoint, query.qname, True, "SERVFAIL")
                        return self._servfail(query)
                if len(self.recent) >= RECENT_MAX:
                    self.recent.clear()
                self.recent[memo_key] = now
        self._note(endpoint, query.qname, True, rcode_text(rcode))
        return query.raw[:2] + data[2:]

    def _servfail(self, query: WireQuery) -> bytes:
        self.counters["servfail_sent"] += 1
        return error_response(query, RCODE_SERVFAIL)

    def _reply_udp(self, orig: tuple[str, int], client: tuple[Any, ...], v6: bool, data: bytes) -> None:
        try:
            self._reply_socket(orig, v6).sendto(data, client)
        except OSError as exc:
            self.counters["send_errors"] += 1
            self.drop_log.warning("reply to %s from %s:%d failed: %s", client[0], orig[0], orig[1], exc)

    def _reply_socket(self, orig: tuple[str, int], v6: bool) -> socket.socket:
        """A transparent UDP socket bound to the original destination: the pod's resolver only
        accepts an answer from the address and port it asked."""
        sock = self.reply_socks.get(orig)
        if sock is not None:
            return sock
        family = socket.AF_INET6 if v6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if v6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
            else:
                sock.setsockopt(SOL_IP, IP_TRANSPARENT, 1)
            # Another proxy process (during a hand-over) may hold the same binding.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(orig)
            sock.setblocking(False)
            # It only sends: whatever reaches it (nothing should: the datapath assigns the
            # listener to queries) must not fill its buffer.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
        except OSError:
            sock.close()
            raise
        self.reply_socks[orig] = sock
        if len(self.reply_socks) > REPLY_SOCKETS_MAX:
            _, oldest = self.reply_socks.popitem(last=False)
            oldest.close()
        return sock

    # ------------------------------------------------------------------ learning
    def _excluded(self, address: IPAddress) -> bool:
        if self.rules.in_cluster(address):
            return True
        return self.maps.peer(str(address)).local_endpoint

    def _learn(self, endpoint: CompiledEndpoint, response: Response, now: float) -> None:
        """Write the addresses of every selected name of the response into weft_fqdn (before
        the caller releases the response)."""
        ep_id = endpoint.ep_id
        settings = self.settings
        for name, answer in response.answers.items():
            selector_ids = endpoint.selector_ids(name)
            if not selector_ids:
                continue
            expiry = now + max(answer.ttl, settings.min_ttl) + settings.grace_seconds
            self.next_expiry = min(self.next_expiry, expiry)
            kept = [a for a in answer.addresses if not self._excluded(a)]
            skipped = len(answer.addresses) - len(kept)
            if skipped:
                self.counters["skipped_cluster_addresses"] += skipped
            if not kept:
                continue
            result = self.cache.learn(ep_id, name, kept, answer.ttl, now,
                                      source="lookup" if name == response.qname else "cname")
            self.counters["learned_addresses"] += len(result.added)
            self.counters["refreshed_addresses"] += len(result.refreshed)
            self.counters["rejected_addresses"] += len(result.rejected)
            expires_ns = int(expiry * 1e9)
            for _, address in result.added + result.refreshed:
                self._merge_write(ep_id, address, dict.fromkeys(selector_ids, expires_ns))
            if result.evicted:
                self.counters["evictions"] += len(result.evicted)
                log.info("endpoint %d: %s over %d addresses, evicted %s", ep_id, name, settings.max_ips_per_name,
                         ", ".join(str(a) for _, a in result.evicted))
                self._sync_entries((ep_id, a) for _, a in result.evicted)
                self.recent.clear()
            self.dirty = True

    def _merge_write(self, ep_id: int, address: IPAddress, updates: Slots) -> None:
        current = self.maps.read_slots(ep_id, address)
        merged, gave_way = merge_slots(current, updates, abi.FQDN_SLOTS)
        if merged != current:
            self.maps.write_slots(ep_id, address, merged)
        if gave_way:
            self.counters["slot_replacements"] += len(gave_way)
            log.warning("endpoint %d address %s: more than %d selectors, slot(s) of selector identity %s replaced",
                        ep_id, address, abi.FQDN_SLOTS, ", ".join(map(str, gave_way)))

    def _desired_from_cache(self, ep_id: int, address: IPAddress,
                            held: dict[IPAddress, dict[str, float]] | None = None) -> Slots:
        endpoint = self.rules.endpoints.get(ep_id)
        if endpoint is None:
            return {}
        names = (held if held is not None else self.cache.addresses_for(ep_id)).get(address, {})
        slots: Slots = {}
        for name, expiry in names.items():
            for identity in endpoint.selector_ids(name):
                slots[identity] = max(slots.get(identity, 0), int(expiry * 1e9))
        return slots

    def _sync_entries(self, pairs: Iterable[tuple[int, IPAddress]]) -> None:
        """Bring the map entries of ``pairs`` to what the cache and the orphans say, dropping
        slots nothing explains any more. A slot kept keeps the later of both expiries."""
        held_by_ep: dict[int, dict[IPAddress, dict[str, float]]] = {}
        for ep_id, address in dict.fromkeys(pairs):
            held = held_by_ep.get(ep_id)
            if held is None:
                held = held_by_ep[ep_id] = self.cache.addresses_for(ep_id)
            want = self._desired_from_cache(ep_id, address, held)
            for identity, expires in self.orphans.get((ep_id, address), {}).items():
                want[identity] = max(want.get(identity, 0), expires)
            try:
                current = self.maps.read_slots(ep_id, address)
                target = {ident: max(exp, current.get(ident, 0)) for ident, exp in want.items()}
                if len(target) > abi.FQDN_SLOTS:
                    target, _ = merge_slots({}, target, abi.FQDN_SLOTS)
                if target != current:
                    self.maps.write_slots(ep_id, address, target)
            except OSError as exc:
                self.counters["map_errors"] += 1
                log.error("weft_fqdn update for endpoint %d %s failed: %s", ep_id, address, exc)

    def _forget_endpoint(self, ep_id: int) -> None:
        held = self.cache.forget_endpoint(ep_id)
        addresses = {a for _, a in held} | {a for (ep, a) in self.orphans if ep == ep_id}
        for address in addresses:
            self.orphans.pop((ep_id, address), None)
        if not self.maps.is_open:
            return
        try:
            for address in addresses:
                self.maps.write_slots(ep_id, address, {})
            # Entries another process wrote that we never knew of.
            for other_ep, address, _ in list(self.maps.fqdn_entries()):
                if other_ep == ep_id:
                    self.maps.write_slots(ep_id, address, {})
        except OSError as exc:
            self.counters["map_errors"] += 1
            log.error("removing endpoint %d's weft_fqdn entries failed: %s", ep_id, exc)
        self.dirty = True
        log.info("endpoint %d gone: %d learned address(es) withdrawn", ep_id, len(addresses))

    def _resync_endpoint(self, ep_id: int) -> None:
        """The endpoint's selectors changed: names it already resolved may match new ones, and
        slots of removed selectors go."""
        endpoint = self.rules.endpoints[ep_id]
        valid = endpoint.selector_identities
        pairs = [(ep_id, a) for a in self.cache.addresses_for(ep_id)]
        for (ep, address), slots in list(self.orphans.items()):
            if ep == ep_id:
                kept = {i: e for i, e in slots.items() if i in valid}
                if kept:
                    self.orphans[(ep, address)] = kept
                else:
                    del self.orphans[(ep, address)]
                pairs.append((ep, address))
        if self.maps.is_open:
            self._sync_entries(pairs)

    # ------------------------------------------------------------------ reports
    def _note(self, endpoint: CompiledEndpoint, qname: str, allowed: bool, rcode: str) -> None:
        per_ep = self.names.get(endpoint.ep_id)
        if per_ep is None:
            per_ep = self.names[endpoint.ep_id] = {}
        stats = per_ep.get(qname)
        if stats is None:
            if len(per_ep) >= NAMES_PER_ENDPOINT:
                del per_ep[min(per_ep, key=lambda n: per_ep[n].last_seen)]
            stats = per_ep[qname] = NameStats()
        stats.count += 1
        if allowed:
            stats.allowed += 1
        else:
            stats.denied += 1
        stats.last_rcode = rcode
        stats.last_seen = time.time()

    # ------------------------------------------------------------------ liveness and expiry
    def _is_live(self, ep_id: int, address: IPAddress) -> bool:
        return (ep_id, packed(address)) in self.live_pairs

    async def refresh_live(self) -> None:
        """Walk weft_ct (yielding to the loop every few hundred entries) for the pairs
        (endpoint, remote address) with a connection still alive."""
        by_source: dict[bytes, int] = {}
        for ep in self.rules.endpoints.values():
            for text in ep.addresses:
                by_source[packed(ipaddress.ip_address(text))] = ep.ep_id
        live: set[tuple[int, bytes]] = set()
        now_ns = time.monotonic_ns()
        for seen, (key, value) in enumerate(self.maps.ct_items(), 1):
            source, dest = ct_pair(key)
            ep_id = by_source.get(source)
            if ep_id is not None and ct_alive(key, value, now_ns):
                live.add((ep_id, dest))
            if seen % CT_WALK_CHUNK == 0:
                await asyncio.sleep(0)
        self.live_pairs = live

    def _anything_expired(self, now: float) -> bool:
        """Whether an expiry pass has work. Scans only once the earliest expiry seen by the last
        scan (or learned since) has come: a large cache is not walked every second for nothing."""
        if now < self.next_expiry:
            return False
        earliest = float("inf")
        for slots in self.orphans.values():
            for exp in slots.values():
                earliest = min(earliest, exp / 1e9)
        for ep_id in self.cache.endpoints():
            for names in self.cache.addresses_for(ep_id).values():
                earliest = min(earliest, *names.values())
        self.next_expiry = earliest
        return earliest <= now

    async def expire_once(self) -> None:
        if self.paused or not self.maps.is_open:
            return
        now = time.monotonic()
        if not self._anything_expired(now):
            return
        await self.refresh_live()
        if self.paused:
            return
        now = time.monotonic()
        gone, _released = self.cache.collect(now, self._is_live)
        pairs = [(ep_id, address) for ep_id, _, address in gone]
        now_ns = int(now * 1e9)
        for pair, slots in list(self.orphans.items()):
            live = self._is_live(*pair)
            kept = {i: e for i, e in slots.items() if e > now_ns or live}
            if kept != slots:
                if kept:
                    self.orphans[pair] = kept
                else:
                    del self.orphans[pair]
                pairs.append(pair)
        zombies = sum(1 for row in self.cache.entries(now) if row.zombie)
        self.counters["zombies"] = zombies
        if gone:
            self.counters["expired"] += len(gone)
            self.recent.clear()
            self.dirty = True
            log.info("expired %d learned address(es)%s", len(gone),
                     f"; {zombies} kept for live connections" if zombies else "")
        if pairs:
            self._sync_entries(pairs)

    def save_state(self) -> None:
        """Write the name cache atomically. Runs on the loop: the next save waits at least 50
        times as long as this one took, so saving never takes more than 2% of the proxy's time
        (the datapath holds the learned addresses anyway; the file carries names and TTLs)."""
        started = time.monotonic()
        path = self.paths.cache_path
        data = self.cache.to_json(time.time(), time.monotonic(), boot_id())
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, separators=(",", ":")))
        os.replace(tmp, path)
        self.dirty = False
        self.save_interval = min(SAVE_INTERVAL_MAX_S, max(SAVE_INTERVAL_S, 50 * (time.monotonic() - started)))

    async def _periodic(self) -> None:
        last_save = 0.0
        while True:
            await asyncio.sleep(EXPIRY_INTERVAL_S / 4)
            now = time.monotonic()
            self._expire_pending(now)
            if not self.maps.is_open and self.open_maps():
                log.info("datapath maps available")
            if int(now / EXPIRY_INTERVAL_S) != int((now - EXPIRY_INTERVAL_S / 4) / EXPIRY_INTERVAL_S):
                try:
                    await self.expire_once()
                except OSError as exc:
                    self.counters["map_errors"] += 1
                    log.error("expiry pass failed: %s", exc)
            if self.dirty and not self.paused and now - last_save >= self.save_interval:
                last_save = now
                try:
                    self.save_state()
                except OSError as exc:
                    log.error("saving the name cache failed: %s", exc)

    def _expire_pending(self, now: float) -> None:
        while self.timeouts and self.timeouts[0][0] <= now:
            _, key, started = self.timeouts.popleft()
            pending = self.pending.get(key)
            if pending is not None and pending.started == started:
                del self.pending[key]
                self.counters["upstream_timeouts"] += 1
                self._note(pending.endpoint, pending.query.qname, True, "TIMEOUT")
                self.drop_log.warning("no answer from %s:%d for %s within %.1fs (pod %s)", pending.orig[0],
                                      pending.orig[1], pending.query.qname, self.settings.upstream_timeout_s,
                                      pending.endpoint.pod)

    # ------------------------------------------------------------------ TCP
    def _on_accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(UDP_BATCH):
            if not self.serving:
                return
            try:
                conn, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.drop_log.warning("accept: %s", exc)
                return
            if len(self.tcp_clients) >= TCP_CLIENTS_MAX:
                self.counters["tcp_rejected"] += 1
                conn.close()
                continue
            self.counters["tcp_connections"] += 1
            conn.setblocking(False)
            client = TcpClient()
            client.task = loop.create_task(self._serve_tcp(conn, peer, client))
            self.tcp_clients[id(client)] = client

    async def _serve_tcp(self, conn: socket.socket, peer: tuple[Any, ...], client: TcpClient) -> None:
        writer: asyncio.StreamWriter | None = None
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        client_closed = False
        try:
            local = conn.getsockname()  # the original destination: the datapath kept it
            orig = (str(local[0]), int(local[1]))
            reader, writer = await asyncio.open_connection(sock=conn)
            while True:
                try:
                    head = await asyncio.wait_for(reader.readexactly(2), TCP_IDLE_S)
                except asyncio.IncompleteReadError:
                    client_closed = True
                    return
                except TimeoutError:
                    return
                client.busy = True
                size = (head[0] << 8) | head[1]
                if size > MAX_QUERY_SIZE:
                    self.counters["queries"] += 1
                    self.counters["malformed_oversized"] += 1
                    self.drop_log.warning("closing TCP connection from %s: %d-octet query", peer[0], size)
                    return
                data = await asyncio.wait_for(reader.readexactly(size), TCP_IDLE_S)
                answer, upstream = await self._tcp_query(data, peer, orig, upstream)
                if answer is not None:
                    writer.write(struct.pack("!H", len(answer)) + answer)
                    await writer.drain()
                client.busy = False
                # Handing over or stopping: the loop goes on, so the client (which closes after its
                # answer, as DNS clients do) closes first; the drain aborts it if it stays idle.
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError, OSError):
            return
        finally:
            self.tcp_clients.pop(id(client), None)
            if not client_closed:
                # We close first: abort (RST) instead of FIN, so this node keeps no TIME_WAIT socket
                # for the pod's address and port. The datapath assigns a pod's SYN straight to the
                # listener, past the TIME_WAIT lookup; a TIME_WAIT twin of its 4-tuple would make the
                # kernel drop every SYN of a connection that reuses the port, until it expires (60 s).
                # Only idle or misbehaving clients get here: nothing of an answer is left unsent.
                with contextlib.suppress(OSError):
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            for w in (writer, upstream[1] if upstream else None):
                if w is not None:
                    w.close()
            if writer is None:
                conn.close()

    async def _tcp_query(self, data: bytes, peer: tuple[Any, ...], orig: tuple[str, int],
                         upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None
                         ) -> tuple[bytes | None, tuple[asyncio.StreamReader, asyncio.StreamWriter] | None]:
        counters = self.counters
        counters["queries"] += 1
        counters["queries_tcp"] += 1
        try:
            query = parse_wire_query(data, max_size=MAX_QUERY_SIZE)
        except DnsMessageError as exc:
            counters["malformed_" + exc.category] += 1
            self.drop_log.warning("dropped a malformed TCP query from %s (%s)", peer[0], exc)
            return None, upstream
        endpoint = self.rules.by_address.get(str(peer[0]))
        if endpoint is None:
            counters["unknown_source"] += 1
            return error_response(query, RCODE_REFUSED), upstream
        if not self.maps.is_open:
            return self._servfail(query), upstream
        wall_ns = time.time_ns()
        peer_identity = self.maps.peer(orig[0]).identity
        if not endpoint.allows(peer_identity, PROTO_TCP, orig[1], query.qname):
            counters["denied"] += 1
            self._l7(wall_ns, REQUEST, endpoint, query, peer, orig, PROTO_TCP, VERDICT_DROPPED)
            self._note(endpoint, query.qname, False, rcode_text(self.deny_rcode))
            self.denied_log.warning("denied %s %s over TCP from %s (%s) to %s:%d (identity %d)", query.qtype_text,
                                    query.qname, peer[0], endpoint.pod, orig[0], orig[1], peer_identity)
            return error_response(query, self.deny_rcode), upstream
        counters["allowed"] += 1
        self._l7(wall_ns, REQUEST, endpoint, query, peer, orig, PROTO_TCP, VERDICT_FORWARDED)
        return await self._tcp_forward(data, query, endpoint, peer, orig, upstream)

    async def _tcp_forward(self, data: bytes, query: WireQuery, endpoint: CompiledEndpoint, peer: tuple[Any, ...],
                           orig: tuple[str, int], upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None
                           ) -> tuple[bytes | None, tuple[asyncio.StreamReader, asyncio.StreamWriter] | None]:
        counters = self.counters
        timeout = self.settings.upstream_timeout_s
        started = time.monotonic()

        def released(answer: bytes, verdict: str) -> bytes:
            self._l7(time.time_ns(), RESPONSE, endpoint, query, peer, orig, PROTO_TCP, verdict,
                     int((time.monotonic() - started) * 1e9), answer)
            return answer

        try:
            if upstream is None:
                upstream = await asyncio.wait_for(asyncio.open_connection(orig[0], orig[1]), timeout)
            up_reader, up_writer = upstream
            up_writer.write(struct.pack("!H", len(data)) + data)
            await up_writer.drain()
            counters["forwarded"] += 1

            async def read_answer() -> bytes:
                head = await up_reader.readexactly(2)
                return await up_reader.readexactly((head[0] << 8) | head[1])

            answer = await asyncio.wait_for(read_answer(), timeout)
        except TimeoutError:
            counters["upstream_timeouts"] += 1
            self._note(endpoint, query.qname, True, "TIMEOUT")
            if upstream is not None:
                upstream[1].close()
            return None, None
        except (OSError, asyncio.IncompleteReadError) as exc:
            counters["upstream_errors"] += 1
            self.drop_log.warning("forwarding %s over TCP to %s:%d failed: %s", query.qname, orig[0], orig[1], exc)
            self._note(endpoint, query.qname, True, "SERVFAIL")
            if upstream is not None:
                upstream[1].close()
            return released(self._servfail(query), VERDICT_ERROR), None
        if len(answer) < 12 or answer[:2] != data[:2] or not same_question(query, answer):
            counters["upstream_unmatched"] += 1
            upstream[1].close()
            return released(self._servfail(query), VERDICT_ERROR), None
        servfails = counters["servfail_sent"]
        out = self._learn_from(endpoint, query, answer)
        # A SERVFAIL of our own (unusable answer, datapath not updated) is an error, as Cilium reports it.
        return released(out, VERDICT_ERROR if counters["servfail_sent"] != servfails else VERDICT_FORWARDED), upstream

    # ------------------------------------------------------------------ control API
    def status(self) -> dict[str, Any]:
        healthy = self.serving and self.maps.is_open and not self.rules_error
        error = self.maps_error or self.rules_error or ("" if self.serving else "not serving")
        out: dict[str, Any] = {
            "pid": os.getpid(),
            "node": self.node_name,
            "started": self.started_wall,
            "uptime_s": round(time.time() - self.started_wall, 3),
            "port": self.settings.port,
            "ready": self.serving,
            "healthy": healthy,
            "rules_revision": self.rules.revision,
            "rules_loaded": self.rules_loaded_at,
            "endpoints": len(self.rules.endpoints),
            "cache_entries": len(self.cache),
            "orphan_entries": len(self.orphans),
            "pending": len(self.pending),
            "tcp_clients": len(self.tcp_clients),
            "l7": {"records": len(self.l7.records), "next_seq": self.l7.next_seq, "bytes": self.l7.bytes,
                   "epoch": self.l7.epoch},
            "handed_over_from": self.handed_over_from,
            "counters": dict(self.counters),
            "malformed": {c: self.counters["malformed_" + c] for c in CATEGORIES},
        }
        if error:
            out["error"] = error
        return out

    def cache_list(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        rows = []
        for row in self.cache.entries(now):
            endpoint = self.rules.endpoints.get(row.ep_id)
            rows.append({"ep_id": row.ep_id, "pod": endpoint.pod if endpoint else "", "name": row.name,
                         "address": str(row.address), "ttl": row.ttl, "ttl_left": round(row.ttl_left, 3),
                         "source": row.source, "zombie": row.zombie,
                         "selectors": list(endpoint.selector_ids(row.name)) if endpoint else []})
        now_ns = time.monotonic_ns()
        for (ep_id, address), slots in sorted(self.orphans.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
            endpoint = self.rules.endpoints.get(ep_id)
            left = max(slots.values()) - now_ns
            rows.append({"ep_id": ep_id, "pod": endpoint.pod if endpoint else "", "name": "", "address": str(address),
                         "ttl": 0, "ttl_left": round(max(0, left) / 1e9, 3), "source": "datapath",
                         "zombie": left <= 0, "selectors": sorted(slots)})
        return rows

    def names_report(self) -> list[dict[str, Any]]:
        rows = []
        for ep_id, per_ep in sorted(self.names.items()):
            endpoint = self.rules.endpoints.get(ep_id)
            for name, stats in sorted(per_ep.items()):
                rows.append({"ep_id": ep_id, "pod": endpoint.pod if endpoint else "", "name": name,
                             "count": stats.count, "allowed": stats.allowed, "denied": stats.denied,
                             "last_rcode": stats.last_rcode, "last_seen": stats.last_seen})
        return rows

    def handlers(self) -> dict[str, control.Handler]:
        async def ping(_: dict[str, Any]) -> Any:
            return {"pid": os.getpid()}

        async def status(_: dict[str, Any]) -> Any:
            return self.status()

        async def cache_list(_: dict[str, Any]) -> Any:
            return self.cache_list()

        async def names(_: dict[str, Any]) -> Any:
            return self.names_report()

        async def reload(_: dict[str, Any]) -> Any:
            result = self.load_rules()
            if not result["loaded"]:
                raise control.ControlError(control.BAD_REQUEST, str(result["error"]))
            return result

        async def l7_get(params: dict[str, Any]) -> Any:
            cursor, max_items = params.get("cursor", 0), params.get("max", 1024)
            if not isinstance(cursor, int) or not isinstance(max_items, int) or isinstance(cursor, bool):
                raise control.ControlError(control.BAD_REQUEST, "l7.get: cursor and max must be integers")
            try:
                return self.l7.read(cursor, max_items)
            except ValueError as exc:
                raise control.ControlError(control.BAD_REQUEST, f"l7.get: {exc}") from exc

        return {"ping": ping, "status": status, "cache_list": cache_list, "names": names, "reload": reload,
                "l7.get": l7_get}

    # ------------------------------------------------------------------ hand-over and stop
    async def _handover(self, conn: socket.socket, params: dict[str, Any]) -> None:
        """A successor asks for our listeners: give them, stop reading them, drain, save, say done."""
        if not self.serving:
            with contextlib.suppress(OSError):
                conn.sendall(control.encode({"error": control.ControlError(
                    control.BAD_REQUEST, "not serving (already handing over or stopping)").to_json()}))
            conn.close()
            return
        successor = params.get("pid", "?")
        log.info("handing the listeners over to pid %s", successor)
        names = [n for n in LISTENER_NAMES if n in self.listeners]
        try:
            control.send_with_fds(conn, {"result": {"pid": os.getpid(), "sockets": names}},
                                  [self.listeners[n].fileno() for n in names])
        except OSError as exc:
            log.error("hand-over to pid %s failed, still serving: %s", successor, exc)
            conn.close()
            return
        self.counters["handovers"] += 1
        await self._drain()
        try:
            await asyncio.get_running_loop().sock_sendall(conn, control.encode({"result": {"done": True}}))
        except OSError as exc:
            log.warning("could not tell pid %s the hand-over is done: %s", successor, exc)
        finally:
            conn.close()
        if self.control is not None:
            await self.control.close(unlink=False)
        self.stopping.set()

    async def _drain(self) -> None:
        """Stop taking queries, let the ones in flight finish (bounded by the upstream timeout),
        save the state."""
        self.stop_listening()
        self.paused = True
        for sock in self.listeners.values():
            sock.close()  # our descriptor only: the socket lives on in the successor
        self.listeners = {}
        start = time.monotonic()
        deadline = start + self.settings.upstream_timeout_s + TCP_DRAIN_IDLE_S
        while (self.pending or self.tcp_clients) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            self._expire_pending(now)
            if now - start >= TCP_DRAIN_IDLE_S:
                # A client that connected before the hand-over had this long to send its query.
                for client in list(self.tcp_clients.values()):
                    if not client.busy and client.task is not None:
                        client.task.cancel()
        try:
            self.save_state()
        except OSError as exc:
            log.error("saving the name cache failed: %s", exc)

    async def run(self, listeners: dict[str, socket.socket], predecessor: socket.socket | None) -> None:
        """Serve until SIGTERM/SIGINT or a hand-over to a successor."""
        loop = asyncio.get_running_loop()
        self.serve_sockets(listeners)
        self.control = control.ControlServer(self.paths.socket_path, self.handlers(), self._handover)
        await self.control.start()
        if predecessor is not None:
            self.paused = True
            self._tasks.append(loop.create_task(self._await_predecessor(predecessor)))
        self._tasks.append(loop.create_task(self._periodic()))
        log.info("serving DNS on port %d (UDP and TCP, IPv4 and IPv6); control socket %s", self.settings.port,
                 self.paths.socket_path)
        await self.stopping.wait()
        if self.serving:  # a signal, not a hand-over
            log.info("stopping")
            await self._drain()
            await self.control.close(unlink=True)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.close_sockets()

    async def _await_predecessor(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        conn.setblocking(False)
        buf = b""
        try:
            async with asyncio.timeout(HANDOVER_DONE_TIMEOUT_S):
                while b"\n" not in buf:
                    chunk = await loop.sock_recv(conn, 4096)
                    if not chunk:
                        break
                    buf += chunk
        except (TimeoutError, OSError) as exc:
            log.warning("previous proxy did not confirm the hand-over: %s", exc)
        finally:
            conn.close()
        self.merge_state()
        self.reconcile_map()
        self.paused = False
        log.info("hand-over complete")

    def close_sockets(self) -> None:
        loop = asyncio.get_running_loop()
        for socks in self.upstream.values():
            for s in socks:
                with contextlib.suppress(ValueError, OSError):
                    loop.remove_reader(s.fileno())
                s.close()
        self.upstream = {}
        for s in self.reply_socks.values():
            s.close()
        self.reply_socks.clear()
        for s in self.listeners.values():
            s.close()
        self.listeners = {}
        self.maps.close()


def take_over(socket_path: Path, timeout: float = 10.0) -> tuple[dict[str, socket.socket], socket.socket] | None:
    """Ask a running proxy for its listeners. None if no proxy answers at ``socket_path``."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(timeout)
    try:
        conn.connect(str(socket_path))
    except OSError:
        conn.close()
        return None
    try:
        conn.sendall(control.encode({"method": "handover", "params": {"pid": os.getpid()}}))
        reply, fds = control.recv_line_with_fds(conn)
    except (OSError, ValueError) as exc:
        conn.close()
        log.warning("no hand-over from the proxy at %s: %s", socket_path, exc)
        return None
    if "error" in reply:
        for fd in fds:
            os.close(fd)
        conn.close()
        raise RuntimeError(f"the running proxy refused the hand-over: {reply['error']}")
    names = reply["result"]["sockets"]
    if len(names) != len(fds):
        for fd in fds:
            os.close(fd)
        conn.close()
        raise RuntimeError(f"hand-over sent {len(fds)} descriptors for {names}")
    listeners = {name: socket.socket(fileno=fd) for name, fd in zip(names, fds, strict=True)}
    for sock in listeners.values():
        sock.setblocking(False)
    log.info("took the listeners over from pid %s", reply["result"]["pid"])
    return listeners, conn


def resolve_socket_path(settings: DnsProxySettings, state_dir: Path) -> Path:
    return settings.socket_path or default_socket_path(state_dir)
