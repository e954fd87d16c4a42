"""The agent's side of network policy: the node's policy repository (persisted with the agent's
state) and its translation into datapath entries for every local endpoint.

Pure policy logic lives in ``weft.policy``; this module only feeds it the node's endpoints and
identities and hands its output (per-endpoint map state, CIDR identities) to the datapath.

Incremental: each endpoint holds the repository's distilled policy of its subject (identity,
labels, named ports; endpoints alike share one), which the repository keeps current as policies
and identities change. A regeneration writes only the endpoints whose distilled policy changed
since their last write, and of those only the changed map entries; the ipcache only when the
CIDR identities changed, and only the prefixes that did.
"""

from __future__ import annotations

import gc
import ipaddress
import json
import logging
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from weft.agent.errors import BAD_REQUEST, INVALID_CONFIG, AgentError
from weft.agent.state import EP_READY, AgentState, EndpointRecord
from weft.datapath import abi
from weft.datapath.loader import EndpointEntry, NodeDatapath, PolicyMapKey, PolicyMapValue
from weft.dnsproxy.config import DnsProxySettings, EndpointRules, ProxyRules
from weft.identity.allocator import LOCAL_MIN
from weft.policy import EndpointPolicy, EndpointSubject, Policy, PolicyError, PolicyRepository, load_policies, trace
from weft.policy.distill import DistilledPolicy, SubjectKey
from weft.policy.loader import PolicyKey as DocumentKey
from weft.policy.mapstate import PolicyKey, PolicyVerdict
from weft.policy.selectors import fqdn_labels, parse_network
from weft.types.addresses import IPNetwork
from weft.types.labels import LabelSet

log = logging.getLogger("weft.agent.policy")
PROTOCOLS = {"TCP": 6, "UDP": 17, "SCTP": 132}
# A collection of the whole heap, frozen part included, once per this many policy changes: it
# bounds what freezing keeps (objects alive at a freeze that turn into cyclic garbage later, such
# as the asyncio objects of the request in flight: about 5 per change, measured).
FULL_COLLECTION_EVERY = 1000


@dataclass
class _Held:
    """An endpoint's distilled policy and the generation of it last written to the datapath
    (-1: never; the next write is a full one)."""

    key: SubjectKey
    policy: DistilledPolicy
    written: int = -1
    # What the subject was made of (the label set and pod metadata objects: both are replaced,
    # never changed in place), so an unchanged endpoint is recognised without rebuilding it.
    identity: int = 0
    labels: LabelSet | None = None
    meta: dict[str, Any] | None = None


@dataclass
class _Desired:
    """One distilled policy as datapath entries, at a generation (shared by its endpoints)."""

    generation: int
    entries: dict[PolicyMapKey, PolicyMapValue]


class PolicyController:
    def __init__(self, state: AgentState, datapath: NodeDatapath,
                 entries_of: Callable[[EndpointRecord], list[EndpointEntry]], save: Callable[[], None],
                 proxy: DnsProxySettings | None = None, publish_proxy_rules: Callable[[ProxyRules], None] | None = None,
                 cluster_cidrs: list[str] | None = None) -> None:
        self.state = state
        self.datapath = datapath
        self.entries_of = entries_of
        self.save = save
        self.repo = PolicyRepository()
        self.flags: dict[int, int] = {}
        self.proxy = proxy or DnsProxySettings()
        self.publish_proxy_rules = publish_proxy_rules
        self.cluster_cidrs = list(cluster_cidrs or [])
        # What the DNS proxy is told per endpoint (only endpoints with DNS rules or toFQDNs).
        self.proxy_rules: dict[int, EndpointRules] = {}
        self.rules_by_cookie: dict[int, tuple[str, ...]] = {}  # policy entry cookie -> rule origins
        self._published: dict[int, EndpointRules] | None = None  # what the proxy was last given
        # Incremental state: endpoint id -> its distilled policy; subject -> datapath entries;
        # the ipcache as written (None: read it from the kernel first) and at which CIDR
        # generation; each stored policy with its document (a save re-dumps only new ones).
        self._held: dict[int, _Held] = {}
        self._holders: Counter[SubjectKey] = Counter()
        self._desired: dict[SubjectKey, _Desired] = {}
        self._ipcache: dict[IPNetwork, int] | None = None
        self._ipcache_generation: tuple[int, int] = (-1, -1)
        self._documents: dict[DocumentKey, tuple[Policy, dict[str, Any]]] = {}
        # Other nodes' part (a node in a cluster): identities of the whole cluster, and the
        # addresses of other nodes' pods (and of the nodes) with their identities. ``None``:
        # not known yet (after a restart, before the cluster store answered): ipcache entries
        # of cluster identities in the kernel are then left as they are.
        self.remote_identities: dict[int, LabelSet] = {}
        self.remote_ipcache: dict[IPNetwork, int] | None = None
        self._remote_generation = 0
        # Called with the policies an apply or delete is about to change, before they are
        # applied here (the cluster store gets them first); returns the store's revision.
        self.on_change: Callable[[list[Policy], bool], int] | None = None
        self._store_revision = 0  # the store revision of this node's last policy change
        stored = [p for doc in state.policies for p in self._parse([("agent state", json.dumps(doc))])]
        if stored:
            self.repo.apply(stored)
        self._settles = 0
        self._settle_heap()

    # ------------------------------------------------------------------ inputs
    def _parse(self, files: Iterable[tuple[str, str]]) -> list[Policy]:
        policies: list[Policy] = []
        problems: list[str] = []
        for name, text in files:
            try:
                policies.extend(load_policies(text, name))
            except PolicyError as exc:
                problems.extend(str(p) for p in exc.problems)
        if problems:
            raise AgentError(INVALID_CONFIG, f"invalid policy: {len(problems)} problem(s), nothing applied",
                             "\n".join(problems))
        return policies

    @staticmethod
    def _files(p: dict[str, Any]) -> list[tuple[str, str]]:
        files = p.get("files")
        if not isinstance(files, list) or not all(isinstance(f, dict) for f in files):
            raise AgentError(BAD_REQUEST, "params.files must be a list of {name, text}")
        return [(str(f.get("name", "<input>")), str(f.get("text", ""))) for f in files]

    def apply(self, p: dict[str, Any]) -> dict[str, Any]:
        policies = self._parse(self._files(p))
        if p.get("dryRun"):
            result = self.repo.plan(policies)
        else:
            if self.on_change is not None:
                self._store_revision = self.on_change(policies, False)
            result = self.repo.apply(policies)
            self._store()
            self.regenerate()
            self._settle_heap()
        return {
            "revision": result.revision,
            "created": ["/".join(k) for k in result.created],
            "configured": ["/".join(k) for k in result.configured],
            "unchanged": ["/".join(k) for k in result.unchanged],
            "notes": [f"{pol.display_name}: {n}" for pol in policies for n in pol.notes],
            "dryRun": bool(p.get("dryRun")),
        }

    def delete(self, p: dict[str, Any]) -> dict[str, Any]:
        policies = self._parse(self._files(p))
        if self.on_change is not None:
            self._store_revision = self.on_change(policies, True)
        gone = self.repo.delete_policies(policies)
        self._store()
        self.regenerate()
        self._settle_heap()
        return {"revision": self.repo.revision, "deleted": ["/".join(k) for k in gone]}

    def _settle_heap(self) -> None:
        """Take what a policy change left long-lived out of the collector's full passes.

        CPython's oldest-generation collection walks every tracked object: with 10,000 rules
        that is about 600,000 objects and 300-400 ms, and it landed in random applies (measured
        with 1,000 endpoints: apply-to-enforced p50 19 ms but max 429 ms). ``gc.freeze`` moves
        the live objects to the permanent generation, which collections skip; the collection
        just before walks only the objects made since the last freeze (about 10 ms after an apply
        of 500 rules, well under 1 ms after a small change) and frees their cyclic garbage.
        Objects are still freed by reference counting when frozen (measured: deleting every
        policy leaves no cyclic garbage behind)."""
        self._settles += 1
        if self._settles % FULL_COLLECTION_EVERY == 0:
            gc.unfreeze()
        gc.collect()
        gc.freeze()

    def _store(self) -> None:
        # Unchanged policies keep their document object, so the state's per-document JSON
        # cache serialises only the changed ones.
        documents: dict[DocumentKey, tuple[Policy, dict[str, Any]]] = {}
        for pol in self.repo.policies():
            known = self._documents.get(pol.key)
            documents[pol.key] = known if known is not None and known[0] is pol else (pol, pol.to_dict())
        self._documents = documents
        self.state.policies = [doc for _, doc in documents.values()]
        self.save()

    def list_policies(self, p: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"kind": pol.kind.value, "namespace": pol.namespace, "name": pol.name, "source": pol.source,
                 "revision": self.repo.revision} for pol in self.repo.policies()]

    def get(self, p: dict[str, Any]) -> list[dict[str, Any]]:
        name = str(p.get("name", ""))
        found = self.repo.find(name, p.get("namespace"))
        if not found:
            raise AgentError(BAD_REQUEST, f"no policy named {name!r}")
        return [pol.to_dict() for pol in found]

    # ------------------------------------------------------------------ resolution
    def _identities(self) -> dict[int, LabelSet]:
        own = {ident: labels for labels, ident in self.state.identities.by_labels.items()}
        return {**self.remote_identities, **own} if self.remote_identities else own

    # ------------------------------------------------------------------ the cluster
    def set_remote(self, identities: dict[int, LabelSet], ipcache: dict[IPNetwork, int]) -> None:
        """The rest of the cluster as the store says; applied by the next :meth:`regenerate`."""
        self.remote_identities = identities
        if ipcache != self.remote_ipcache:
            self.remote_ipcache = ipcache
            self._remote_generation += 1

    def documents(self) -> dict[str, dict[str, Any]]:
        """Every policy of the node by its cluster-store name."""
        return {store_name(pol.key): pol.to_dict() for pol in self.repo.policies()}

    def apply_from_store(self, wanted: dict[str, dict[str, Any]], revision: int) -> bool:
        """Make the node's policies the cluster store's (read at ``revision``). A view older than
        this node's own last change is skipped: the change is on its way in the watch."""
        if revision < self._store_revision:
            return False
        have = self.documents()
        gone = [pol for pol in self.repo.policies() if store_name(pol.key) not in wanted]
        changed = [doc for name, doc in sorted(wanted.items()) if have.get(name) != doc]
        if not gone and not changed:
            return False
        if gone:
            self.repo.delete_policies(gone)
        if changed:
            try:
                self.repo.apply(self._parse([(f"cluster store policy {name}", json.dumps(doc))
                                             for name, doc in sorted(wanted.items()) if have.get(name) != doc]))
            except AgentError as exc:
                # Another node's agent validated them; one of another version may not: say so
                # and keep the rest.
                log.error("policies from the cluster store not applied: %s %s", exc.msg, exc.details)
        self._store()
        self.regenerate()
        return True

    def _named_ports(self, record: EndpointRecord) -> dict[str, tuple[int, int]]:
        meta = self.state.pods.get(f"{record.pod_namespace}/{record.pod_name}", {})
        return {str(x["name"]): (PROTOCOLS.get(str(x.get("protocol", "TCP")).upper(), 6), int(x["port"]))
                for x in meta.get("ports", [])}

    def subject(self, record: EndpointRecord, labels_by_id: dict[int, LabelSet] | None = None) -> EndpointSubject:
        """``labels_by_id``: the node's identities, when the caller has them (a lookup by id in
        the allocator is a scan)."""
        labels = (labels_by_id.get(record.identity) if labels_by_id is not None
                  else self.state.identities.labels_of(record.identity))
        return EndpointSubject.of(record.identity, labels or frozenset(), record.pod_namespace,
                                  self._named_ports(record))

    def _peer_ports(self) -> dict[int, dict[str, tuple[int, int]]]:
        out: dict[int, dict[str, tuple[int, int]]] = {}
        for record in self.state.endpoints.values():
            out.setdefault(record.identity, {}).update(self._named_ports(record))
        return out

    def resolve(self, record: EndpointRecord, peer_ports: dict[int, dict[str, tuple[int, int]]] | None = None,
                sync: bool = True) -> EndpointPolicy:
        """One endpoint's policy resolved from scratch (what the incremental path must equal).
        ``sync``: bring the selector cache up to date with the node's identities first."""
        return self.repo.resolve(self.subject(record), self._identities() if sync else None,
                                 peer_ports if peer_ports is not None else self._peer_ports())

    def _sync_inputs(self, labels_by_id: dict[int, LabelSet],
                     peer_ports: dict[int, dict[str, tuple[int, int]]] | None = None) -> None:
        """Identities and peers' named ports into the repository: it applies only the
        differences, to the distilled policies whose selections they change."""
        self.repo.sync_identities(labels_by_id)
        self.repo.set_peer_named_ports(peer_ports if peer_ports is not None else self._peer_ports())

    def _hold(self, record: EndpointRecord, labels_by_id: dict[int, LabelSet]) -> _Held:
        """The endpoint's distilled policy, (re)acquired when its subject changed."""
        held = self._held.get(record.ep_id)
        labels = labels_by_id.get(record.identity)
        meta = self.state.pods.get(f"{record.pod_namespace}/{record.pod_name}")
        if held is not None and held.identity == record.identity and held.labels is labels and held.meta is meta:
            return held  # a regeneration visits every endpoint: this is the common case
        subject = self.subject(record, labels_by_id)
        key = SubjectKey.of(subject)
        if held is None or held.key != key:
            if held is not None:
                self._release(record.ep_id)
            held = _Held(key, self.repo.acquire(subject))
            self._held[record.ep_id] = held
            self._holders[key] += 1
        held.identity, held.labels, held.meta = record.identity, labels, meta
        return held

    def _release(self, ep_id: int) -> None:
        held = self._held.pop(ep_id, None)
        if held is None:
            return
        self.repo.release(held.key)
        self._holders[held.key] -= 1
        if self._holders[held.key] <= 0:
            del self._holders[held.key]
            self._desired.pop(held.key, None)

    def _desired_entries(self, policy: DistilledPolicy) -> dict[PolicyMapKey, PolicyMapValue]:
        """The datapath entries of a distilled policy, updated from its change log."""
        known = self._desired.get(policy.key)
        if known is not None and known.generation == policy.generation:
            return known.entries
        changed = policy.changes_since(known.generation) if known is not None else None
        current = policy.entries
        if known is None or changed is None:
            known = _Desired(policy.generation, {self._map_key(k): self._map_value(v) for k, v in current.items()})
        else:
            for key in changed:
                verdict = current.get(key)
                if verdict is None:
                    known.entries.pop(self._map_key(key), None)
                else:
                    known.entries[self._map_key(key)] = self._map_value(verdict)
            known.generation = policy.generation
        self._desired[policy.key] = known
        return known.entries

    @staticmethod
    def _map_key(key: PolicyKey) -> PolicyMapKey:
        return PolicyMapKey(key.direction, key.identity, key.proto, key.port, key.port_prefix_len)

    def _map_value(self, verdict: PolicyVerdict) -> PolicyMapValue:
        redirect_port = self.proxy.port if self.proxy.enabled else 0
        return PolicyMapValue(verdict.deny, cookie=self._cookie(verdict.rules),
                              proxy_port=redirect_port if verdict.redirect else 0)

    def _cookie(self, rules: tuple[str, ...]) -> int:
        """The entry's cookie: a stable number for the rules it came from, which the datapath
        copies into its verdict events so flows can name the policy that allowed or denied them."""
        if not rules:
            return 0
        cookie = zlib.crc32("\n".join(rules).encode()) or 1
        self.rules_by_cookie.setdefault(cookie, rules)
        return cookie

    def rules_of_cookie(self, cookie: int) -> tuple[str, ...]:
        """For the flow reader thread (a dict read)."""
        return self.rules_by_cookie.get(cookie, ())

    def program(self, record: EndpointRecord, peer_ports: dict[int, dict[str, tuple[int, int]]] | None = None,
                sync: bool = True, *, labels_by_id: dict[int, LabelSet] | None = None, full: bool = False) -> None:
        """Write one endpoint's policy (entries first, enforcement flags after: see
        NodeDatapath.apply_endpoint_policy) if it changed since the last write (``full``:
        write it whatever we think the datapath holds). Needs the endpoint's interface
        (host_ifindex). ``sync`` false: the caller (a regeneration) synced the inputs."""
        ep_id = record.ep_id
        if not (len(self.repo) or self.flags.get(ep_id) or ep_id in self._held
                or self.datapath.policy_entries(ep_id)):
            return  # no policy anywhere: nothing to write, and the fast path for CNI ADD
        if labels_by_id is None:
            labels_by_id = self._identities()
        if sync:
            self._sync_inputs(labels_by_id, peer_ports)
        held = self._hold(record, labels_by_id)
        policy = held.policy
        if held.written == policy.generation and not full:
            return
        fqdn_selectors, dns_rules = policy.fqdn_selectors(), policy.dns_rules()
        flags = (abi.EP_F_INGRESS_ENFORCED if policy.ingress_enforced else 0) | (
            abi.EP_F_EGRESS_ENFORCED if policy.egress_enforced else 0) | (
            abi.EP_F_FQDN if fqdn_selectors and policy.egress_enforced else 0)
        self.flags[ep_id] = flags
        if fqdn_selectors or dns_rules:
            self._note_proxy_rules(record, policy.endpoint_policy())
        else:
            self.proxy_rules.pop(ep_id, None)
        # The keys changed since this endpoint's last write; everything on a first or full write.
        since = None if full or held.written < 0 else policy.changes_since(held.written)
        changed_keys = None if since is None else {self._map_key(k) for k in since}
        self.datapath.apply_endpoint_policy(self.entries_of(record), flags, self._desired_entries(policy),
                                            changed_keys)
        held.written = policy.generation
        if not sync:
            return  # a regeneration publishes once, at its end
        self.publish()

    # ------------------------------------------------------------------ DNS proxy
    def _note_proxy_rules(self, record: EndpointRecord, policy: EndpointPolicy) -> None:
        if not (policy.dns_rules or policy.fqdn_selectors) or not policy.egress_enforced:
            self.proxy_rules.pop(record.ep_id, None)
            return
        self.proxy_rules[record.ep_id] = EndpointRules.model_validate({
            "ep_id": record.ep_id, "pod": f"{record.pod_namespace}/{record.pod_name}", "identity": record.identity,
            "addresses": list(record.addresses),
            "dns_rules": [{"peers": None if r.peers is None else sorted(r.peers),
                           "protocol": r.protos[0] if len(r.protos) == 1 else 0, "port": r.first,
                           "end_port": r.last if r.last != r.first else None,
                           "names": [{kind: value} for kind, value in r.names], "rule": r.origin}
                          for r in policy.dns_rules],
            "fqdn_selectors": [{"identity": ident, "selector": {kind: value}}
                               for (kind, value), ident in policy.fqdn_selectors],
        })

    def publish(self) -> None:
        """Hand the DNS proxy its rules when they changed (the proxy keeps the last ones it got
        while the agent is away)."""
        if self.publish_proxy_rules is None or self._published == self.proxy_rules:
            return  # unchanged (the common case of a CNI ADD): nothing built, nothing written
        rules = ProxyRules(revision=self.repo.revision, cluster_cidrs=self.cluster_cidrs,
                           endpoints=[self.proxy_rules[k] for k in sorted(self.proxy_rules)])
        self.publish_proxy_rules(rules)
        self._published = dict(self.proxy_rules)

    def sync_fqdn_identities(self) -> bool:
        """One node-local identity per toFQDNs selector the policies use (labels
        ``fqdn:<name or pattern>``), kept in the agent's persisted identities so the numbers the
        DNS proxy wrote into weft_fqdn stay valid across restarts. Returns whether any changed."""
        wanted = {fqdn_labels(sel) for sel in self.repo.cache.fqdn_selectors()}
        have = {labels for labels in self.state.identities.by_labels
                if any(label.source == "fqdn" for label in labels)}
        for labels in wanted - have:
            self.state.identities.acquire(labels, local=True)
        for labels in have - wanted:
            self.state.identities.release(self.state.identities.by_labels[labels])
        return wanted != have

    def regenerate(self, exclude: EndpointRecord | None = None, full: bool = False) -> None:
        """Every ready endpoint's policy and the node's CIDR identities, after anything that can
        change them: policies, identities (labels), endpoints coming and going. Writes only
        what changed; ``full`` (reconcile, restart) rewrites every endpoint and re-reads the
        ipcache, in case the datapath is not what we last wrote."""
        if self.sync_fqdn_identities():
            self.save()
        # New CIDR identities before the entries that use them, stale ones after.
        stale = self._ipcache_add(full)
        labels_by_id = self._identities()
        self._sync_inputs(labels_by_id)
        for record in self.state.endpoints.values():
            if record.state == EP_READY and record is not exclude:
                self.program(record, sync=False, labels_by_id=labels_by_id, full=full)
        self._ipcache_remove(stale)
        self.publish()

    def _ipcache_add(self, full: bool) -> list[IPNetwork]:
        """Write the CIDR identities that are new or renumbered; returns the stale prefixes
        (removed by :meth:`_ipcache_remove` once no entry uses their identity)."""
        generation = (self.repo.cidr_generation, self._remote_generation)
        if not full and self._ipcache is not None and self._ipcache_generation == generation:
            return []
        current = self._current_ipcache() if full or self._ipcache is None else self._ipcache
        wanted = {parse_network(prefix): ident for prefix, ident in self.repo.cidr_identities().items()}
        if self.remote_ipcache:
            # A CIDR rule naming a pod's address does not change that pod's identity.
            wanted = {**wanted, **self.remote_ipcache}
        upsert = {net: ident for net, ident in wanted.items() if current.get(net) != ident}
        if upsert:
            self.datapath.update_ipcache(upsert)
        self._ipcache = {**current, **upsert}
        self._ipcache_generation = generation
        return [net for net, ident in current.items() if net not in wanted
                and (self.remote_ipcache is not None or ident >= LOCAL_MIN)]

    def _ipcache_remove(self, stale: list[IPNetwork]) -> None:
        if not stale:
            return
        self.datapath.update_ipcache({}, stale)
        if self._ipcache is not None:
            for net in stale:
                self._ipcache.pop(net, None)

    def _current_ipcache(self) -> dict[IPNetwork, int]:
        try:
            return self.datapath.ipcache()
        except Exception:  # a fresh map
            return {}

    def _remote_identity(self, ref: str) -> int | None:
        if not self.remote_ipcache:
            return None
        try:
            address = ipaddress.ip_address(ref)
        except ValueError:
            return None
        return self.remote_ipcache.get(ipaddress.ip_network(address))

    def forget(self, record: EndpointRecord) -> None:
        self._release(record.ep_id)
        self.flags.pop(record.ep_id, None)
        self.datapath.delete_endpoint_policy(record.ep_id)
        if self.proxy_rules.pop(record.ep_id, None) is not None:
            self.publish()

    def trace(self, p: dict[str, Any], find: Callable[[str], EndpointRecord | None]) -> dict[str, Any]:
        """``weft policy trace``: src and dst are "ns/pod" of this node, or an address."""
        def side(ref: str) -> EndpointSubject | int:
            record = find(ref)
            if record is not None:
                return self.subject(record)
            remote = self._remote_identity(ref)
            if remote is not None:
                return remote  # a pod (or a node) elsewhere in the cluster: its identity
            try:
                return self.repo.identity_of_address(ref)
            except ValueError as exc:
                raise AgentError(BAD_REQUEST, f"{ref!r} is neither a pod of this node nor an address") from exc

        result = trace(self.repo, side(str(p.get("from", ""))), side(str(p.get("to", ""))), int(p.get("port", 0)),
                       str(p.get("protocol", "tcp")), identities=self._identities(), named_ports=self._peer_ports())
        return {"verdict": result.verdict, "lines": result.lines(), "rules": list(result.deciding_rules)}


def store_name(key: DocumentKey) -> str:
    """A policy's name in the cluster store: kind, namespace and name (none holds a ':')."""
    return ":".join(key)
