"""``weft policy trace``: would a connection pass, and which rules decide it.

A connection from ``src`` to ``dst`` passes when the source's egress policy and the
destination's ingress policy both allow it. Each side is decided by resolving that endpoint's
map state and doing the datapath's own lookup (:func:`weft.policy.mapstate.lookup`), so the
trace cannot disagree with what the kernel enforces. A side that is not a local endpoint (world,
a CIDR, the host) enforces nothing here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from weft.policy.mapstate import EGRESS, INGRESS, PROTOCOL_NUMBERS, lookup
from weft.policy.repository import PolicyRepository
from weft.policy.resolve import EndpointSubject, NamedPorts
from weft.types.labels import LabelSet


@dataclass(frozen=True)
class DirectionDecision:
    """One side's decision. ``verdict``: allow, deny (an explicit deny rule), default-deny (the
    endpoint is selected for this direction and nothing allows), default-allow (no policy selects
    it for this direction), or not-applicable (that side is not a local endpoint)."""

    direction: Literal["egress", "ingress"]
    verdict: Literal["allow", "deny", "default-deny", "default-allow", "not-applicable"]
    enforced: bool
    rules: tuple[str, ...]  # the entries' rules that decided (allow or deny)
    selected_by: tuple[str, ...]  # policies putting the endpoint in default deny this direction

    @property
    def allowed(self) -> bool:
        return self.verdict in ("allow", "default-allow", "not-applicable")

    def describe(self) -> str:
        if self.verdict == "not-applicable":
            return f"{self.direction}: not a local endpoint, nothing to enforce"
        if self.verdict == "default-allow":
            return f"{self.direction}: allowed (no policy selects the endpoint for {self.direction})"
        if self.verdict == "default-deny":
            return f"{self.direction}: denied by default (selected by {', '.join(self.selected_by)}; no rule allows it)"
        word = "allowed" if self.verdict == "allow" else "denied by an explicit deny"
        return f"{self.direction}: {word} by {', '.join(self.rules)}"


@dataclass(frozen=True)
class TraceResult:
    verdict: Literal["allowed", "denied"]
    egress_decision: DirectionDecision
    ingress_decision: DirectionDecision
    deciding_rules: tuple[str, ...]

    def lines(self) -> list[str]:
        return [
            f"verdict: {self.verdict}",
            "  " + self.egress_decision.describe(),
            "  " + self.ingress_decision.describe(),
        ]


def _proto(proto: int | str) -> int:
    if isinstance(proto, int):
        return proto
    try:
        return PROTOCOL_NUMBERS[proto.upper()]
    except KeyError:
        raise ValueError(f"unknown protocol {proto!r}; use tcp, udp, sctp, icmp or icmpv6") from None


def _decide(
    repository: PolicyRepository,
    endpoint: EndpointSubject | None,
    direction: int,
    peer: int,
    proto: int,
    port: int,
    named_ports: Mapping[int, NamedPorts],
    allow_localhost: bool,
) -> DirectionDecision:
    name: Literal["egress", "ingress"] = "egress" if direction == EGRESS else "ingress"
    if endpoint is None:
        return DirectionDecision(name, "not-applicable", False, (), ())
    policy = repository.resolve(endpoint, None, named_ports, allow_localhost=allow_localhost)
    _, enforcement = repository.selecting(endpoint)
    selected = tuple(e.origin for e in enforcement if (e.ingress if direction == INGRESS else e.egress))
    result = lookup(policy, direction, peer, proto, port)
    enforced = policy.ingress_enforced if direction == INGRESS else policy.egress_enforced
    return DirectionDecision(name, result.verdict, enforced, result.rules, selected)


def trace(
    repository: PolicyRepository,
    src: EndpointSubject | int,
    dst: EndpointSubject | int,
    port: int,
    proto: int | str = "tcp",
    *,
    identities: Mapping[int, LabelSet] | None = None,
    named_ports: Mapping[int, NamedPorts] | None = None,
    allow_localhost: bool = True,
) -> TraceResult:
    """Trace ``src`` -> ``dst`` on ``port``/``proto`` (for ICMP, ``port`` is the type).

    An :class:`EndpointSubject` is a local endpoint whose policy applies; a bare int is a peer
    identity that enforces nothing (world, a CIDR identity from
    :meth:`PolicyRepository.identity_of_address`, the host...).
    """
    if identities is not None:
        repository.sync_identities(identities)
    ports: dict[int, NamedPorts] = dict(named_ports or {})
    for side in (src, dst):
        if isinstance(side, EndpointSubject) and side.named_ports:
            ports[side.identity] = {**ports.get(side.identity, {}), **side.named_ports}
    p = _proto(proto)
    src_ep = src if isinstance(src, EndpointSubject) else None
    dst_ep = dst if isinstance(dst, EndpointSubject) else None
    src_id = src.identity if isinstance(src, EndpointSubject) else src
    dst_id = dst.identity if isinstance(dst, EndpointSubject) else dst
    egress = _decide(repository, src_ep, EGRESS, dst_id, p, port, ports, allow_localhost)
    ingress = _decide(repository, dst_ep, INGRESS, src_id, p, port, ports, allow_localhost)
    allowed = egress.allowed and ingress.allowed
    deciding: list[str] = []
    for d in (egress, ingress):
        if allowed or not d.allowed:
            deciding.extend(
                r for r in (d.rules or (d.selected_by if d.verdict == "default-deny" else ())) if r not in deciding
            )
    return TraceResult("allowed" if allowed else "denied", egress, ingress, tuple(deciding))
