"""The policy documents users write, as strict pydantic models.

Kinds: ``cilium.io/v2`` CiliumNetworkPolicy and CiliumClusterwideNetworkPolicy (a ``spec`` rule
and/or ``specs`` rules) and ``networking.k8s.io/v1`` NetworkPolicy. Every model forbids unknown
fields, so a typo (``toPort``) is an error rather than a silently ignored rule. Field names are
the YAML keys themselves (camelCase), so a pydantic error location is the user's field path.

Checks on one field live here (port syntax, CIDR syntax, label keys); checks that relate several
fields (``endPort >= port``, ``except`` inside ``cidr``, ICMP type names per family) live in
:mod:`weft.policy.loader`, which reports them with the same field paths and lines.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from weft.fqdn.matchpattern import FqdnPatternError, validate_name, validate_pattern

# ----------------------------------------------------------------------------- value syntax

# IANA_SVC_NAME as Kubernetes validates container port names: at most 15 characters of a-z, 0-9
# and "-", at least one letter, no leading/trailing or double hyphen.
_SVC_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
# Label sources a selector key may name (Cilium's ``source:key``); no source means ``any``.
LABEL_SOURCES = ("k8s", "any", "reserved", "container", "unspec", "cidr")
ENTITIES = (
    "all",
    "world",
    "world-ipv4",
    "world-ipv6",
    "cluster",
    "host",
    "remote-node",
    "health",
    "init",
    "unmanaged",
    "kube-apiserver",
    "ingress",
    "none",
)
PROTOCOLS = ("TCP", "UDP", "SCTP", "ANY")
K8S_PROTOCOLS = ("TCP", "UDP", "SCTP")
OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")

# ICMP type names Cilium accepts, per family (values from RFC 792 / RFC 4443 and IANA).
ICMPV4_TYPES = {
    "EchoReply": 0,
    "DestinationUnreachable": 3,
    "Redirect": 5,
    "Echo": 8,
    "EchoRequest": 8,
    "RouterAdvertisement": 9,
    "RouterSelection": 10,
    "TimeExceeded": 11,
    "ParameterProblem": 12,
    "Timestamp": 13,
    "TimestampReply": 14,
    "Photuris": 40,
    "ExtendedEchoRequest": 42,
    "ExtendedEchoReply": 43,
}
ICMPV6_TYPES = {
    "DestinationUnreachable": 1,
    "PacketTooBig": 2,
    "TimeExceeded": 3,
    "ParameterProblem": 4,
    "EchoRequest": 128,
    "EchoReply": 129,
    "MulticastListenerQuery": 130,
    "MulticastListenerReport": 131,
    "MulticastListenerDone": 132,
    "RouterSolicitation": 133,
    "RouterAdvertisement": 134,
    "NeighborSolicitation": 135,
    "NeighborAdvertisement": 136,
    "RedirectMessage": 137,
    "RouterRenumbering": 138,
    "ICMPNodeInformationQuery": 139,
    "ICMPNodeInformationResponse": 140,
    "InverseNeighborDiscoverySolicitation": 141,
    "InverseNeighborDiscoveryAdvertisement": 142,
    "HomeAgentAddressDiscoveryRequest": 144,
    "HomeAgentAddressDiscoveryReply": 145,
    "MobilePrefixSolicitation": 146,
    "MobilePrefixAdvertisement": 147,
    "DuplicateAddressRequestCodeSuffix": 157,
    "DuplicateAddressConfirmationCodeSuffix": 158,
    "ExtendedEchoRequest": 160,
    "ExtendedEchoReply": 161,
}


def fail(message: str) -> PydanticCustomError:
    """A validation error whose message is exactly ``message`` (pydantic would otherwise prefix
    "Value error, ")."""
    return PydanticCustomError("weft", "{message}", {"message": message})


def is_port_name(text: str) -> bool:
    """IANA_SVC_NAME: what Kubernetes accepts as a container port name."""
    return len(text) <= 15 and bool(_SVC_NAME.match(text)) and "--" not in text and any(c.isalpha() for c in text)


def _port(value: object) -> str:
    """A port as the user wrote it, normalised to a string: a number 0-65535 or a port name.
    YAML hands us ints for ``port: 80`` and strings for ``port: "80"``; both are accepted."""
    if isinstance(value, bool):
        raise fail(f"{value!r} is not a port number or name")
    if isinstance(value, int):
        if 0 <= value <= 65535:
            return str(value)
        raise fail(f"{value} is not a port number (0-65535)")
    if not isinstance(value, str):
        raise fail(f"{value!r} is not a port number or name")
    if value.isdigit():
        if int(value) <= 65535:
            return str(int(value))
        raise fail(f'"{value}" is not a port number (0-65535)')
    if is_port_name(value):
        return value
    if re.fullmatch(r"\d+\s*[-:\u2013]\s*\d+", value):
        raise fail(f'"{value}" is not a port number or name; write a range as port and endPort')
    if is_port_name(value.lower()):
        raise fail(f'"{value}" is not a port number or name; port names are lower case ("{value.lower()}")')
    raise fail(
        f'"{value}" is not a port number or name (a name is at most 15 characters of a-z, 0-9 and "-", '
        "with a letter and no double hyphen)"
    )


def _end_port(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise fail(f"{value!r} is not a port number (0-65535)")
    return value


def _protocol(allowed: tuple[str, ...]) -> Any:
    def check(value: object) -> str:
        if value in allowed:
            assert isinstance(value, str)
            return value
        choices = ", ".join(allowed[:-1]) + " or " + allowed[-1]
        if isinstance(value, str) and value.upper() in allowed:
            raise fail(f'"{value}" is not a protocol; write it in upper case: {value.upper()}')
        if isinstance(value, str) and value.upper() in ("ICMP", "ICMPV6"):
            raise fail(f'"{value}" is not a port protocol; match ICMP with an "icmps" rule')
        raise fail(f"{value!r} is not a protocol; use {choices}")

    return check


def _cidr(value: object) -> str:
    """A prefix in ``address/length`` notation, returned in canonical form (host bits cleared)."""
    if not isinstance(value, str) or "/" not in value:
        raise fail(f"{value!r} is not a CIDR (address/length, e.g. 10.0.0.0/8)")
    try:
        return str(ipaddress.ip_network(value.strip(), strict=False))
    except ValueError:
        raise fail(f'"{value}" is not a CIDR (address/length, e.g. 10.0.0.0/8)') from None


def _cidr_or_ip(value: object) -> str:
    """fromCIDR/toCIDR also take a bare address (a /32 or /128)."""
    if isinstance(value, str) and "/" not in value:
        try:
            addr = ipaddress.ip_address(value.strip())
        except ValueError:
            raise fail(f'"{value}" is not an IP address or CIDR') from None
        return f"{addr}/{addr.max_prefixlen}"
    return _cidr(value)


def _selector_key(value: object) -> str:
    """``[source:]key``: a Kubernetes label key with an optional Cilium label source."""
    if not isinstance(value, str):
        raise fail(f"{value!r} is not a label key")
    source, sep, key = value.partition(":")
    if not sep:
        source, key = "", value
    elif source not in LABEL_SOURCES:
        raise fail(
            f'"{value}": unknown label source "{source}:"; use one of {", ".join(s + ":" for s in LABEL_SOURCES)}'
        )
    if source == "cidr":
        return value
    _check_k8s_key(value, key)
    return value


def _check_k8s_key(full: str, key: str) -> None:
    prefix, slash, name = key.rpartition("/")
    if not name or len(name) > 63 or not _LABEL_NAME.match(name):
        raise fail(f'"{full}" is not a valid label key (name part: at most 63 of A-Z, a-z, 0-9, "-", "_", ".")')
    if slash and (not prefix or len(prefix) > 253 or not _DNS1123_SUBDOMAIN.match(prefix)):
        raise fail(f'"{full}" is not a valid label key (prefix must be a DNS subdomain)')


def _k8s_key(value: object) -> str:
    if not isinstance(value, str):
        raise fail(f"{value!r} is not a label key")
    _check_k8s_key(value, value)
    return value


def _label_value(value: object) -> str:
    if not isinstance(value, str):
        raise fail(f'{value!r} is not a string; quote label values ("{value}")')
    if len(value) > 63 or not _LABEL_VALUE.match(value):
        raise fail(f'"{value}" is not a valid label value (at most 63 of A-Z, a-z, 0-9, "-", "_", ".")')
    return value


def _operator(value: object) -> str:
    if value in OPERATORS:
        assert isinstance(value, str)
        return value
    hint = ""
    if isinstance(value, str):
        match = [op for op in OPERATORS if op.lower() == value.lower()]
        hint = f' (operators are case sensitive: "{match[0]}")' if match else ""
    raise fail(f"{value!r} is not an operator; use In, NotIn, Exists or DoesNotExist{hint}")


def _entity(value: object) -> str:
    if value in ENTITIES:
        assert isinstance(value, str)
        return value
    raise fail(f"{value!r} is not an entity; use one of {', '.join(ENTITIES)}")


def _fqdn_check(check: Callable[[str], None]) -> Callable[[object], str]:
    """matchName / matchPattern, validated with the DNS proxy's own rules (weft.fqdn), so what
    applies is exactly what the proxy can match."""

    def validate(value: object) -> str:
        if not isinstance(value, str):
            raise fail(f"{value!r} is not a DNS name")
        try:
            check(value)
        except FqdnPatternError as exc:
            raise fail(f'"{value}": {exc.problem}') from None
        return value

    return validate


def _name(value: object) -> str:
    if not isinstance(value, str) or len(value) > 253 or not _DNS1123_SUBDOMAIN.match(value):
        raise fail(f'{value!r} is not a valid name (lower case a-z, 0-9, "-" and ".")')
    return value


def _namespace(value: object) -> str:
    if not isinstance(value, str) or len(value) > 63 or not _DNS1123_LABEL.match(value):
        raise fail(f'{value!r} is not a valid namespace name (lower case a-z, 0-9 and "-")')
    return value


Port = Annotated[str, BeforeValidator(_port)]
EndPort = Annotated[int, BeforeValidator(_end_port)]
Protocol = Annotated[str, BeforeValidator(_protocol(PROTOCOLS))]
K8sProtocol = Annotated[str, BeforeValidator(_protocol(K8S_PROTOCOLS))]
CIDR = Annotated[str, BeforeValidator(_cidr)]
CIDROrIP = Annotated[str, BeforeValidator(_cidr_or_ip)]
SelectorKey = Annotated[str, BeforeValidator(_selector_key)]
K8sKey = Annotated[str, BeforeValidator(_k8s_key)]
LabelValue = Annotated[str, BeforeValidator(_label_value)]
Operator = Annotated[str, BeforeValidator(_operator)]
Entity = Annotated[str, BeforeValidator(_entity)]
DNSName = Annotated[str, BeforeValidator(_fqdn_check(validate_name))]
DNSPattern = Annotated[str, BeforeValidator(_fqdn_check(validate_pattern))]
Name = Annotated[str, BeforeValidator(_name)]
Namespace = Annotated[str, BeforeValidator(_namespace)]


def _unsupported(reason: str) -> Any:
    """A field Cilium or Kubernetes defines but weft does not implement: naming it gets an error
    that says so, instead of "unknown field" (which would suggest a typo)."""

    def reject(value: object) -> None:
        raise fail(reason)

    return Annotated[Any, AfterValidator(reject)]


NOT_SUPPORTED = "is not supported by weft"


class Strict(BaseModel):
    """Base of every document model: unknown fields are errors, types are not coerced (a YAML
    ``true`` is not a string), instances are immutable."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True)


# ----------------------------------------------------------------------------- selectors


class MatchExpressionBase(Strict):
    operator: Operator
    values: list[str] | None = None


class MatchExpression(MatchExpressionBase):
    key: SelectorKey


class EndpointSelector(Strict):
    """Cilium's EndpointSelector: a Kubernetes LabelSelector whose keys may carry a label source
    (``k8s:app``, ``any:app``, ``reserved:host``); a key without a source means ``any:``."""

    matchLabels: dict[SelectorKey, LabelValue] | None = None
    matchExpressions: list[MatchExpression] | None = None


class K8sMatchExpression(MatchExpressionBase):
    key: K8sKey


class K8sLabelSelector(Strict):
    """A plain Kubernetes LabelSelector (NetworkPolicy): keys carry no source."""

    matchLabels: dict[K8sKey, LabelValue] | None = None
    matchExpressions: list[K8sMatchExpression] | None = None


# ----------------------------------------------------------------------------- L4 / L7


class PortBase(Strict):
    port: Port | None = None
    endPort: EndPort | None = None


class PortProtocol(PortBase):
    """``port`` (number or name; omitted or 0 = every port), ``endPort`` (a range), ``protocol``
    (TCP, UDP, SCTP, or ANY = all three; omitted = ANY)."""

    protocol: Protocol | None = None


class HeaderMatch(Strict):
    name: str
    value: str | None = None
    mismatch: Literal["LOG", "ADD", "DELETE", "REPLACE"] | None = None
    secret: _unsupported(f"secret {NOT_SUPPORTED}") = None  # type: ignore[valid-type]


class PortRuleHTTP(Strict):
    path: str | None = None
    method: str | None = None
    host: str | None = None
    headers: list[str] | None = None
    headerMatches: list[HeaderMatch] | None = None


class PortRuleDNS(Strict):
    matchName: DNSName | None = None
    matchPattern: DNSPattern | None = None


class L7Rules(Strict):
    """Accepted so that policies written for Cilium load; weft enforces the L4 part only."""

    http: list[PortRuleHTTP] | None = None
    dns: list[PortRuleDNS] | None = None
    kafka: _unsupported(f"Kafka rules {NOT_SUPPORTED}") = None  # type: ignore[valid-type]
    l7proto: _unsupported(f"l7proto {NOT_SUPPORTED}") = None  # type: ignore[valid-type]
    l7: _unsupported(f"l7 rules {NOT_SUPPORTED}") = None  # type: ignore[valid-type]


class PortRuleBase(Strict):
    ports: list[PortProtocol] | None = None


class PortRule(PortRuleBase):
    rules: L7Rules | None = None
    serverNames: _unsupported(f"serverNames {NOT_SUPPORTED}") = None  # type: ignore[valid-type]
    terminatingTLS: _unsupported(f"terminatingTLS {NOT_SUPPORTED}") = None  # type: ignore[valid-type]
    originatingTLS: _unsupported(f"originatingTLS {NOT_SUPPORTED}") = None  # type: ignore[valid-type]
    listener: _unsupported(f"listener {NOT_SUPPORTED}") = None  # type: ignore[valid-type]


class PortDenyRule(PortRuleBase):
    rules: _unsupported("deny rules cannot have L7 rules (Cilium denies at L3/L4 only)") = None  # type: ignore[valid-type]


class ICMPField(Strict):
    family: Literal["IPv4", "IPv6"] = "IPv4"
    type: int | str

    @field_validator("type", mode="before")
    @classmethod
    def _type(cls, value: object) -> int | str:
        if isinstance(value, bool):
            raise fail(f"{value!r} is not an ICMP type")
        if isinstance(value, int):
            if 0 <= value <= 255:
                return value
            raise fail(f"{value} is not an ICMP type (0-255)")
        if isinstance(value, str):
            if value.isdigit():
                if int(value) <= 255:
                    return int(value)
                raise fail(f'"{value}" is not an ICMP type (0-255)')
            if value in ICMPV4_TYPES or value in ICMPV6_TYPES:
                return value
        raise fail(f"{value!r} is not an ICMP type (0-255 or a name such as EchoRequest)")


class ICMPRule(Strict):
    fields: list[ICMPField]


class CIDRRule(Strict):
    cidr: CIDR
    except_: list[CIDR] | None = Field(default=None, alias="except")
    cidrGroupRef: _unsupported(f"cidrGroupRef {NOT_SUPPORTED}") = None  # type: ignore[valid-type]
    cidrGroupSelector: _unsupported(f"cidrGroupSelector {NOT_SUPPORTED}") = None  # type: ignore[valid-type]


class FQDNSelector(Strict):
    matchName: DNSName | None = None
    matchPattern: DNSPattern | None = None

    @model_validator(mode="after")
    def _one(self) -> FQDNSelector:
        if not self.matchName and not self.matchPattern:
            raise fail("a toFQDNs selector needs matchName or matchPattern")
        return self


# ----------------------------------------------------------------------------- CNP rules

_REQUIRES = "fromRequires/toRequires are not supported by weft (deprecated in Cilium); use a deny rule"


class _IngressCommon(Strict):
    fromEndpoints: list[EndpointSelector] | None = None
    fromCIDR: list[CIDROrIP] | None = None
    fromCIDRSet: list[CIDRRule] | None = None
    fromEntities: list[Entity] | None = None
    icmps: list[ICMPRule] | None = None
    fromRequires: _unsupported(_REQUIRES) = None  # type: ignore[valid-type]
    fromNodes: _unsupported(f"fromNodes {NOT_SUPPORTED}; use fromEntities: [remote-node]") = None  # type: ignore[valid-type]
    fromGroups: _unsupported(f"fromGroups {NOT_SUPPORTED}") = None  # type: ignore[valid-type]
    authentication: _unsupported(f"authentication {NOT_SUPPORTED}") = None  # type: ignore[valid-type]


class IngressRule(_IngressCommon):
    toPorts: list[PortRule] | None = None


class IngressDenyRule(_IngressCommon):
    toPorts: list[PortDenyRule] | None = None


class _EgressCommon(Strict):
    toEndpoints: list[EndpointSelector] | None = None
    toCIDR: list[CIDROrIP] | None = None
    toCIDRSet: list[CIDRRule] | None = None
    toEntities: list[Entity] | None = None
    icmps: list[ICMPRule] | None = None
    toRequires: _unsupported(_REQUIRES) = None  # type: ignore[valid-type]
    toServices: _unsupported(f"toServices {NOT_SUPPORTED}; select the backend pods with toEndpoints") = None  # type: ignore[valid-type]
    toNodes: _unsupported(f"toNodes {NOT_SUPPORTED}; use toEntities: [remote-node]") = None  # type: ignore[valid-type]
    toGroups: _unsupported(f"toGroups {NOT_SUPPORTED}") = None  # type: ignore[valid-type]
    authentication: _unsupported(f"authentication {NOT_SUPPORTED}") = None  # type: ignore[valid-type]


class EgressRule(_EgressCommon):
    toPorts: list[PortRule] | None = None
    toFQDNs: list[FQDNSelector] | None = None


class EgressDenyRule(_EgressCommon):
    toPorts: list[PortDenyRule] | None = None
    toFQDNs: _unsupported("toFQDNs cannot be used in a deny rule (Cilium does not support it)") = None  # type: ignore[valid-type]


class DefaultDeny(Strict):
    ingress: bool | None = None
    egress: bool | None = None


class Rule(Strict):
    """One CNP/CCNP rule (``spec`` or an item of ``specs``)."""

    endpointSelector: EndpointSelector | None = None
    ingress: list[IngressRule] | None = None
    ingressDeny: list[IngressDenyRule] | None = None
    egress: list[EgressRule] | None = None
    egressDeny: list[EgressDenyRule] | None = None
    enableDefaultDeny: DefaultDeny | None = None
    description: str | None = None
    labels: list[dict[str, str]] | None = None
    nodeSelector: _unsupported(f"nodeSelector (host policy) {NOT_SUPPORTED}") = None  # type: ignore[valid-type]
    log: _unsupported(f"log {NOT_SUPPORTED}") = None  # type: ignore[valid-type]


class Metadata(Strict):
    name: Name
    namespace: Namespace | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None
    # Present in `kubectl get -o yaml` output; accepted so such a file applies as is.
    uid: str | None = None
    resourceVersion: str | None = None
    generation: int | None = None
    creationTimestamp: str | None = None
    managedFields: list[Any] | None = None
    finalizers: list[str] | None = None


class CiliumNetworkPolicy(Strict):
    KIND: ClassVar[str] = "CiliumNetworkPolicy"
    apiVersion: Literal["cilium.io/v2"]
    kind: Literal["CiliumNetworkPolicy"]
    metadata: Metadata
    spec: Rule | None = None
    specs: list[Rule] | None = None
    status: Any = None


class CiliumClusterwideNetworkPolicy(Strict):
    KIND: ClassVar[str] = "CiliumClusterwideNetworkPolicy"
    apiVersion: Literal["cilium.io/v2"]
    kind: Literal["CiliumClusterwideNetworkPolicy"]
    metadata: Metadata
    spec: Rule | None = None
    specs: list[Rule] | None = None
    status: Any = None


# ----------------------------------------------------------------------------- NetworkPolicy


class IPBlock(Strict):
    cidr: CIDR
    except_: list[CIDR] | None = Field(default=None, alias="except")


class NetworkPolicyPeer(Strict):
    podSelector: K8sLabelSelector | None = None
    namespaceSelector: K8sLabelSelector | None = None
    ipBlock: IPBlock | None = None


class NetworkPolicyPort(PortBase):
    protocol: K8sProtocol = "TCP"


class NetworkPolicyIngressRule(Strict):
    from_: list[NetworkPolicyPeer] | None = Field(default=None, alias="from")
    ports: list[NetworkPolicyPort] | None = None


class NetworkPolicyEgressRule(Strict):
    to: list[NetworkPolicyPeer] | None = None
    ports: list[NetworkPolicyPort] | None = None


class NetworkPolicySpec(Strict):
    podSelector: K8sLabelSelector
    policyTypes: list[Literal["Ingress", "Egress"]] | None = None
    ingress: list[NetworkPolicyIngressRule] | None = None
    egress: list[NetworkPolicyEgressRule] | None = None


class NetworkPolicy(Strict):
    KIND: ClassVar[str] = "NetworkPolicy"
    apiVersion: Literal["networking.k8s.io/v1"]
    kind: Literal["NetworkPolicy"]
    metadata: Metadata
    spec: NetworkPolicySpec
    status: Any = None


Document = CiliumNetworkPolicy | CiliumClusterwideNetworkPolicy | NetworkPolicy

# (apiVersion, kind) -> model; the loader dispatches on these before validating.
KINDS: dict[tuple[str, str], type[CiliumNetworkPolicy] | type[CiliumClusterwideNetworkPolicy] | type[NetworkPolicy]] = {
    ("cilium.io/v2", "CiliumNetworkPolicy"): CiliumNetworkPolicy,
    ("cilium.io/v2", "CiliumClusterwideNetworkPolicy"): CiliumClusterwideNetworkPolicy,
    ("networking.k8s.io/v1", "NetworkPolicy"): NetworkPolicy,
}
LIST_KINDS = ("List", "CiliumNetworkPolicyList", "CiliumClusterwideNetworkPolicyList", "NetworkPolicyList")


def all_field_names() -> set[str]:
    """Every YAML key any model knows: the vocabulary for "did you mean" suggestions."""
    names: set[str] = set()
    stack: list[type[BaseModel]] = [CiliumNetworkPolicy, NetworkPolicy]
    seen: set[type[BaseModel]] = set()
    while stack:
        model = stack.pop()
        if model in seen:
            continue
        seen.add(model)
        for fname, info in model.model_fields.items():
            names.add(info.alias or fname)
            for sub in _models_in(info.annotation):
                stack.append(sub)
    return names


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    import typing

    out: list[type[BaseModel]] = []
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    for arg in typing.get_args(annotation):
        out.extend(_models_in(arg))
    return out
