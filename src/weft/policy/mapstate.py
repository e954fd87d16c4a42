"""The policy of one endpoint as the datapath consumes it: LPM-style keys and allow/deny verdicts.

Key encoding (the datapath's ``weft_policy`` LPM map mirrors it):

* ``direction`` 0 ingress, 1 egress; ``identity`` the peer, 0 = any peer.
* ``proto`` the IP protocol (6, 17, 132, 1, 58), 0 = any protocol (then port 0, prefix 0).
* ``port``/``port_prefix_len``: the destination port's leading ``port_prefix_len`` bits are
  fixed (16 = one port, 0 = every port). A range ``port..endPort`` is split into the fewest
  such prefixes (:func:`port_range_prefixes`).
* ICMP (``icmps`` rules): ``proto`` 1 or 58, ``port`` = the ICMP type, prefix 16 (the datapath
  puts the ICMP type where the port goes).

Lookup (what the datapath does, and :func:`lookup` here mirrors): longest-prefix match on
(proto, port) among the peer identity's entries, and again among identity 0's; a deny hit on
either side drops, else an allow hit passes, else the direction's default applies (deny when
``*_enforced``, allow otherwise).

Deny wins over allow as in Cilium's mapstate: an allow entry that a deny entry of the same
identity (or identity 0) covers is dropped here, in user space. Prefixes of (proto, port) either
nest or are disjoint, so after that drop the longest match of an identity that matches any deny
is a deny — which is what makes the two-lookup datapath rule exact.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

INGRESS = 0
EGRESS = 1
PROTO_ANY = 0
PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58
PROTO_SCTP = 132
PROTOCOL_NUMBERS = {"TCP": PROTO_TCP, "UDP": PROTO_UDP, "SCTP": PROTO_SCTP, "ICMP": PROTO_ICMP, "ICMPV6": PROTO_ICMPV6}
DIRECTION_NAMES = {INGRESS: "ingress", EGRESS: "egress"}


@dataclass(frozen=True, order=True)
class PolicyKey:
    direction: int  # 0 = ingress, 1 = egress
    identity: int  # peer identity; 0 = any peer
    proto: int  # IP protocol number (6 TCP, 17 UDP, 132 SCTP, 1 ICMP, 58 ICMPv6); 0 = any
    port: int  # destination port (ICMP: the type), 0 = any (with prefix_len 0)
    port_prefix_len: int  # 0..16: how many leading bits of port are fixed (16 = exact port)

    def covers(self, other: PolicyKey) -> bool:
        """Whether every packet ``other`` matches, this key matches too (same direction)."""
        if self.direction != other.direction or self.identity not in (0, other.identity):
            return False
        if self.proto == PROTO_ANY:
            return True
        if self.proto != other.proto or self.port_prefix_len > other.port_prefix_len:
            return False
        shift = 16 - self.port_prefix_len
        return (self.port >> shift) == (other.port >> shift)

    def __str__(self) -> str:
        proto = {0: "any", 1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp"}.get(self.proto, str(self.proto))
        if self.proto == PROTO_ANY:
            port = ""
        elif self.port_prefix_len == 16:
            port = f"/{self.port}"
        elif self.port_prefix_len == 0:
            port = "/*"
        else:
            port = f"/{self.port}-{self.port + (1 << (16 - self.port_prefix_len)) - 1}"
        return f"{DIRECTION_NAMES.get(self.direction, self.direction)} id={self.identity} {proto}{port}"


@dataclass(frozen=True)
class PolicyVerdict:
    deny: bool
    rules: tuple[str, ...]  # which rules produced it, e.g. "cnp default/allow-web ingress[0]", for policy trace
    # Allowed, but handed to the node's DNS proxy (a toPorts item with DNS rules covers it).
    redirect: bool = False


@dataclass(frozen=True)
class DnsRuleSpec:
    """What the DNS proxy needs of one egress rule on a redirected port: queries to ``peers``
    (identities; None = any peer) with a protocol of ``protos`` to a port in ``first..last``
    are allowed for names matching ``names`` (("matchName"|"matchPattern", value) pairs); no
    names: every name (a rule without DNS rules on a port another rule redirects)."""

    peers: frozenset[int] | None
    protos: tuple[int, ...]
    first: int
    last: int
    names: tuple[tuple[str, str], ...]
    origin: str


@dataclass(frozen=True)
class EndpointPolicy:
    ingress_enforced: bool  # default deny on ingress (some policy selects the endpoint for ingress)
    egress_enforced: bool
    entries: Mapping[PolicyKey, PolicyVerdict]
    cidr_identities: Mapping[str, int]  # CIDR prefix (str) -> local identity used in entries
    # toFQDNs selectors of the egress allow rules: (("matchName"|"matchPattern", value), identity)
    fqdn_selectors: tuple[tuple[tuple[str, str], int], ...] = ()
    dns_rules: tuple[DnsRuleSpec, ...] = ()  # for the DNS proxy, when any entry redirects

    @property
    def redirects(self) -> bool:
        return any(v.redirect for v in self.entries.values())

    @property
    def has_deny(self) -> bool:
        """Whether any entry denies (the datapath must look up even where not enforced)."""
        return any(v.deny for v in self.entries.values())


def port_range_prefixes(first: int, last: int) -> list[tuple[int, int]]:
    """The fewest (port, prefix_len) blocks covering exactly ``first..last`` (inclusive).

    ``first == 0`` with ``last == 65535`` is the single block (0, 0)."""
    if not 0 <= first <= last <= 65535:
        raise ValueError(f"bad port range {first}..{last}")
    out: list[tuple[int, int]] = []
    port = first
    while port <= last:
        # The largest aligned block starting at `port` that does not pass `last`.
        size = (port & -port) if port else 1 << 16
        while size > last - port + 1:
            size >>= 1
        out.append((port, 17 - size.bit_length()))
        port += size
    return out


@dataclass
class MapStateBuilder:
    """Collects entries while rules are resolved, then applies deny precedence."""

    entries: dict[PolicyKey, tuple[bool, list[str]]] = field(default_factory=dict)
    redirects: set[PolicyKey] = field(default_factory=set)

    def add(self, key: PolicyKey, deny: bool, rule: str, redirect: bool = False) -> None:
        if key.proto == PROTO_ANY and (key.port or key.port_prefix_len):
            raise ValueError(f"{key}: a port needs a protocol")
        if key.port_prefix_len < 16:
            # LPM keys carry no bits past their prefix.
            mask = (0xFFFF << (16 - key.port_prefix_len)) & 0xFFFF if key.port_prefix_len else 0
            if key.port & ~mask:
                key = PolicyKey(key.direction, key.identity, key.proto, key.port & mask, key.port_prefix_len)
        if redirect and not deny:
            self.redirects.add(key)
        old = self.entries.get(key)
        if old is None:
            self.entries[key] = (deny, [rule])
        elif old[0] == deny:
            if rule not in old[1]:
                old[1].append(rule)
        elif deny:
            # Same key allowed and denied: deny wins, and only the deny rules explain it.
            self.entries[key] = (True, [rule])

    def build(self) -> dict[PolicyKey, PolicyVerdict]:
        denies = {k for k, (deny, _) in self.entries.items() if deny}
        out: dict[PolicyKey, PolicyVerdict] = {}
        for key, (deny, rules) in self.entries.items():
            if not deny and _covered(key, denies):
                continue
            out[key] = PolicyVerdict(deny, tuple(rules), not deny and key in self.redirects)
        return out


def _candidates(key: PolicyKey) -> Iterable[PolicyKey]:
    """Every key that could cover ``key``: same or any identity, same or any protocol, any
    shorter port prefix."""
    idents = (key.identity, 0) if key.identity else (0,)
    for ident in idents:
        yield PolicyKey(key.direction, ident, PROTO_ANY, 0, 0)
        if key.proto == PROTO_ANY:
            continue
        for plen in range(key.port_prefix_len, -1, -1):
            mask = (0xFFFF << (16 - plen)) & 0xFFFF if plen else 0
            yield PolicyKey(key.direction, ident, key.proto, key.port & mask, plen)


def _covered(key: PolicyKey, denies: set[PolicyKey]) -> bool:
    return any(c in denies for c in _candidates(key))


@dataclass(frozen=True)
class LookupResult:
    """The outcome of one datapath-style lookup and the entries that decided it."""

    verdict: Literal["allow", "deny", "default-deny", "default-allow"]
    peer_hit: tuple[PolicyKey, PolicyVerdict] | None
    any_hit: tuple[PolicyKey, PolicyVerdict] | None

    @property
    def allowed(self) -> bool:
        return self.verdict in ("allow", "default-allow")

    @property
    def rules(self) -> tuple[str, ...]:
        hits = [h for h in (self.peer_hit, self.any_hit) if h is not None]
        if self.verdict == "deny":
            hits = [h for h in hits if h[1].deny]
        out: list[str] = []
        for _, verdict in hits:
            out.extend(r for r in verdict.rules if r not in out)
        return tuple(out)


def _longest(
    entries: Mapping[PolicyKey, PolicyVerdict], direction: int, ident: int, proto: int, port: int
) -> tuple[PolicyKey, PolicyVerdict] | None:
    probe = PolicyKey(direction, ident, proto, port, 16)
    for plen in range(16, -1, -1):
        mask = (0xFFFF << (16 - plen)) & 0xFFFF if plen else 0
        key = PolicyKey(direction, ident, proto, probe.port & mask, plen)
        got = entries.get(key)
        if got is not None:
            return key, got
    key = PolicyKey(direction, ident, PROTO_ANY, 0, 0)
    got = entries.get(key)
    return (key, got) if got is not None else None


def lookup(policy: EndpointPolicy, direction: int, identity: int, proto: int, port: int) -> LookupResult:
    """What the datapath decides for a packet of ``proto``/``port`` (ICMP: the type) to or from
    peer ``identity`` in ``direction`` of this endpoint."""
    peer = _longest(policy.entries, direction, identity, proto, port) if identity else None
    anyp = _longest(policy.entries, direction, 0, proto, port)
    enforced = policy.ingress_enforced if direction == INGRESS else policy.egress_enforced
    if (peer and peer[1].deny) or (anyp and anyp[1].deny):
        return LookupResult("deny", peer, anyp)
    if peer or anyp:
        if not enforced:
            return LookupResult("default-allow", peer, anyp)
        return LookupResult("allow", peer, anyp)
    return LookupResult("default-deny" if enforced else "default-allow", None, None)
