"""The endpoint manager: CNI operations and the reconciler.

Every method runs on the agent's single datapath worker thread, so the manager is the only
writer of the node's endpoint state, its interfaces and its maps, and needs no locks.

ADD is a transaction: the allocation is persisted (state ``creating``) before the kernel is
touched; each later step is undone if a following one fails; the endpoint becomes ``ready``
only at the end. An agent killed in between finds the ``creating`` record at start-up and
rolls it back, so nothing leaks.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from weft.agent.cluster import ClusterSync, RemoteView, direct_routes, remote_ipcache, tunnel_routes
from weft.agent.config import NodeConfig
from weft.agent.dnsnames import DnsNames
from weft.agent.errors import (
    ALREADY_EXISTS,
    BAD_REQUEST,
    CHECK_FAILED,
    INVALID_ENV,
    IO_FAILURE,
    NOT_AVAILABLE,
    POOL_EXHAUSTED,
    TRY_AGAIN_LATER,
    UNKNOWN_CONTAINER,
    AgentError,
)
from weft.agent.flows import FlowObserver
from weft.agent.policy import PolicyController
from weft.agent.state import EP_CREATING, EP_READY, AgentState, EndpointRecord, StateStore, endpoint_key
from weft.cni import plugin as cni_plugin
from weft.datapath import abi, veth
from weft.datapath.loader import EndpointEntry, NodeDatapath, NodeRoute
from weft.datapath.netlink import ensure_vxlan, link_index, recycle_node_ipr, sync_node_routes
from weft.dnsproxy.config import ProxyRules, default_socket_path, rules_path
from weft.dnsproxy.control import ProxyCallError, ProxyClient, ProxyUnavailable
from weft.identity.allocator import CLUSTER_MAX, CLUSTER_MIN
from weft.ipam.pool import PoolExhausted, default_pools, gateway_of
from weft.observe.flow import EndpointView, Enrichment
from weft.store.kv import StoreError
from weft.types.addresses import IPAddress
from weft.types.labels import format_labels, pod_labels

log = logging.getLogger("weft.agent.endpoints")


class EndpointManager:
    def __init__(self, config: NodeConfig, datapath: NodeDatapath) -> None:
        self.config = config
        self.datapath = datapath
        self.store = StateStore(config.state_dir)
        self.blocks = config.blocks()
        self.state: AgentState = self.store.load(self.blocks)
        self.started_at = time.time()
        self.metrics_serving = ""  # the address /metrics is served on, once the agent started it
        self.last_reconcile: dict[str, Any] = {}
        self.policy = PolicyController(
            self.state, datapath, self._entries, self._save, proxy=config.dns_proxy,
            publish_proxy_rules=self._publish_proxy_rules,
            cluster_cidrs=sorted(set(config.cluster_cidrs or [str(pool.cidr) for pool in default_pools().values()])
                                 | {str(block) for block in self.blocks.values()}),
        )
        # The rest of the cluster (a node of a cluster; None: a node on its own).
        self.cluster: ClusterSync | None = None
        self.remote: RemoteView | None = None
        self.tunnel_ifindex = 0  # the VXLAN device (overlay) or the uplink (direct)
        self.reaper = veth.LinkReaper()
        self._pods_by_ep: dict[int, str] = {}  # replaced whole: the flow reader thread reads it
        self.dns_names = DnsNames(rules_path(config.state_dir).parent / "cache.json",
                                  lambda ep_id: self._pods_by_ep.get(ep_id))
        self.flows = FlowObserver(config.node_name, datapath, config.flows, config.state_dir)
        self.flows.set_enrichment(self._flow_enrichment())

    def _save(self) -> None:
        self.store.save(self.state)
        # Every change of endpoints, labels or identities is saved: flows are enriched from then on.
        self.flows.set_enrichment(self._flow_enrichment())

    def _flow_enrichment(self) -> Enrichment:
        """A snapshot of what flows are enriched with (read by the flow reader thread)."""
        by_ip: dict[str, EndpointView] = {}
        by_id: dict[int, EndpointView] = {}
        interfaces: dict[int, str] = {}
        identity_labels = {ident: tuple(format_labels(labels))
                           for labels, ident in self.state.identities.by_labels.items()}
        if self.remote is not None:
            # Other nodes' pods: flows to and from them name the pod too.
            for ident, remote_labels in self.remote.identities.items():
                identity_labels.setdefault(ident, tuple(format_labels(remote_labels)))
            for ep in self.remote.endpoints.values():
                if ep.node != self.config.node_name:
                    by_ip[ep.ip] = EndpointView(0, ep.identity, ep.namespace, ep.pod,
                                                identity_labels.get(ep.identity, ()))
        self._pods_by_ep = {r.ep_id: f"{r.pod_namespace}/{r.pod_name}" for r in self.state.endpoints.values()}
        for record in self.state.endpoints.values():
            labels = identity_labels.get(record.identity, ())
            view = EndpointView(record.ep_id, record.identity, record.pod_namespace, record.pod_name, labels)
            by_id[record.ep_id] = view
            by_ip.update((address, view) for address in record.addresses)
            if record.host_ifindex:
                interfaces[record.host_ifindex] = record.host_ifname
        return Enrichment(node_name=self.config.node_name, rules_by_cookie=self.policy.rules_of_cookie,
                          names_of=self.dns_names.names_of,
                          endpoints_by_ip=by_ip, endpoints_by_id=by_id,
                          interfaces=interfaces, identity_labels=identity_labels)

    def _publish_proxy_rules(self, rules: ProxyRules) -> None:
        """The DNS proxy's rules: written to its file first (a proxy that is down or restarting
        reads it when it starts), then a best-effort reload request."""
        rules.write(rules_path(self.config.state_dir))
        sock = self.config.dns_proxy.socket_path or default_socket_path(self.config.state_dir)
        if not sock.exists():
            return
        try:
            ProxyClient(sock, timeout=2.0).reload()
        except (ProxyUnavailable, ProxyCallError, OSError) as exc:
            log.warning("DNS proxy did not take the new rules now (it reads them when it starts): %s", exc)

    # ---------------------------------------------------------------- the cluster
    def join_cluster(self, sync: ClusterSync) -> None:
        """Become a node of the cluster ``sync`` follows: identities numbered by the store, the
        node's keys published under its lease, the others' state applied as it changes."""
        settings = sync.settings
        self.cluster = sync
        self.state.identities.cluster = sync.numbering
        sync.on_lease = self._on_lease
        sync.on_resync = self.publish_own
        sync.apply = self.apply_cluster
        self.policy.on_change = sync.put_policies
        if settings.mode == "overlay":
            self.tunnel_ifindex = ensure_vxlan(settings.tunnel_device, settings.vxlan_port)
            self.datapath.attach_overlay(settings.tunnel_device, self.tunnel_ifindex)
        else:
            index = link_index(settings.uplink)
            if index is None:
                raise AgentError(INVALID_ENV, f"cluster.uplink {settings.uplink} does not exist on this node")
            self.tunnel_ifindex = index
            self.datapath.attach_netdev(settings.uplink, index)

    def _on_lease(self, lease: int) -> None:
        """(Re)publish the node's keys under a new ``lease``: a reference to every cluster
        identity its endpoints use (renumbering any the store now numbers otherwise: only if the
        store lost its data), then its node record and endpoints (:meth:`publish_own`)."""
        assert self.cluster is not None
        sync = self.cluster
        renumbered: dict[int, int] = {}
        for labels, ident in list(self.state.identities.by_labels.items()):
            if not CLUSTER_MIN <= ident <= CLUSTER_MAX:
                continue
            number = sync.identities.allocate(labels, self.config.node_name, lease)
            if number != ident:
                self.state.identities.renumber(labels, number)
                renumbered[ident] = number
        if renumbered:
            log.warning("cluster identities renumbered by the store: %s", renumbered)
            for record in self.state.endpoints.values():
                if record.identity in renumbered:
                    record.identity = renumbered[record.identity]
                    if record.state == EP_READY:
                        self._write_map_entries(record)
            self._save()
            self.policy.regenerate()
        self.publish_own(force=True)

    def publish_own(self, force: bool = False) -> dict[str, int]:
        """Hold the store's record of this node's endpoints to the node's: publish what is
        missing or stale there (``force``: everything), withdraw what the node no longer has.
        Runs after every resync and periodically: a publication the store could not take when
        the pod was added is made up for here."""
        if self.cluster is None or not self.cluster.lease:
            return {}
        sync = self.cluster
        sync.register_node([str(b) for b in self.blocks.values()], sync.lease, if_changed=not force)
        published = sync.published_endpoints()
        mine: set[str] = set()
        sent = 0
        for record in self.state.endpoints.values():
            if record.state != EP_READY:
                continue
            mine.update(record.addresses)
            stale = any(published.get(ip) is None or published[ip].identity != record.identity
                        for ip in record.addresses)
            if force or stale:
                self._publish_endpoint(record)
                sent += 1
        gone = set(published) - mine
        for ip in gone:
            sync.withdraw_endpoint(ip)
        return {"published": sent, "withdrawn": len(gone)}

    def _publish_endpoint(self, record: EndpointRecord) -> None:
        if self.cluster is None:
            return
        for ip in record.addresses:
            self.cluster.publish_endpoint(ip, record.identity, record.pod_namespace or "default",
                                          record.pod_name or record.container_id[:63])

    def apply_cluster(self, view: RemoteView) -> None:
        """The rest of the cluster into the node: tunnel entries (and in direct mode routes) to
        other nodes' pod prefixes, their pods' and addresses' identities in the ipcache and the
        policy, the cluster's policies."""
        assert self.cluster is not None
        settings, node = self.cluster.settings, self.config.node_name
        families = self.config.ip_family.versions
        self.remote = view
        mode = abi.ROUTE_VXLAN if settings.mode == "overlay" else abi.ROUTE_DIRECT
        routed = direct_routes(view, node)
        # Routes to other nodes' pod prefixes via their underlay addresses: in direct mode the
        # FIB the datapath asks (bpf_fib_lookup) learns the way there; in both modes the node's
        # own traffic (the DNS proxy's queries to a kube-dns on another node, health checks)
        # finds its way, as a VNet's route table gives it (pods' traffic is the datapath's).
        sync_node_routes(routed, settings.uplink)
        routes = tunnel_routes(view, node, families) if mode == abi.ROUTE_VXLAN else routed
        self.datapath.sync_tunnels({ipaddress.ip_network(cidr): NodeRoute(self.tunnel_ifindex, ipaddress.ip_address(gw),
                                                                           mode)
                                    for cidr, gw in routes.items()})
        self.policy.set_remote(view.identities, remote_ipcache(view, node))
        if not self.policy.apply_from_store(view.policies, view.revision):
            self.policy.regenerate()
        self.flows.set_enrichment(self._flow_enrichment())

    def identity_gc(self) -> dict[str, Any]:
        """Cluster identities no node references any more go (any node may do it: the store's
        transactions keep it safe); releases the store could not take before are retried."""
        if self.cluster is None:
            return {}
        held = set(self.state.identities.by_labels.values())
        self.cluster.numbering.retry(held)
        return {"freed": self.cluster.collect_garbage(), "own": self.publish_own()}

    def remove_node(self, p: dict[str, Any]) -> dict[str, Any]:
        """Another node left the cluster: the store forgets its node record, endpoints and
        identity references (every node's watch then removes what it had of it)."""
        name = _require(p, "name")
        if self.cluster is None:
            raise AgentError(BAD_REQUEST, "this node is not part of a cluster")
        if name == self.config.node_name:
            raise AgentError(BAD_REQUEST, f"{name} is this node: remove it from another one")
        try:
            removed = self.cluster.nodes.remove(name)
            freed = self.cluster.collect_garbage()
        except StoreError as exc:
            raise AgentError(TRY_AGAIN_LATER, f"cluster store: node {name} not removed: {exc}") from exc
        return {"node": name, "removed_keys": removed, "freed_identities": freed}

    # ---------------------------------------------------------------- CNI verbs
    def cni_add(self, p: dict[str, Any]) -> dict[str, Any]:
        container_id, ifname, netns = _require(p, "containerID"), _require(p, "ifname"), _require(p, "netns")
        key = endpoint_key(container_id, ifname)
        existing = self.state.endpoints.get(key)
        if existing is not None:
            # The spec forbids a second ADD for a tuple without a DEL in between; refuse it and
            # leave the existing attachment exactly as it is.
            raise AgentError(ALREADY_EXISTS, f"container {container_id} already has interface {ifname} "
                             f"(endpoint {existing.ep_id}, {', '.join(existing.addresses)}); DEL it first")
        if not os.path.exists(netns):
            raise AgentError(INVALID_ENV, f"CNI_NETNS {netns} does not exist")
        args = p.get("args") or {}
        pod_ns = str(args.get("K8S_POD_NAMESPACE", ""))
        pod_name = str(args.get("K8S_POD_NAME", ""))

        # Step 1: allocate and persist before touching the kernel.
        addresses: list[IPAddress] = []
        try:
            for version in sorted(self.state.ipam):
                addresses.append(self.state.ipam[version].allocate(key))
        except PoolExhausted as exc:
            for version in self.state.ipam:
                self.state.ipam[version].release_owner(key)
            raise AgentError(POOL_EXHAUSTED, str(exc), f"node {self.config.node_name}") from exc
        record = EndpointRecord(
            container_id=container_id, ifname=ifname, netns=netns, network=str(p.get("network", "")),
            ep_id=self.state.next_ep_id, host_ifname=veth.host_ifname_for(container_id, ifname),
            addresses=[str(a) for a in addresses], pod_namespace=pod_ns, pod_name=pod_name,
        )
        self.state.next_ep_id += 1
        record.identity = self._acquire_identity(record)
        self.state.endpoints[key] = record
        self._save()
        _fault_point("add-after-allocate")

        # Steps 2..: interfaces, datapath. Any failure undoes everything above.
        try:
            self._wire(record)
        except Exception as exc:
            log.warning("ADD %s failed, undoing: %s", key, exc)
            self._teardown(record)
            if isinstance(exc, AgentError):
                raise
            if isinstance(exc, veth.LinkError):
                raise AgentError(IO_FAILURE, str(exc)) from exc
            raise AgentError(IO_FAILURE, f"setting up {ifname} in {netns} failed: {exc}") from exc
        record.state = EP_READY
        self._save()
        if self.policy.repo.policies():
            self.policy.regenerate(exclude=record)  # peers may select the new identity
        self._publish_endpoint(record)
        return self._result(record)

    def _wire(self, record: EndpointRecord) -> None:
        self.reaper.wait(record.host_ifname)
        pod_addrs = [veth.PodAddress(ip, gateway_of(self.blocks[ip.version])) for ip in record.ips()]
        try:
            link = veth.create_pod_link(record.netns, record.container_id, record.ifname, pod_addrs,
                                        mtu=self.config.mtu)
        except veth.LinkExistsError:
            # The name may belong to a link whose deletion is still queued: another container's
            # DEL in the same netns just before (a runtime retrying with a new id). Only then
            # is it worth waiting and trying again; otherwise the name is really taken.
            if not self.reaper.pending() or not self.reaper.drain():
                raise
            link = veth.create_pod_link(record.netns, record.container_id, record.ifname, pod_addrs,
                                        mtu=self.config.mtu)
        record.host_mac, record.pod_mac, record.host_ifindex = link.host_mac, link.pod_mac, link.host_ifindex
        try:
            # The host side while the pod side is configured in parallel.
            self.datapath.attach(record.host_ifname, record.host_ifindex)
            veth.add_node_routes(record.host_ifname, record.ips(), record.host_ifindex)
            # Policy before the endpoint becomes reachable: its first packet is already judged.
            self.policy.program(record)
            self._write_map_entries(record)
        finally:
            link.wait()

    def _entries(self, record: EndpointRecord) -> list[EndpointEntry]:
        # The enforcement flags policy decided are kept on every rewrite, so an identity change
        # never drops an endpoint's enforcement.
        return [EndpointEntry(ip=ip, ifindex=record.host_ifindex, ep_id=record.ep_id, identity=record.identity,
                              pod_mac=record.pod_mac, host_mac=record.host_mac,
                              policy_flags=self.policy.flags.get(record.ep_id, 0)) for ip in record.ips()]

    def _write_map_entries(self, record: EndpointRecord) -> None:
        for entry in self._entries(record):
            self.datapath.upsert_endpoint(entry)

    def _acquire_identity(self, record: EndpointRecord) -> int:
        meta = self.state.pods.get(f"{record.pod_namespace}/{record.pod_name}", {})
        ns_labels = self.state.namespaces.get(record.pod_namespace, {})
        return self.state.identities.acquire(pod_labels(record.pod_namespace, meta.get("labels", {}), ns_labels))

    def _refresh_identities(self, match: Callable[[EndpointRecord], bool]) -> None:
        """Labels changed: give matching endpoints the identity of their new label set."""
        for record in self.state.endpoints.values():
            if not match(record):
                continue
            old = record.identity
            record.identity = self._acquire_identity(record)
            if old:
                self.state.identities.release(old)
            if record.state == EP_READY and record.identity != old:
                self._write_map_entries(record)
                self._publish_endpoint(record)
        if self.policy.repo.policies():
            self.policy.regenerate()

    def _teardown(self, record: EndpointRecord) -> None:
        """Remove everything an endpoint holds; every step tolerates a missing piece."""
        with contextlib.suppress(Exception):
            self.policy.forget(record)
        for ip in record.ips():
            # The address is still this endpoint's (IPAM releases it below), so is its entry.
            with contextlib.suppress(Exception):
                self.datapath.delete_endpoint(ip)
            if self.cluster is not None and record.state == EP_READY:
                self.cluster.withdraw_endpoint(str(ip))
        # The map entries are gone, so the pod is cut off; the kernel's slow unregistering of
        # the veth happens in the background.
        self.reaper.delete(record.host_ifname)
        for allocator in self.state.ipam.values():
            allocator.release_owner(record.key)
        if record.identity:
            self.state.identities.release(record.identity)
        self.state.endpoints.pop(record.key, None)
        self._save()

    def cni_del(self, p: dict[str, Any]) -> dict[str, Any]:
        container_id, ifname = _require(p, "containerID"), _require(p, "ifname")
        key = endpoint_key(container_id, ifname)
        record = self.state.endpoints.get(key)
        if record is not None:
            self._teardown(record)
        else:
            # Nothing recorded: still release any address a crash left with this owner.
            freed = [a for alloc in self.state.ipam.values() for a in alloc.release_owner(key)]
            if freed:
                self._save()
        return {}

    def cni_check(self, p: dict[str, Any]) -> dict[str, Any]:
        container_id, ifname = _require(p, "containerID"), _require(p, "ifname")
        record = self.state.endpoints.get(endpoint_key(container_id, ifname))
        if record is None or record.state != EP_READY:
            raise AgentError(UNKNOWN_CONTAINER, f"no endpoint for container {container_id} interface {ifname}")
        prev = p.get("prevResult") or {}
        want = {str(ipaddress.ip_interface(ip["address"]).ip) for ip in prev.get("ips", [])}
        if want and want != set(record.addresses):
            raise AgentError(CHECK_FAILED, f"prevResult addresses {sorted(want)} differ from the endpoint's "
                             f"{record.addresses}")
        if veth.host_link_index(record.host_ifname) is None:
            raise AgentError(CHECK_FAILED, f"host interface {record.host_ifname}, the peer of {record.ifname} in "
                             f"{record.netns}, is missing")
        pod_side = veth.inspect_pod_side(record.netns, record.ifname)
        if pod_side is None:
            raise AgentError(CHECK_FAILED, f"interface {record.ifname} is missing in {record.netns}")
        have = {str(ipaddress.ip_interface(a).ip) for a in pod_side.addresses}
        missing = set(record.addresses) - have
        if missing:
            raise AgentError(CHECK_FAILED, f"{record.ifname} in {record.netns} lacks {sorted(missing)}")
        in_map = self.datapath.endpoints()
        for ip in record.ips():
            if ip not in in_map:
                raise AgentError(CHECK_FAILED, f"datapath has no endpoint entry for {ip}")
        return {}

    def cni_status(self, p: dict[str, Any]) -> dict[str, Any]:
        for version, alloc in self.state.ipam.items():
            if alloc.used >= alloc.capacity:
                raise AgentError(NOT_AVAILABLE, f"IPv{version} block {alloc.block} is exhausted")
        if not self.datapath.programs():
            raise AgentError(NOT_AVAILABLE, "datapath programs are not loaded")
        return {}

    def cni_gc(self, p: dict[str, Any]) -> dict[str, Any]:
        network = str(p.get("network", ""))
        valid = {endpoint_key(str(a.get("containerID", "")), str(a.get("ifname", "")))
                 for a in p.get("validAttachments") or []}
        for record in list(self.state.endpoints.values()):
            if record.network == network and record.key not in valid:
                log.info("GC: releasing %s (not a valid attachment)", record.key)
                self._teardown(record)
        self.gc_orphans()
        return {}

    # ---------------------------------------------------------------- metadata
    def pod_set(self, p: dict[str, Any]) -> dict[str, Any]:
        """Pod metadata, as the API server would hold it: labels and named container ports."""
        namespace, name = _require(p, "namespace"), _require(p, "name")
        labels = {str(k): str(v) for k, v in (p.get("labels") or {}).items()}
        ports = [{"name": str(x["name"]), "protocol": str(x.get("protocol", "TCP")).upper(), "port": int(x["port"])}
                 for x in p.get("ports") or [] if x.get("name")]
        self.state.pods[f"{namespace}/{name}"] = {"labels": labels, "ports": ports}
        self._refresh_identities(lambda r: r.pod_namespace == namespace and r.pod_name == name)
        self._save()
        return {}

    def namespace_set(self, p: dict[str, Any]) -> dict[str, Any]:
        """Namespace labels; every pod of the namespace carries them in its identity."""
        namespace = _require(p, "name")
        self.state.namespaces[namespace] = {str(k): str(v) for k, v in (p.get("labels") or {}).items()}
        self._refresh_identities(lambda r: r.pod_namespace == namespace)
        self._save()
        return {}

    # ---------------------------------------------------------------- reads
    def endpoint_list(self, p: dict[str, Any]) -> list[dict[str, Any]]:
        out = []
        for record in sorted(self.state.endpoints.values(), key=lambda r: r.ep_id):
            labels = self.state.identities.labels_of(record.identity) or frozenset()
            out.append({
                "id": record.ep_id,
                "pod": f"{record.pod_namespace}/{record.pod_name}" if record.pod_name else "",
                "containerID": record.container_id,
                "ifname": record.ifname,
                "netns": record.netns,
                "hostInterface": record.host_ifname,
                "hostMAC": record.host_mac,
                "podMAC": record.pod_mac,
                "addresses": record.addresses,
                "identity": record.identity,
                "labels": format_labels(labels),
                "namedPorts": self.state.pods.get(f"{record.pod_namespace}/{record.pod_name}", {}).get("ports", []),
                "state": record.state,
                "node": self.config.node_name,
            })
        return out

    def status(self, p: dict[str, Any]) -> dict[str, Any]:
        attached = 0
        for record in self.state.endpoints.values():
            if record.state == EP_READY:
                with contextlib.suppress(Exception):
                    ids = self.datapath.attached_program_ids(record.host_ifname, record.host_ifindex)
                    attached += 1 if ids.get("ingress") and ids.get("egress") else 0
        return {
            "node": self.config.node_name,
            "healthy": True,
            "uptime_s": round(time.time() - self.started_at, 1),
            "endpoints": len(self.state.endpoints),
            "endpoints_attached": attached,
            "programs": self.datapath.programs(),
            "maps": {k: {"entries": v[0], "max": v[1]} for k, v in self.datapath.map_fill().items()},
            "counters": {k: {"packets": v[0], "bytes": v[1]} for k, v in self.datapath.counters().items()},
            "ipam": {f"ipv{v}": {"block": str(a.block), "used": a.used, "capacity": a.capacity}
                     for v, a in sorted(self.state.ipam.items())},
            "last_reconcile": self.last_reconcile,
            "pending_link_deletions": self.reaper.pending(),
            "pin_dir": str(self.config.pin_dir),
            "dns_proxy": self._proxy_health(),
            "flows": self.flows.status(),
            "metrics": {"address": self.config.metrics_address, "serving": self.metrics_serving},
            "cluster": self._cluster_status(),
        }

    def _cluster_status(self) -> dict[str, Any] | None:
        if self.cluster is None:
            return None
        remote = self.remote
        return {**self.cluster.status(),
                "nodes": sorted(remote.nodes) if remote else [],
                "remote_endpoints": sum(1 for ep in remote.endpoints.values() if ep.node != self.config.node_name)
                if remote else 0,
                "identities": sorted(remote.identities) if remote else [],
                "tunnels": {str(net): str(route.address) for net, route in self.datapath.tunnels().items()}}

    def _proxy_health(self) -> dict[str, Any]:
        """The node's DNS proxy as ``weft status`` shows it (a process of its own: asked, not
        assumed)."""
        settings = self.config.dns_proxy
        if not settings.enabled:
            return {"enabled": False}
        sock = settings.socket_path or default_socket_path(self.config.state_dir)
        try:
            status = ProxyClient(sock, timeout=1.0).status()
        except (ProxyUnavailable, ProxyCallError, OSError) as exc:
            return {"enabled": True, "healthy": False, "error": str(exc), "socket": str(sock)}
        if not isinstance(status, dict):
            return {"enabled": True, "healthy": False, "error": "unexpected status reply"}
        return {"enabled": True, "healthy": bool(status.get("healthy", status.get("ready", True))), **status}

    # ---------------------------------------------------------------- reconcile and GC
    def reconcile(self) -> dict[str, Any]:
        """Hold the kernel to the recorded state: roll back half-done ADDs, restore missing
        interfaces and map entries, re-attach programs, remove stale links and map entries."""
        report: dict[str, Any] = {"rolled_back": [], "restored_links": [], "released": [],
                                  "stale_links": [], "stale_map_entries": [], "at": time.time()}
        ids = self.datapath.program_ids()
        wanted_progs = {"ingress": ids["from_container"], "egress": ids["to_container"]}
        # After a restart the enforcement flags in the kernel are the policy's until regenerate()
        # recomputes them: rewriting entries with none would open a window without enforcement.
        known = {r.ep_id for r in self.state.endpoints.values()}
        for entry in self.datapath.endpoints().values():
            if entry.ep_id in known:
                self.policy.flags.setdefault(entry.ep_id, entry.policy_flags)
        for record in list(self.state.endpoints.values()):
            if record.state == EP_CREATING:
                report["rolled_back"].append(record.key)
                self._teardown(record)
                continue
            index = veth.host_link_index(record.host_ifname)
            if index is None:
                if os.path.exists(record.netns):
                    # Restore: the pod still exists, its interface was lost.
                    with contextlib.suppress(Exception):
                        veth.delete_pod_link(record.netns, record.ifname)
                    try:
                        self._wire(record)
                        report["restored_links"].append(record.key)
                        continue
                    except Exception as exc:
                        log.warning("restoring %s failed: %s", record.key, exc)
                report["released"].append(record.key)
                self._teardown(record)
                continue
            record.host_ifindex = index
            # Re-attach only where the current programs are not in place (after a restart they
            # are new): a replace per endpoint on every periodic pass would be wasted work.
            if self.datapath.attached_program_ids(record.host_ifname, index) != wanted_progs:
                self.datapath.attach(record.host_ifname, index)
            self._write_map_entries(record)
        wanted_ips = {ip for r in self.state.endpoints.values() for ip in r.ips()}
        for ip in list(self.datapath.endpoints()):
            if ip not in wanted_ips:
                self.datapath.delete_endpoint(ip)
                report["stale_map_entries"].append(str(ip))
        wanted_links = {r.host_ifname for r in self.state.endpoints.values()}
        for name in veth.list_host_links():
            if name not in wanted_links:
                veth.delete_host_link(name)
                report["stale_links"].append(name)
        self.gc_orphans()
        self._save()
        self.policy.regenerate()
        self.last_reconcile = report
        return report

    def gc_orphans(self) -> list[str]:
        """Release addresses no endpoint holds (a crash between two writes can leave one)."""
        owners = set(self.state.endpoints)
        freed: list[str] = []
        for alloc in self.state.ipam.values():
            for ip, owner in list(alloc.allocations().items()):
                if owner not in owners:
                    alloc.release(ip)
                    freed.append(str(ip))
        if freed:
            log.info("GC released %s", freed)
            self._save()
        return freed

    def periodic_gc(self) -> dict[str, Any]:
        """Endpoints whose netns and interface are both gone were deleted without a DEL."""
        released = []
        for record in list(self.state.endpoints.values()):
            if (record.state == EP_READY and not os.path.exists(record.netns)
                    and veth.host_link_index(record.host_ifname) is None):
                released.append(record.key)
                self._teardown(record)
        return {"released": released, "orphans": self.gc_orphans()}

    def handlers(self) -> dict[str, Callable[[dict[str, Any]], Any]]:
        return {
            "cni.add": _recycling(self.cni_add), "cni.del": _recycling(self.cni_del), "cni.check": self.cni_check,
            "cni.status": self.cni_status, "cni.gc": self.cni_gc, "cni.exec": self.cni_exec, "pod.set": self.pod_set,
            "namespace.set": self.namespace_set,
            "policy.apply": self.policy.apply, "policy.delete": self.policy.delete,
            "policy.list": self.policy.list_policies, "policy.get": self.policy.get,
            "policy.trace": lambda p: self.policy.trace(p, self._find_pod),
            "endpoint.list": self.endpoint_list, "status": self.status, "flows.get": self.flows.get,
            "ping": lambda p: {"node": self.config.node_name},
            "reconcile": lambda p: self.reconcile(), "gc": lambda p: self.periodic_gc(),
            "sync": lambda p: {"drained": self.reaper.drain(float(p.get("timeout", 30)))},
            "cluster.gc": lambda p: self.identity_gc(),
            "cluster.remove_node": self.remove_node,
        }

    def cni_exec(self, p: dict[str, Any]) -> dict[str, Any]:
        """A whole weft-cni invocation from the native launcher (cni/weft-cni.c), which execs no
        interpreter: the plugin's own code (weft.cni.plugin) runs here, on the agent's worker, with
        the invocation's environment and stdin, calling these handlers directly. Params: ``env``
        (CNI_* variable -> base64), ``stdin`` (base64), ``netns`` ([st_dev, st_ino] of the
        launcher's netns). Result: ``exit`` and ``stdout`` (base64) as the plugin gives them."""
        try:
            env = {str(k): base64.b64decode(v, validate=True).decode("utf-8", "surrogateescape")
                   for k, v in dict(p.get("env") or {}).items()}
            stdin = base64.b64decode(str(p.get("stdin", "")), validate=True)
            netns = p.get("netns")
            own = (int(netns[0]), int(netns[1])) if isinstance(netns, list) and len(netns) == 2 else None
        except (ValueError, TypeError) as exc:
            raise AgentError(BAD_REQUEST, f"cni.exec: malformed params: {exc}") from None
        handlers = self.handlers()

        def dispatch(method: str, params: dict[str, Any]) -> Any:
            handler = handlers.get(method)
            if handler is None or method == "cni.exec":
                raise AgentError(BAD_REQUEST, f"unknown method {method!r}")
            return handler(params)

        status, out = cni_plugin.run_in_agent(env, stdin, own, dispatch)
        return {"exit": status, "stdout": base64.b64encode(out.encode("utf-8", "surrogateescape")).decode("ascii")}

    def _find_pod(self, ref: str) -> EndpointRecord | None:
        for record in self.state.endpoints.values():
            if record.pod_name and f"{record.pod_namespace}/{record.pod_name}" == ref and record.state == EP_READY:
                return record
        return None

    def _result(self, record: EndpointRecord) -> dict[str, Any]:
        ips, routes = [], []
        for ip in record.ips():
            gw = gateway_of(self.blocks[ip.version])
            ips.append({"address": f"{ip}/{ip.max_prefixlen}", "gateway": str(gw), "interface": 1})
            routes.append({"dst": "0.0.0.0/0" if ip.version == 4 else "::/0", "gw": str(gw)})
        return {
            "interfaces": [
                {"name": record.host_ifname, "mac": record.host_mac},
                {"name": record.ifname, "mac": record.pod_mac, "sandbox": record.netns},
            ],
            "ips": ips,
            "routes": routes,
            "dns": {},
        }


def _fault_point(name: str) -> None:
    """Crash here if the operator asked for it (WEFT_FAULT=<name>): tests use this to prove
    that an agent killed at this instant leaks nothing."""
    if os.environ.get("WEFT_FAULT") == name:
        log.error("fault injection: exiting at %s", name)
        os._exit(137)


def _require(p: dict[str, Any], name: str) -> str:
    value = p.get(name)
    if not isinstance(value, str) or not value:
        raise AgentError(INVALID_ENV, f"request lacks {name}")
    return value


def _recycling(handler: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], Any]:
    """Run a CNI handler, then let the worker's netlink socket be replaced if it is due: the end
    of a request is a point where nothing holds it (see weft.datapath.netlink.recycle_node_ipr)."""
    def run(p: dict[str, Any]) -> Any:
        try:
            return handler(p)
        finally:
            recycle_node_ipr()
    return run
