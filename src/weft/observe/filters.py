"""``weft observe`` filters, as ``hubble observe`` has them, on flows (Hubble-shaped dicts).

A :class:`FlowFilter` holds the values of each filter flag. Values of one flag are OR'ed, flags
are AND'ed. ``--not`` puts the flag that follows it into a second filter, the exclusion: a flow is
shown when it matches the inclusion (an empty one matches everything) and does not match the
exclusion (an empty one matches nothing). Lost-event notices always pass: loss is never hidden.

Pure: the agent filters with it before sending, the CLI validates flags with it.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from functools import cached_property
from typing import Any

from weft.observe.flow import ALL_VERDICTS, EVENT_TYPE_NAMES, OBSERVATION_POINTS

# flag name (without --) -> FlowFilter field
FLAGS = {
    "pod": "pod", "from-pod": "from_pod", "to-pod": "to_pod",
    "namespace": "namespace", "from-namespace": "from_namespace", "to-namespace": "to_namespace",
    "label": "label", "from-label": "from_label", "to-label": "to_label",
    "ip": "ip", "from-ip": "from_ip", "to-ip": "to_ip",
    "fqdn": "fqdn", "from-fqdn": "from_fqdn", "to-fqdn": "to_fqdn",
    "port": "port", "from-port": "from_port", "to-port": "to_port",
    "protocol": "protocol", "verdict": "verdict", "drop-reason-desc": "drop_reason_desc",
    "type": "type", "traffic-direction": "traffic_direction", "identity": "identity",
    "node-name": "node_name",
}
PROTOCOLS = ("tcp", "udp", "icmp", "icmpv4", "icmpv6", "sctp", "dns")
DIRECTIONS = ("ingress", "egress")
TRACE_SUBTYPES = {name: point for point, (_n, name) in OBSERVATION_POINTS.items()}


class FilterError(ValueError):
    """A filter value that cannot mean anything: the message names the valid ones."""


@dataclass(frozen=True)
class FlowFilter:
    pod: tuple[str, ...] = ()
    from_pod: tuple[str, ...] = ()
    to_pod: tuple[str, ...] = ()
    namespace: tuple[str, ...] = ()
    from_namespace: tuple[str, ...] = ()
    to_namespace: tuple[str, ...] = ()
    label: tuple[str, ...] = ()
    from_label: tuple[str, ...] = ()
    to_label: tuple[str, ...] = ()
    ip: tuple[str, ...] = ()
    from_ip: tuple[str, ...] = ()
    to_ip: tuple[str, ...] = ()
    fqdn: tuple[str, ...] = ()
    from_fqdn: tuple[str, ...] = ()
    to_fqdn: tuple[str, ...] = ()
    port: tuple[str, ...] = ()
    from_port: tuple[str, ...] = ()
    to_port: tuple[str, ...] = ()
    protocol: tuple[str, ...] = ()
    verdict: tuple[str, ...] = ()
    drop_reason_desc: tuple[str, ...] = ()
    type: tuple[str, ...] = ()
    traffic_direction: tuple[str, ...] = ()
    identity: tuple[str, ...] = ()
    node_name: tuple[str, ...] = ()

    def empty(self) -> bool:
        return not any(getattr(self, f.name) for f in fields(self))

    def to_json(self) -> dict[str, list[str]]:
        return {f.name: list(getattr(self, f.name)) for f in fields(self) if getattr(self, f.name)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> FlowFilter:
        """From the agent API's params (field name -> list of strings); validates every value."""
        data = data or {}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise FilterError(f"unknown filter(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        values: dict[str, tuple[str, ...]] = {}
        for name, raw in data.items():
            items = [raw] if isinstance(raw, str | int) else list(raw)
            values[name] = tuple(str(v) for v in items)
        made = cls(**values)
        made.validate()
        return made

    def validate(self) -> None:
        """Every value must be one the filter can match; errors name the valid values."""
        for value in self.verdict:
            if value.upper() not in ALL_VERDICTS:
                raise FilterError(f"--verdict {value!r} is not a verdict; valid: {', '.join(ALL_VERDICTS)}")
        for value in self.protocol:
            if value.lower() not in PROTOCOLS:
                raise FilterError(f"--protocol {value!r} is not supported; valid: {', '.join(PROTOCOLS)}")
        for value in self.traffic_direction:
            if value.lower() not in DIRECTIONS:
                raise FilterError(f"--traffic-direction {value!r}; valid: {', '.join(DIRECTIONS)}")
        for value in self.type:
            kind, _, sub = value.lower().partition(":")
            if kind not in EVENT_TYPE_NAMES:
                raise FilterError(f"--type {value!r} is not an event type; valid: {', '.join(EVENT_TYPE_NAMES)}")
            if sub and (kind != "trace" or sub not in TRACE_SUBTYPES):
                raise FilterError(f"--type {value!r}: only trace has sub-types here: "
                                  + ", ".join(f"trace:{s}" for s in TRACE_SUBTYPES))
        for name in ("port", "from_port", "to_port"):
            for value in getattr(self, name):
                if not value.isdigit() or not 0 <= int(value) <= 65535:
                    raise FilterError(f"--{name.replace('_', '-')} {value!r} is not a port (0-65535)")
        for value in self.identity:
            if not value.isdigit():
                raise FilterError(f"--identity {value!r} is not a numeric identity")
        for name in ("ip", "from_ip", "to_ip"):
            for value in getattr(self, name):
                try:
                    ipaddress.ip_network(value, strict=False)
                except ValueError:
                    raise FilterError(f"--{name.replace('_', '-')} {value!r} is not an IP address or CIDR") from None
        for name in ("label", "from_label", "to_label"):
            for value in getattr(self, name):
                _parse_selector(value)
        for name in ("pod", "from_pod", "to_pod"):
            for value in getattr(self, name):
                if not value or value.count("/") > 1:
                    raise FilterError(f"--{name.replace('_', '-')} {value!r} is not [namespace/]pod")

    # ------------------------------------------------------------------ matching
    def matches(self, flow: Mapping[str, Any]) -> bool:
        src, dst = flow.get("source") or {}, flow.get("destination") or {}
        for check in self._checks:  # noqa: SIM110 (a plain loop: no generator object per flow)
            if not check(flow, src, dst):
                return False
        return True

    @cached_property
    def _checks(self) -> tuple[_Check, ...]:
        """One check per non-empty flag, its values parsed once: a follower's filter runs on
        every flow the node publishes (hundreds of thousands a second under load)."""
        checks: list[_Check] = []
        if self.pod:
            pods = self.pod
            checks.append(lambda f, s, d: any(_pod_match(v, s) or _pod_match(v, d) for v in pods))
        if self.from_pod:
            from_pods = self.from_pod
            checks.append(lambda f, s, d: any(_pod_match(v, s) for v in from_pods))
        if self.to_pod:
            to_pods = self.to_pod
            checks.append(lambda f, s, d: any(_pod_match(v, d) for v in to_pods))
        if self.namespace:
            namespaces = self.namespace
            checks.append(lambda f, s, d: any(v in (s.get("namespace"), d.get("namespace")) for v in namespaces))
        if self.from_namespace:
            from_namespaces = self.from_namespace
            checks.append(lambda f, s, d: s.get("namespace") in from_namespaces)
        if self.to_namespace:
            to_namespaces = self.to_namespace
            checks.append(lambda f, s, d: d.get("namespace") in to_namespaces)
        if self.label:
            labels = [_parse_selector(v) for v in self.label]
            checks.append(lambda f, s, d: any(_terms_match(t, s) or _terms_match(t, d) for t in labels))
        if self.from_label:
            from_labels = [_parse_selector(v) for v in self.from_label]
            checks.append(lambda f, s, d: any(_terms_match(t, s) for t in from_labels))
        if self.to_label:
            to_labels = [_parse_selector(v) for v in self.to_label]
            checks.append(lambda f, s, d: any(_terms_match(t, d) for t in to_labels))
        if self.ip:
            ips = _networks(self.ip)
            checks.append(lambda f, s, d: _in_networks(ips, _ip(f, "source"))
                          or _in_networks(ips, _ip(f, "destination")))
        if self.from_ip:
            from_ips = _networks(self.from_ip)
            checks.append(lambda f, s, d: _in_networks(from_ips, _ip(f, "source")))
        if self.to_ip:
            to_ips = _networks(self.to_ip)
            checks.append(lambda f, s, d: _in_networks(to_ips, _ip(f, "destination")))
        # As Hubble: FQDN filters match the names an address was resolved from (source_names,
        # destination_names), never an L7 DNS flow's query (Hubble has dns_query for that).
        if self.fqdn:
            fqdns = self.fqdn
            checks.append(lambda f, s, d: _fqdn_match(fqdns, f.get("source_names"))
                          or _fqdn_match(fqdns, f.get("destination_names")))
        if self.from_fqdn:
            from_fqdns = self.from_fqdn
            checks.append(lambda f, s, d: _fqdn_match(from_fqdns, f.get("source_names")))
        if self.to_fqdn:
            to_fqdns = self.to_fqdn
            checks.append(lambda f, s, d: _fqdn_match(to_fqdns, f.get("destination_names")))
        if self.port:
            ports = self.port
            checks.append(lambda f, s, d: _port(f, "source_port") in ports or _port(f, "destination_port") in ports)
        if self.from_port:
            from_ports = self.from_port
            checks.append(lambda f, s, d: _port(f, "source_port") in from_ports)
        if self.to_port:
            to_ports = self.to_port
            checks.append(lambda f, s, d: _port(f, "destination_port") in to_ports)
        if self.protocol:
            protocols = self.protocol
            checks.append(lambda f, s, d: any(_protocol_match(v, f) for v in protocols))
        if self.verdict:
            verdicts = {v.upper() for v in self.verdict}
            checks.append(lambda f, s, d: str(f.get("verdict", "")) in verdicts)
        if self.drop_reason_desc:
            reasons = {v.upper() for v in self.drop_reason_desc}
            checks.append(lambda f, s, d: str(f.get("drop_reason_desc", "")).upper() in reasons)
        if self.type:
            types = [_parse_type(v) for v in self.type]
            checks.append(lambda f, s, d: _type_in(types, f))
        if self.traffic_direction:
            directions = {v.lower() for v in self.traffic_direction}
            checks.append(lambda f, s, d: str(f.get("traffic_direction", "")).lower() in directions)
        if self.identity:
            identities = self.identity
            checks.append(lambda f, s, d: str(s.get("identity", "")) in identities
                          or str(d.get("identity", "")) in identities)
        if self.node_name:
            node_names = self.node_name
            checks.append(lambda f, s, d: any(fnmatch.fnmatchcase(str(f.get("node_name", "")), v) for v in node_names))
        return tuple(checks)


_Check = Callable[[Mapping[str, Any], Mapping[str, Any], Mapping[str, Any]], bool]


@dataclass(frozen=True)
class Filters:
    """The inclusion and the exclusion (``--not``) filters of one query."""

    include: FlowFilter = field(default_factory=FlowFilter)
    exclude: FlowFilter = field(default_factory=FlowFilter)

    def keep(self, response: Mapping[str, Any]) -> bool:
        """For a GetFlowsResponse-shaped item: lost-event notices always pass."""
        flow = response.get("flow")
        if flow is None:
            return True
        if not self.include.empty() and not self.include.matches(flow):
            return False
        return self.exclude.empty() or not self.exclude.matches(flow)

    def to_json(self) -> dict[str, dict[str, list[str]]]:
        return {"include": self.include.to_json(), "exclude": self.exclude.to_json()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> Filters:
        data = data or {}
        return cls(FlowFilter.from_json(data.get("include")), FlowFilter.from_json(data.get("exclude")))


def from_flags(pairs: Iterable[tuple[str, str]]) -> Filters:
    """Ordered (flag, value) pairs as given on the command line (``("not", "")`` marks that the
    next flag goes to the exclusion) -> validated filters."""
    include: dict[str, list[str]] = {}
    exclude: dict[str, list[str]] = {}
    negate_next = False
    for flag, value in pairs:
        name = flag.lstrip("-")
        if name == "not":
            negate_next = True
            continue
        if name not in FLAGS:
            raise FilterError(f"--{name} is not a filter; filters: {', '.join('--' + f for f in FLAGS)}")
        values = (exclude if negate_next else include).setdefault(FLAGS[name], [])
        if name in _LISTS:
            values.extend(v for v in value.split(",") if v)
        else:
            values.append(value)
        negate_next = False
    made = Filters(FlowFilter(**{k: tuple(v) for k, v in include.items()}),
                   FlowFilter(**{k: tuple(v) for k, v in exclude.items()}))
    made.include.validate()
    made.exclude.validate()
    return made


# Flags whose value may be a comma-separated list (as hubble's --verdict/--protocol/--type).
_LISTS = {"verdict", "protocol", "type", "drop-reason-desc", "traffic-direction"}


def flags_from_argv(argv: Sequence[str]) -> list[tuple[str, str]]:
    """The filter flags of a command line, in order, with ``--not`` markers: ``--from-pod x``,
    ``--from-pod=x`` and ``--not``. Other options are skipped (with their values if they take one)."""
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if token == "--not":
            out.append(("not", ""))
            continue
        if not token.startswith("--"):
            continue
        name, eq, value = token[2:].partition("=")
        if name not in FLAGS:
            continue
        if not eq:
            if i >= len(argv):
                raise FilterError(f"--{name} needs a value")
            value = argv[i]
            i += 1
        out.append((name, value))
    return out


def with_exclusions(parsed: FlowFilter, argv: Sequence[str]) -> Filters:
    """The CLI's filters: ``parsed`` holds every filter flag's values (as the option parser saw
    them); those that follow a ``--not`` on the command line move to the exclusion."""
    if "--not" not in argv:
        parsed.validate()
        return Filters(parsed, FlowFilter())
    return from_flags(flags_from_argv(argv))


def merge(a: FlowFilter, **extra: Sequence[str]) -> FlowFilter:
    return replace(a, **{k: tuple(getattr(a, k)) + tuple(v) for k, v in extra.items()})


# ---------------------------------------------------------------------- helpers
def _pod_match(value: str, endpoint: Mapping[str, Any]) -> bool:
    """``ns/prefix`` or ``prefix`` (namespace default), as hubble's pod filters: the pod name
    is matched as a prefix (a Deployment's pods share one)."""
    namespace, sep, prefix = value.rpartition("/")
    if not sep:
        namespace = "default"
    name = str(endpoint.get("pod_name", ""))
    return bool(name) and endpoint.get("namespace") == namespace and name.startswith(prefix)


_SELECTOR_TERM = re.compile(r"^\s*(!?)\s*([A-Za-z0-9_.:/-]+)\s*(?:(==|=|!=)\s*([A-Za-z0-9_.-]*))?\s*$")


def _parse_selector(text: str) -> list[tuple[bool, str, str | None, bool]]:
    """``app=web,tier!=db,env,!debug`` -> [(negated key, key, value or None, value negated)]."""
    terms: list[tuple[bool, str, str | None, bool]] = []
    for part in text.split(","):
        match = _SELECTOR_TERM.match(part)
        if not match or not match.group(2):
            raise FilterError(f"label selector {text!r}: {part!r} is not key, !key, key=value or key!=value")
        bang, key, op, value = match.groups()
        if bang and op:
            raise FilterError(f"label selector {text!r}: !key takes no value")
        terms.append((bool(bang), key, value if op else None, op == "!="))
    return terms


def _label_map(endpoint: Mapping[str, Any]) -> dict[str, str]:
    """``k8s:app=web`` -> keys ``app`` and ``k8s:app`` (a selector may name the source)."""
    out: dict[str, str] = {}
    for label in endpoint.get("labels") or []:
        key, _, value = str(label).partition("=")
        out[key] = value
        _source, sep, bare = key.partition(":")
        if sep:
            out.setdefault(bare, value)
    return out


def _terms_match(terms: list[tuple[bool, str, str | None, bool]], endpoint: Mapping[str, Any]) -> bool:
    labels = _label_map(endpoint)
    for negated_key, key, value, negated_value in terms:
        if negated_key:
            if key in labels:
                return False
        elif value is None:
            if key not in labels:
                return False
        elif negated_value:
            if labels.get(key) == value:
                return False
        elif labels.get(key) != value:
            return False
    return True


def _ip(flow: Mapping[str, Any], side: str) -> str:
    return str((flow.get("IP") or {}).get(side, ""))


def _networks(values: Iterable[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(v, strict=False) for v in values]


def _in_networks(nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network], address: str) -> bool:
    if not address:
        return False
    ip = ipaddress.ip_address(address)
    return any(net.version == ip.version and ip in net for net in nets)


def _fqdn_match(patterns: Iterable[str], names: Any) -> bool:
    names = [str(n).rstrip(".").lower() for n in names or []]
    return any(fnmatch.fnmatchcase(name, pattern.rstrip(".").lower()) for pattern in patterns for name in names)


def _l4_body(flow: Mapping[str, Any]) -> Mapping[str, Any]:
    l4 = flow.get("l4") or {}
    for key in ("TCP", "UDP", "SCTP"):
        if key in l4:
            return dict(l4[key])
    return {}


def _port(flow: Mapping[str, Any], which: str) -> str:
    value = _l4_body(flow).get(which)
    return str(value) if value is not None else ""


def _protocol_match(value: str, flow: Mapping[str, Any]) -> bool:
    l4 = flow.get("l4") or {}
    want = value.lower()
    if want == "dns":
        # The DNS proxy's packets (redirected) and its L7 DNS flows (queries and answers).
        return "dns" in (flow.get("l7") or {}) or (flow.get("verdict") == "REDIRECTED"
                                                   and _port(flow, "destination_port") == "53")
    if want == "icmp":
        return "ICMPv4" in l4 or "ICMPv6" in l4
    return {"tcp": "TCP", "udp": "UDP", "sctp": "SCTP", "icmpv4": "ICMPv4", "icmpv6": "ICMPv6"}[want] in l4


def _parse_type(value: str) -> tuple[int, str | None]:
    """``trace:to-endpoint`` -> (4, "TO_ENDPOINT"); ``drop`` -> (1, None)."""
    kind, _, sub = value.lower().partition(":")
    return EVENT_TYPE_NAMES[kind], (TRACE_SUBTYPES[sub] if sub else None)


def _type_in(types: list[tuple[int, str | None]], flow: Mapping[str, Any]) -> bool:
    number = int((flow.get("event_type") or {}).get("type", -1))
    return any(number == kind and (sub is None or flow.get("trace_observation_point") == sub) for kind, sub in types)
