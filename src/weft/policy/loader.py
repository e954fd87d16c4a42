"""Load policy files: typography scan, YAML/JSON parse with line numbers, strict validation,
cross-field checks. All or nothing: :func:`load_policies` returns every policy of the file or
raises :class:`PolicyError` listing every problem, each with file, line, document and field path.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from weft.policy import model as m
from weft.policy.errors import Loc, PolicyError, Problem, format_path
from weft.policy.typography import scan


class PolicyKind(StrEnum):
    CNP = "CiliumNetworkPolicy"
    CCNP = "CiliumClusterwideNetworkPolicy"
    KNP = "NetworkPolicy"

    @property
    def short(self) -> str:
        """How rule names print in traces: ``cnp default/web ingress[0]``."""
        return {"CiliumNetworkPolicy": "cnp", "CiliumClusterwideNetworkPolicy": "ccnp", "NetworkPolicy": "netpol"}[
            self.value
        ]


# (kind, namespace, name); the namespace is "" for a CiliumClusterwideNetworkPolicy.
PolicyKey = tuple[str, str, str]


@dataclass(frozen=True)
class Policy:
    """One validated policy document.

    ``namespace`` is None for a CiliumClusterwideNetworkPolicy. ``notes`` lists what weft accepts
    but does not enforce (L7 rules, toFQDNs), for ``weft apply`` to print.
    """

    kind: PolicyKind
    namespace: str | None
    name: str
    document: m.CiliumNetworkPolicy | m.CiliumClusterwideNetworkPolicy | m.NetworkPolicy
    source: str = ""
    notes: tuple[str, ...] = field(default=(), compare=False)

    @property
    def key(self) -> PolicyKey:
        return (self.kind.value, self.namespace or "", self.name)

    @property
    def display_name(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace is not None else self.name

    def to_dict(self) -> dict[str, Any]:
        """The document as the user wrote it, minus empty fields (for ``policy get -o yaml``)."""
        data = self.document.model_dump(by_alias=True, exclude_none=True, mode="json")
        data.setdefault("metadata", {})
        if self.namespace is not None:
            data["metadata"]["namespace"] = self.namespace
        return data


# ----------------------------------------------------------------------------- YAML with lines


@dataclass
class _Positions:
    """Where each field path starts in the file: the value's line/column and, for mapping
    entries, the key's (an unknown field is reported at its key)."""

    values: dict[Loc, tuple[int, int]] = field(default_factory=dict)
    keys: dict[Loc, tuple[int, int]] = field(default_factory=dict)
    duplicates: list[tuple[Loc, int, int]] = field(default_factory=list)

    def walk(self, node: yaml.Node, loc: Loc) -> None:
        self.values[loc] = (node.start_mark.line + 1, node.start_mark.column + 1)
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for knode, vnode in node.value:
                key = str(knode.value)
                if key in seen:
                    self.duplicates.append(((*loc, key), knode.start_mark.line + 1, knode.start_mark.column + 1))
                seen.add(key)
                self.keys[(*loc, key)] = (knode.start_mark.line + 1, knode.start_mark.column + 1)
                self.walk(vnode, (*loc, key))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self.walk(item, (*loc, i))

    def line_of(self, loc: Loc, *, key: bool = False) -> tuple[int, int]:
        """The position of ``loc``, or of its nearest ancestor present in the file. With ``key``,
        the position of the key (an unknown field, or the parent of a missing one) rather than
        of the value, which for a mapping starts on the next line."""
        probe = loc
        while probe:
            if key and probe in self.keys:
                return self.keys[probe]
            if not key and probe in self.values:
                return self.values[probe]
            probe = probe[:-1]
        return self.values.get((), (0, 0))


def _documents(text: str) -> Iterator[tuple[Any, _Positions]]:
    # libyaml's loader when PyYAML has it (several times faster on large files); both keep marks.
    loader_cls = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    loader = loader_cls(text)
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            positions = _Positions()
            positions.walk(node, ())
            yield loader.construct_document(node), positions
    finally:
        loader.dispose()


# ----------------------------------------------------------------------------- loading

_FIELD_NAMES = m.all_field_names()


def load_policy_file(path: str | Path, *, default_namespace: str = "default") -> list[Policy]:
    """Read and load one file (see :func:`load_policies`)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError([Problem(str(path), 0, 0, 0, "", f"not UTF-8 text: {exc.reason}")]) from None
    except OSError as exc:
        raise PolicyError([Problem(str(path), 0, 0, 0, "", exc.strerror or str(exc))]) from None
    return load_policies(text, str(path), default_namespace=default_namespace)


def load_policies(
    source: str | Path, filename: str | None = None, *, default_namespace: str = "default"
) -> list[Policy]:
    """Every policy in ``source`` (YAML, possibly multi-document, or JSON), or PolicyError.

    ``source`` is the text itself; a :class:`~pathlib.Path` is read first. ``filename`` names the
    text in messages. Namespaced kinds without ``metadata.namespace`` land in
    ``default_namespace`` (as kubectl would put them).
    """
    if isinstance(source, Path):
        return load_policy_file(source, default_namespace=default_namespace)
    fname = filename or "<input>"
    text = source[1:] if source.startswith("\ufeff") else source
    json_input = text.lstrip()[:1] in ("{", "[")

    issues = scan(text, json_input=json_input)
    if issues:
        raise PolicyError(Problem(fname, i.line, i.column, 0, "", i.message) for i in issues)
    if json_input:
        # In valid JSON every tab is whitespace between tokens (a tab inside a string must be
        # escaped), and PyYAML rejects tabs there; spaces keep lines and columns.
        text = text.replace("\t", " ")

    problems: list[Problem] = []
    raw_docs: list[tuple[Any, _Positions]] = []
    try:
        raw_docs = list(_documents(text))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        what = exc.problem or "invalid YAML"
        if exc.context:
            what = f"{exc.context}, {what}"
        line, col = (mark.line + 1, mark.column + 1) if mark else (0, 0)
        raise PolicyError([Problem(fname, line, col, 0, "", f"YAML syntax: {what}")]) from None
    except yaml.YAMLError as exc:
        raise PolicyError([Problem(fname, 0, 0, 0, "", f"YAML syntax: {exc}")]) from None

    multi = len(raw_docs) > 1
    policies: list[Policy] = []
    seen: dict[PolicyKey, int] = {}
    for index, (data, positions) in enumerate(raw_docs):
        ctx = _Context(fname, index, multi, positions, problems)
        for dup_loc, line, col in positions.duplicates:
            problems.append(Problem(fname, line, col, index, format_path(dup_loc), "duplicate key", multi))
        if data is None:
            continue
        items: list[tuple[Loc, Any]] = [((), data)]
        if isinstance(data, dict) and data.get("kind") in m.LIST_KINDS:
            raw_items = data.get("items")
            if not isinstance(raw_items, list):
                ctx.add((("items",)), "a List needs an items list")
                continue
            items = [(("items", i), item) for i, item in enumerate(raw_items)]
        for prefix, item in items:
            policy = _load_one(item, prefix, ctx, default_namespace)
            if policy is None:
                continue
            if policy.key in seen:
                ctx.add(
                    (*prefix, "metadata", "name"),
                    f"{policy.kind.value} {policy.display_name} appears twice in this file",
                )
            seen[policy.key] = index
            policies.append(policy)
    if problems:
        raise PolicyError(problems)
    return policies


@dataclass
class _Context:
    file: str
    document: int
    multi: bool
    positions: _Positions
    problems: list[Problem]

    def add(self, loc: Loc, message: str, *, at_key: bool = False) -> None:
        line, col = self.positions.line_of(loc, key=at_key)
        self.problems.append(Problem(self.file, line, col, self.document, format_path(loc), message, self.multi))


def _load_one(data: Any, prefix: Loc, ctx: _Context, default_namespace: str) -> Policy | None:
    if not isinstance(data, dict):
        ctx.add(prefix, f"a policy document must be a mapping, not {type(data).__name__}")
        return None
    api, kind = data.get("apiVersion"), data.get("kind")
    model_cls = m.KINDS.get((str(api), str(kind)))
    if model_cls is None:
        known = ", ".join(f"{a} {k}" for a, k in m.KINDS)
        if kind is None or api is None:
            missing = "apiVersion" if api is None else "kind"
            ctx.add(prefix, f"{missing} is missing; expected one of: {known}")
        else:
            ctx.add((*prefix, "kind"), f'"{api}" "{kind}" is not a policy kind weft knows; expected one of: {known}')
        return None
    before = len(ctx.problems)
    try:
        doc = model_cls.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            _report(err, prefix, ctx)
        return None
    notes: list[str] = []
    if isinstance(doc, m.NetworkPolicy):
        _check_netpol(doc, prefix, ctx)
        kind_enum, namespace = PolicyKind.KNP, doc.metadata.namespace or default_namespace
    else:
        kind_enum = PolicyKind.CNP if isinstance(doc, m.CiliumNetworkPolicy) else PolicyKind.CCNP
        namespace = None
        if kind_enum is PolicyKind.CNP:
            namespace = doc.metadata.namespace or default_namespace
        elif doc.metadata.namespace is not None:
            ctx.add(
                (*prefix, "metadata", "namespace"),
                "a CiliumClusterwideNetworkPolicy is not namespaced; remove metadata.namespace",
            )
        _check_cilium(doc, prefix, ctx, notes, clusterwide=kind_enum is PolicyKind.CCNP)
    if len(ctx.problems) > before:
        return None
    line, _ = ctx.positions.line_of(prefix)
    return Policy(kind_enum, namespace, doc.metadata.name, doc, f"{ctx.file}:{line}", tuple(notes))


def _report(err: Any, prefix: Loc, ctx: _Context) -> None:
    """Turn one pydantic error into a Problem with a message a person can act on."""
    loc: Loc = prefix + tuple(p for p in err["loc"] if p != "[key]")
    etype, msg, value = err["type"], err["msg"], err.get("input")
    at_key = etype in ("extra_forbidden", "missing") or "[key]" in err["loc"]
    if etype == "extra_forbidden":
        name = str(loc[-1])
        close = difflib.get_close_matches(name, _FIELD_NAMES, n=1, cutoff=0.75)
        msg = f'unknown field "{name}"' + (f'; did you mean "{close[0]}"?' if close else "")
    elif etype == "missing":
        msg = "required field is missing"
    elif etype in ("string_type", "int_type", "bool_type", "list_type", "dict_type", "model_type"):
        want = {
            "string_type": "a string",
            "int_type": "an integer",
            "bool_type": "true or false",
            "list_type": "a list",
            "dict_type": "a mapping",
            "model_type": "a mapping",
        }[etype]
        got = "nothing" if value is None else f"{type(value).__name__} {json.dumps(value, default=str)}"
        msg = f"expected {want}, got {got}"
        if etype == "string_type" and isinstance(value, int | float | bool):
            msg += (
                f' (quote it: "{value}")'
                if not isinstance(value, bool)
                else " (YAML reads yes/no/on/off/true/false as booleans; quote it)"
            )
    elif etype == "literal_error":
        msg = f"{json.dumps(value, default=str)} is not allowed; {msg[0].lower()}{msg[1:]}"
    ctx.add(loc, msg, at_key=at_key)


# ----------------------------------------------------------------------------- cross-field checks


def _check_selector(sel: m.EndpointSelector | m.K8sLabelSelector | None, loc: Loc, ctx: _Context) -> None:
    if sel is None:
        return
    exprs: Sequence[m.MatchExpressionBase] = sel.matchExpressions or []
    for i, expr in enumerate(exprs):
        eloc = (*loc, "matchExpressions", i)
        if expr.operator in ("In", "NotIn"):
            if not expr.values:
                ctx.add((*eloc, "values"), f"operator {expr.operator} needs a non-empty values list")
            for j, v in enumerate(expr.values or []):
                try:
                    m._label_value(v)
                except Exception as exc:  # PydanticCustomError: reuse its message
                    ctx.add((*eloc, "values", j), str(exc))
        elif expr.values:
            ctx.add((*eloc, "values"), f"operator {expr.operator} takes no values")


def _check_ports(ports: Sequence[m.PortBase] | None, loc: Loc, ctx: _Context) -> None:
    for i, pp in enumerate(ports or []):
        ploc = (*loc, i)
        if pp.endPort is None:
            continue
        if pp.port is None:
            ctx.add((*ploc, "endPort"), "endPort needs a port (the start of the range)")
        elif not pp.port.isdigit():
            ctx.add((*ploc, "endPort"), f'endPort cannot be used with a named port ("{pp.port}")')
        elif int(pp.port) == 0:
            ctx.add((*ploc, "endPort"), "endPort needs a start port above 0")
        elif pp.endPort < int(pp.port):
            ctx.add((*ploc, "endPort"), f"endPort {pp.endPort} is below port {pp.port}")


def _check_cidr_rule(rule: m.CIDRRule | m.IPBlock, loc: Loc, ctx: _Context) -> None:
    outer = ipaddress.ip_network(rule.cidr)
    for i, text in enumerate(rule.except_ or []):
        inner = ipaddress.ip_network(text)
        if inner.version != outer.version or not inner.subnet_of(outer):  # type: ignore[arg-type]
            ctx.add((*loc, "except", i), f"{text} is not inside {rule.cidr}")


def _check_icmps(rules: list[m.ICMPRule] | None, loc: Loc, ctx: _Context) -> None:
    for i, rule in enumerate(rules or []):
        for j, f in enumerate(rule.fields):
            if isinstance(f.type, str):
                names = m.ICMPV4_TYPES if f.family == "IPv4" else m.ICMPV6_TYPES
                if f.type not in names:
                    ctx.add((*loc, i, "fields", j, "type"), f'"{f.type}" is not an {f.family} ICMP type name')


def _check_cilium(
    doc: m.CiliumNetworkPolicy | m.CiliumClusterwideNetworkPolicy,
    prefix: Loc,
    ctx: _Context,
    notes: list[str],
    *,
    clusterwide: bool,
) -> None:
    rules: list[tuple[Loc, m.Rule]] = []
    if doc.spec is not None:
        rules.append(((*prefix, "spec"), doc.spec))
    for i, r in enumerate(doc.specs or []):
        rules.append(((*prefix, "specs", i), r))
    if not rules:
        ctx.add(prefix, "a Cilium policy needs spec or specs")
    for rloc, rule in rules:
        if rule.endpointSelector is None:
            ctx.add(
                (*rloc, "endpointSelector"),
                "required field is missing (host policies with nodeSelector are not supported)",
                at_key=True,
            )
        _check_selector(rule.endpointSelector, (*rloc, "endpointSelector"), ctx)
        if not clusterwide and rule.endpointSelector is not None:
            keys = set(rule.endpointSelector.matchLabels or {}) | {
                e.key for e in rule.endpointSelector.matchExpressions or []
            }
            if keys & {
                "k8s:io.kubernetes.pod.namespace",
                "any:io.kubernetes.pod.namespace",
                "io.kubernetes.pod.namespace",
            }:
                # Cilium replaces it too (with a warning): a CNP only ever selects its own namespace.
                notes.append(
                    f"{format_path((*rloc, 'endpointSelector'))}: the namespace is ignored; a CiliumNetworkPolicy "
                    "selects endpoints of its own namespace only"
                )
        sections: list[tuple[str, list[Any] | None, bool]] = [
            ("ingress", rule.ingress, True),
            ("ingressDeny", rule.ingressDeny, True),
            ("egress", rule.egress, False),
            ("egressDeny", rule.egressDeny, False),
        ]
        for section, items, ingress in sections:
            for i, r in enumerate(items or []):
                loc = (*rloc, section, i)
                peers = r.fromEndpoints if ingress else r.toEndpoints
                for j, sel in enumerate(peers or []):
                    _check_selector(sel, (*loc, "fromEndpoints" if ingress else "toEndpoints", j), ctx)
                for j, cr in enumerate((r.fromCIDRSet if ingress else r.toCIDRSet) or []):
                    _check_cidr_rule(cr, (*loc, "fromCIDRSet" if ingress else "toCIDRSet", j), ctx)
                _check_icmps(r.icmps, (*loc, "icmps"), ctx)
                if r.icmps and r.toPorts:
                    ctx.add((*loc, "icmps"), "icmps and toPorts cannot be in the same rule; write two rules")
                for j, pr in enumerate(r.toPorts or []):
                    ploc = (*loc, "toPorts", j)
                    _check_ports(pr.ports, (*ploc, "ports"), ctx)
                    l7 = getattr(pr, "rules", None)
                    if isinstance(l7, m.L7Rules):
                        _check_l7(l7, pr, ploc, ingress, ctx, notes)
                fqdns = getattr(r, "toFQDNs", None)
                for j, fq in enumerate(fqdns or []):
                    if (fq.matchName is None) == (fq.matchPattern is None):
                        ctx.add((*loc, "toFQDNs", j), "set exactly one of matchName and matchPattern")


def _check_l7(l7: m.L7Rules, pr: m.PortRule, ploc: Loc, ingress: bool, ctx: _Context, notes: list[str]) -> None:
    if l7.http is not None and l7.dns is not None:
        ctx.add((*ploc, "rules"), "set one kind of L7 rules per port rule (http or dns), not both")
    if l7.dns is not None:
        if ingress:
            ctx.add((*ploc, "rules", "dns"), "DNS rules are only allowed on egress")
        if not pr.ports:
            ctx.add((*ploc, "rules", "dns"), "DNS rules need the DNS port (53) in ports")
        for k, d in enumerate(l7.dns):
            if (d.matchName is None) == (d.matchPattern is None):
                ctx.add((*ploc, "rules", "dns", k), "set exactly one of matchName and matchPattern")
    if l7.http is not None:
        for k, pp in enumerate(pr.ports or []):
            if pp.protocol not in ("TCP",):
                ctx.add((*ploc, "ports", k, "protocol"), "HTTP rules need protocol: TCP")
    if l7.http is not None or l7.dns is not None:
        for pp in pr.ports or []:
            if pp.port in (None, "0"):
                ctx.add((*ploc, "rules"), "L7 rules need a port other than 0")
                break
    if l7.http is not None:
        # DNS rules are enforced by the node's DNS proxy; HTTP has no proxy yet.
        notes.append(
            f"{format_path((*ploc, 'rules', 'http'))}: HTTP rules are accepted but not enforced; "
            "the port is allowed at L4"
        )


def _check_netpol(doc: m.NetworkPolicy, prefix: Loc, ctx: _Context) -> None:
    sloc = (*prefix, "spec")
    _check_selector(doc.spec.podSelector, (*sloc, "podSelector"), ctx)
    sections: list[tuple[str, str, list[Any] | None]] = [
        ("ingress", "from", doc.spec.ingress),
        ("egress", "to", doc.spec.egress),
    ]
    for section, peer_field, items in sections:
        for i, rule in enumerate(items or []):
            rloc = (*sloc, section, i)
            peers = rule.from_ if peer_field == "from" else rule.to
            for j, peer in enumerate(peers or []):
                ploc = (*rloc, peer_field, j)
                if peer.podSelector is None and peer.namespaceSelector is None and peer.ipBlock is None:
                    ctx.add(ploc, "a peer needs podSelector, namespaceSelector or ipBlock")
                if peer.ipBlock is not None and (peer.podSelector is not None or peer.namespaceSelector is not None):
                    ctx.add((*ploc, "ipBlock"), "ipBlock cannot be combined with podSelector or namespaceSelector")
                _check_selector(peer.podSelector, (*ploc, "podSelector"), ctx)
                _check_selector(peer.namespaceSelector, (*ploc, "namespaceSelector"), ctx)
                if peer.ipBlock is not None:
                    _check_cidr_rule(peer.ipBlock, (*ploc, "ipBlock"), ctx)
            _check_ports(rule.ports, (*rloc, "ports"), ctx)
    if doc.spec.policyTypes is not None and len(set(doc.spec.policyTypes)) != len(doc.spec.policyTypes):
        ctx.add((*sloc, "policyTypes"), "policyTypes lists a type twice")
