"""The lab cluster: node namespaces with their agents, pods wired by the real weft-cni.

Layout of one lab named ``L`` (default ``weft``):
- network namespaces ``L-node-1`` .. ``L-node-N`` and one ``L-pod-<ns>-<name>`` per pod;
- unless ``--no-world``: the underlay ``L-vnet``, the world ``L-world`` (servers and DNS behind
  the nodes' uplinks) and the pod ``kube-system/kube-dns``; see ``weft.lab.world``;
- files under ``/run/weft/labs/L/`` (lab.json, per-node config, CNI config dir, agent socket,
  agent state and logs, the CNI bin dir with the weft-cni launcher, CNI result cache, each pod's
  resolv.conf under ``pods/``, the world's logs under ``world/``);
- pins under ``/sys/fs/bpf/weft/L/<node>/``;
- processes (agents, pod servers, dnsmasq) carry ``WEFT_LAB=L`` in their environment, so
  ``down`` finds them even when lab.json was lost in a crash.
Nothing is added to the root namespace, and no namespace has a route out of the machine: the
nodes' default routes lead to the world namespace, which routes nowhere.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from weft.agent.client import AgentClient
from weft.cni.launcher import write_launcher
from weft.dnsproxy.control import ProxyCallError, ProxyClient, ProxyUnavailable
from weft.ipam.pool import ClusterPool, IPFamilies, default_pools
from weft.lab import world as plan
from weft.lab.runtime import CniRuntime
from weft.lab.servers import ServeSpec

LABS_DIR = Path("/run/weft/labs")
BPF_DIR = Path("/sys/fs/bpf/weft")
NETNS_DIR = Path("/run/netns")
REPO_ROOT = Path(__file__).resolve().parents[3]


class LabError(Exception):
    pass


# Daemons this process started (agents, pod servers). Keeping the Popen objects lets us reap
# them when they exit, and they outlive this process when it exits first (new sessions).
_children: dict[int, subprocess.Popen[bytes]] = {}
_state_lock = threading.Lock()  # lab.json's read-modify-write by this process's threads


def wait_for(what: str, predicate: Callable[[], bool], timeout: float = 20.0, interval: float = 0.02) -> None:
    """Poll ``predicate`` until it holds or the deadline passes (no blind sleeps)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise LabError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def _run(*argv: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, input=stdin)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def _ip_batch(netns: str, commands: str) -> None:
    """Several ``ip`` commands in one process (``ip -batch``): lab up stays fast."""
    _run("ip", "-n", netns, "-batch", "-", stdin=commands)


def _in_netns(netns: str, argv: list[str]) -> list[str]:
    # nsenter, not `ip netns exec`: that one remounts /sys and hides bpffs.
    return ["nsenter", f"--net={NETNS_DIR / netns}", *argv]


@dataclass
class NodeInfo:
    name: str
    index: int
    netns: str
    config_path: str
    socket_path: str
    conf_dir: str
    agent_pid: int = 0
    uplink: list[str] = field(default_factory=list)  # eth0's addresses on the underlay (none: no world)
    proxy_pid: int = 0  # the node's DNS proxy (a process of its own, like in Cilium's standalone mode)

    @property
    def proxy_socket(self) -> Path:
        return Path(self.config_path).parent / "state" / "dnsproxy" / "proxy.sock"


@dataclass
class PodInfo:
    namespace: str
    name: str
    node: str
    netns: str
    container_id: str
    labels: dict[str, str] = field(default_factory=dict)
    serve: list[str] = field(default_factory=list)
    server_pid: int = 0
    addresses: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass
class LabState:
    name: str
    ip_family: str = "dual"
    nodes: list[NodeInfo] = field(default_factory=list)
    pods: dict[str, PodInfo] = field(default_factory=dict)
    namespaces: dict[str, dict[str, str]] = field(default_factory=dict)
    world: bool = False
    # The cluster resolver every pod's resolv.conf names: kube-dns's pod addresses.
    dns_servers: list[str] = field(default_factory=list)
    # How nodes reach each other's pods ("none": nodes on their own), and the cluster store.
    mode: str = "none"
    store: str = ""
    store_pid: int = 0


class Lab:
    def __init__(self, name: str = "weft") -> None:
        if not name or len(name) > 16 or not name.replace("-", "").isalnum():
            raise LabError(f"lab name {name!r} must be 1-16 letters, digits or dashes")
        self.name = name
        self.base = LABS_DIR / name
        self.state_path = self.base / "lab.json"
        self.bin_dir = self.base / "cni" / "bin"
        self.cache_dir = self.base / "cni" / "cache"
        self.pin_root = BPF_DIR / name

    # ------------------------------------------------------------------ state
    def exists(self) -> bool:
        return self.state_path.exists()

    def load(self) -> LabState:
        if not self.exists():
            raise LabError(f"lab {self.name!r} is not up (no {self.state_path}); run `weft lab up`")
        raw = json.loads(self.state_path.read_text())
        return LabState(
            name=raw["name"], ip_family=raw.get("ip_family", "dual"),
            nodes=[NodeInfo(**n) for n in raw["nodes"]],
            pods={k: PodInfo(**v) for k, v in raw["pods"].items()},
            namespaces=raw.get("namespaces", {}),
            world=raw.get("world", False), dns_servers=raw.get("dns_servers", []),
            mode=raw.get("mode", "none"), store=raw.get("store", ""), store_pid=raw.get("store_pid", 0),
        )

    def save(self, state: LabState) -> None:
        # A temporary file of this thread's own: pods may be added from several threads at once.
        tmp = self.state_path.with_suffix(f".tmp.{os.getpid()}.{threading.get_ident()}")
        tmp.write_text(json.dumps(asdict(state), indent=1))
        os.replace(tmp, self.state_path)

    def node(self, state: LabState, name: str) -> NodeInfo:
        for node in state.nodes:
            if node.name == name:
                return node
        raise LabError(f"no node {name!r} in lab {self.name} (nodes: {', '.join(n.name for n in state.nodes)})")

    def client(self, node: NodeInfo, timeout: float = 30.0) -> AgentClient:
        return AgentClient(Path(node.socket_path), timeout=timeout)

    def runtime(self, node: NodeInfo) -> CniRuntime:
        return CniRuntime(conf_dir=Path(node.conf_dir), bin_dirs=[self.bin_dir], cache_dir=self.cache_dir,
                          exec_netns=str(NETNS_DIR / node.netns))

    # ------------------------------------------------------------------ up / down
    def up(self, nodes: int = 1, ip_family: str = "dual", progress: Callable[[str], None] | None = None,
           pools: dict[int, ClusterPool] | None = None, world: bool = True, mode: str | None = None,
           store: str = "sqlite") -> LabState:
        """Create ``nodes`` node namespaces with an agent each. ``pools`` overrides the cluster
        pod CIDRs and per-node block sizes (default: Azure CNI overlay's; direct mode: blocks of
        the underlay). ``world``: also the underlay, the world behind it and kube-dns (see
        ``weft.lab.world``). ``mode``: how nodes reach each other's pods, ``overlay`` (VXLAN,
        the default with several nodes) or ``direct`` (pods addressed from the underlay, routed);
        ``none``: nodes on their own. ``store``: the cluster store, ``sqlite`` (a file every
        agent opens) or ``etcd`` (a real etcd server on the underlay)."""
        say = progress or (lambda _msg: None)
        family = IPFamilies(ip_family)
        if nodes < 1 or nodes > 250:
            raise LabError(f"--nodes {nodes}: a lab has 1 to 250 nodes")
        if self.exists():
            raise LabError(f"lab {self.name!r} is already up; `weft lab down` first")
        if mode is None:
            mode = "overlay" if nodes > 1 and world else "none"
        if mode not in ("overlay", "direct", "none"):
            raise LabError(f"--mode {mode!r}: overlay, direct or none")
        if store not in ("sqlite", "etcd"):
            raise LabError(f"--store {store!r}: sqlite or etcd")
        if mode != "none" and not world:
            raise LabError(f"--mode {mode} needs the underlay the nodes share: drop --no-world")
        if mode == "direct" and not pools:
            pools = {4: ClusterPool.parse(plan.DIRECT_POD_CIDR_V4, plan.DIRECT_NODE_MASK_V4),
                     6: ClusterPool.parse(plan.DIRECT_POD_CIDR_V6, plan.DIRECT_NODE_MASK_V6)}
        pools = {**default_pools(), **(pools or {})}
        pod_cidrs = [str(pools[v].cidr) for v in family.versions]
        if world:
            for cidr in pod_cidrs:
                if mode == "direct":
                    net = ipaddress.ip_network(cidr)
                    underlay = plan.UNDERLAY_V4 if net.version == 4 else plan.UNDERLAY_V6
                    if not net.subnet_of(underlay):  # type: ignore[arg-type]
                        raise LabError(f"--mode direct: pod CIDR {cidr} must be part of the underlay {underlay}")
                elif plan.overlaps_world(cidr):
                    raise LabError(f"pod CIDR {cidr} overlaps the lab's underlay or world ranges "
                                   f"({plan.UNDERLAY_V4}, {plan.UNDERLAY_V6}, "
                                   f"{', '.join(map(str, plan.WORLD_RANGES))}); pick another or use --no-world")
        self.down(quiet=True)  # leftovers of a crashed run
        _ensure_bpffs()
        self.base.mkdir(parents=True, exist_ok=True)
        write_launcher(self.bin_dir / "weft-cni")
        state = LabState(name=self.name, ip_family=family.value, world=world, mode=mode,
                         store=store if mode != "none" else "")
        self.save(state)
        try:
            # The world's daemons start while the nodes and agents come up; waited for after.
            world_ready = self._make_world() if world else None
            if world_ready:
                say(f"world: {plan.world_netns(self.name)} behind {plan.vnet_netns(self.name)}")
            if state.store == "etcd":
                self.start_store(state)
                say(f"cluster store: etcd on {plan.STORE_V4}:{plan.ETCD_CLIENT_PORT} in {plan.store_netns(self.name)}")
            for i in range(1, nodes + 1):
                node = self._make_node(i, family, pools, state)
                if world:
                    self._plug_node(node, pod_cidrs)
                state.nodes.append(node)
                self.save(state)
                say(f"node {node.name}: netns {node.netns}")
                self.start_agent(state, node.name)
                say(f"node {node.name}: agent ready")
                self.start_dnsproxy(state, node.name)
                say(f"node {node.name}: DNS proxy ready")
            self.start_relay()
            say(f"relay: {self.relay_socket}")
            if world_ready:
                world_ready()
                dns = self._add_kube_dns(state)
                say(f"kube-dns: {', '.join(dns.addresses)}")
        except BaseException:
            self.down(quiet=True)
            raise
        return state

    def _make_world(self) -> Callable[[], None]:
        """The underlay bridge and the world namespace with its servers and DNS. Returns the
        wait for the daemons, so that the caller does other work while they start."""
        vnet, wns = plan.vnet_netns(self.name), plan.world_netns(self.name)
        _run("ip", "netns", "add", vnet)
        _ip_batch(vnet, plan.vnet_batch())
        _run("ip", "netns", "add", wns)
        _run(*_in_netns(wns, ["sysctl", "-q", "-w", *plan.no_dad_sysctls()]))
        self._plug(wns, plan.WORLD_PORT)
        _ip_batch(wns, "link set lo up\n" + plan.uplink_batch([plan.ROUTER_V4, plan.ROUTER_V6], [],
                                                               plan.world_lo_addresses()))
        wdir = self.base / "world"
        wdir.mkdir(parents=True, exist_ok=True)
        ready_file = wdir / "servers.ready"
        servers = self._spawn(_in_netns(wns, [sys.executable, "-m", "weft.lab.servers", *plan.WORLD_SERVE]),
                              wdir / "servers.log", WEFT_SERVER_READY_FILE=str(ready_file), WEFT_POD="world",
                              WEFT_SERVER_PEER_LOG=str(self.world_peer_log),
                              WEFT_SERVER_ADDRESSES=",".join(plan.world_server_addresses()))
        dns = self._spawn(_in_netns(wns, plan.world_dns_argv(wdir / "dns.log")), wdir / "dns.out")

        def ready() -> None:
            _wait_daemon("the world's servers", servers, wdir / "servers.log", ready_file.exists)
            _wait_daemon("the world's DNS server", dns, wdir / "dns.log",
                         lambda: _listening(dns.pid, 53, plan.world_dns_servers()))
        return ready

    def _plug(self, netns: str, port: str) -> None:
        """A veth from ``netns`` (its end named eth0) into the underlay bridge (port ``port``)."""
        vnet = plan.vnet_netns(self.name)
        _run("ip", "-n", netns, "link", "add", plan.UPLINK, "type", "veth", "peer", "name", port, "netns", vnet)
        _ip_batch(vnet, f"link set {port} master {plan.BRIDGE}\nlink set {port} up\n")

    def _plug_node(self, node: NodeInfo, pod_cidrs: list[str]) -> None:
        """The node's uplink, default routes to the world router, forwarding and masquerade."""
        node.uplink = plan.node_uplink_addresses(node.index)
        # Sysctls first: the uplink made next inherits the "default" ones.
        _run(*_in_netns(node.netns, ["sysctl", "-q", "-w", *plan.node_sysctls()]))
        self._plug(node.netns, plan.bridge_port(node.index))
        _ip_batch(node.netns, plan.uplink_batch(node.uplink, [plan.ROUTER_V4, plan.ROUTER_V6]))
        _run(*_in_netns(node.netns, ["nft", "-f", "-"]), stdin=plan.masquerade_ruleset(pod_cidrs))

    def _add_kube_dns(self, state: LabState) -> PodInfo:
        """kube-system/kube-dns on the first node, through the normal pod path (a real endpoint
        with an identity), serving DNS with dnsmasq; its addresses become the cluster resolver."""
        family = IPFamilies(state.ip_family)
        upstream = [a for a in plan.world_dns_servers() if (6 if ":" in a else 4) in family.versions]
        pod = self._add_pod(state, "kube-system", "kube-dns", state.nodes[0].name, {"k8s-app": "kube-dns"},
                            [ServeSpec("udp", 53, "dns"), ServeSpec("tcp", 53, "dns-tcp")],
                            # dnsPolicy Default, as CoreDNS has: the node's resolver, the world's DNS.
                            nameservers=upstream, start=self._start_kube_dns)
        state.dns_servers = list(pod.addresses)
        self.save(state)
        return pod

    def _start_kube_dns(self, pod: PodInfo) -> int:
        log = self.kube_dns_log
        proc = self._spawn(self._pod_argv(pod, plan.kube_dns_argv(pod.addresses, log)),
                           self.base / "kube-dns.out", WEFT_POD=pod.key)
        _wait_daemon("kube-dns", proc, log, lambda: _listening(proc.pid, 53, pod.addresses))
        return proc.pid

    def _cluster_settings(self, state: LabState, index: int) -> dict[str, Any]:
        settings: dict[str, Any] = {"mode": state.mode, "store": state.store, "uplink": plan.UPLINK,
                                    "addresses": plan.node_uplink_addresses(index)}
        if state.store == "etcd":
            settings["store_endpoint"] = f"http://{plan.STORE_V4}:{plan.ETCD_CLIENT_PORT}"
        else:
            settings["store_path"] = str(self.store_path)
        return settings

    @property
    def store_path(self) -> Path:
        return self.base / "store" / "cluster.db"

    # ------------------------------------------------------------------ the cluster store
    def start_store(self, state: LabState) -> int:
        """etcd in its own netns on the underlay (made the first time), data kept across
        restarts in the lab's directory."""
        netns = plan.store_netns(self.name)
        if not (NETNS_DIR / netns).exists():
            _run("ip", "netns", "add", netns)
            _run(*_in_netns(netns, ["sysctl", "-q", "-w", *plan.no_dad_sysctls()]))
            self._plug(netns, plan.STORE_PORT)
            _ip_batch(netns, "link set lo up\n" + plan.uplink_batch([plan.STORE_V4, plan.STORE_V6], []))
        sdir = self.base / "store"
        sdir.mkdir(parents=True, exist_ok=True)
        proc = self._spawn(_in_netns(netns, plan.etcd_argv(f"{self.name}-store", sdir / "etcd-data",
                                                           sdir / "etcd.log")), sdir / "etcd.out")
        _wait_daemon("etcd", proc, sdir / "etcd.log",
                     lambda: {(ipaddress.ip_address(plan.STORE_V4), plan.ETCD_CLIENT_PORT)}
                     <= _sockets(proc.pid, "tcp", "0A"))
        state.store_pid = proc.pid
        self.save(state)
        return proc.pid

    def stop_store(self, state: LabState, sig: int = signal.SIGTERM) -> None:
        _stop_process("etcd", state.store_pid, sig)
        state.store_pid = 0
        self.save(state)

    def node_remove(self, node_name: str) -> dict[str, Any]:
        """A node leaves the cluster (as ``kubectl delete node``): its agent stops, its pods
        and namespace go, and the cluster store forgets it (asked of another node's agent),
        so every other node removes its tunnel entries, routes and endpoints."""
        state = self.load()
        node = self.node(state, node_name)
        others = [n for n in state.nodes if n.name != node_name]
        self.stop_agent(state, node_name)
        self.stop_dnsproxy(state, node_name)
        for key, pod in list(state.pods.items()):
            if pod.node == node_name:
                if pod.server_pid:
                    _kill(pod.server_pid)
                _run("ip", "netns", "del", pod.netns, check=False)
                del state.pods[key]
        _run("ip", "netns", "del", node.netns, check=False)
        shutil.rmtree(self.pin_root / node_name, ignore_errors=True)
        state.nodes = others
        self.save(state)
        result: dict[str, Any] = {"node": node_name, "removed_keys": 0}
        if state.mode != "none" and others:
            result = self.client(others[0]).call("cluster.remove_node", {"name": node_name})
        return result

    def _make_node(self, index: int, family: IPFamilies, pools: dict[int, ClusterPool],
                   state: LabState | None = None) -> NodeInfo:
        name = f"node-{index}"
        netns = f"{self.name}-{name}"
        _run("ip", "netns", "add", netns)
        _run("ip", "-n", netns, "link", "set", "lo", "up")
        node_dir = self.base / name
        conf_dir = node_dir / "net.d"
        conf_dir.mkdir(parents=True, exist_ok=True)
        socket_path = node_dir / "agent.sock"
        config: dict[str, Any] = {
            "node_name": name,
            "state_dir": str(node_dir / "state"),
            "socket_path": str(socket_path),
            "pin_dir": str(self.pin_root / name),
            "ip_family": family.value,
            "pod_block_v4": str(pools[4].node_block(index)) if 4 in family.versions else None,
            "pod_block_v6": str(pools[6].node_block(index)) if 6 in family.versions else None,
        }
        if state is not None and state.mode != "none":
            config["cluster"] = self._cluster_settings(state, index)
            config["cluster_cidrs"] = [str(pools[v].cidr) for v in family.versions]
            config["mtu"] = plan.pod_mtu(state.mode, family.versions)
        config_path = node_dir / "node.json"
        config_path.write_text(json.dumps(config, indent=1))
        conflist = {
            "cniVersion": "1.0.0",
            "name": "weft",
            "plugins": [{"type": "weft-cni", "agentSocket": str(socket_path)}],
        }
        (conf_dir / "10-weft.conflist").write_text(json.dumps(conflist, indent=1))
        return NodeInfo(name=name, index=index, netns=netns, config_path=str(config_path),
                        socket_path=str(socket_path), conf_dir=str(conf_dir))

    def _env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env["WEFT_LAB"] = self.name
        env.update(extra)
        return env

    def _spawn(self, argv: list[str], log_path: Path, **env: str) -> subprocess.Popen[bytes]:
        """A lab daemon (argv enters its netns), in a session of its own, marked with WEFT_LAB so
        ``down`` finds it whatever happened."""
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                                    env=self._env(**env))
        _children[proc.pid] = proc
        return proc

    def start_agent(self, state: LabState, node_name: str) -> int:
        node = self.node(state, node_name)
        proc = self._spawn(_in_netns(node.netns, [sys.executable, "-m", "weft.agent.main", "--config",
                                                  node.config_path]),
                           Path(node.config_path).parent / "agent.log")
        node.agent_pid = proc.pid
        self.save(state)
        client = self.client(node, timeout=5)

        def ready() -> bool:
            if proc.poll() is not None:
                raise LabError(f"agent of {node.name} exited with {proc.returncode}; see "
                               f"{Path(node.config_path).parent / 'agent.log'}")
            return client.alive()

        wait_for(f"agent of {node.name}", ready, timeout=30)
        return proc.pid

    # ------------------------------------------------------------------ Hubble relay
    @property
    def relay_socket(self) -> Path:
        return self.base / "relay.sock"

    def start_relay(self) -> int:
        """The lab's Hubble relay (``weft relay``): one Observer merging every node's. The default
        lab also takes Hubble Relay's TCP port (127.0.0.1:4245) and serves the web UI (the live
        service map) on hubble-ui's 127.0.0.1:12000; other labs use the socket only."""
        default = self.name == "weft"
        log_path = self.base / "relay.log"
        proc = self._spawn([sys.executable, "-m", "weft.hubble.relay", "--lab", self.name,
                            "--listen", "127.0.0.1:4245" if default else "", "--ui-port", "12000" if default else "0"],
                           log_path)

        def ready() -> bool:
            if proc.poll() is not None:
                raise LabError(f"relay exited with {proc.returncode}; see {log_path}")
            return self.relay_socket.exists()

        wait_for("relay", ready, timeout=20)
        return proc.pid

    # ------------------------------------------------------------------ DNS proxy
    def start_dnsproxy(self, state: LabState, node_name: str) -> int:
        """Start the node's DNS proxy. With one already running, the new process takes its
        sockets over (no query lost) and the old one exits once its queries in flight are done:
        that is also how a restart or an upgrade is done (:meth:`restart_dnsproxy`)."""
        node = self.node(state, node_name)
        log_path = Path(node.config_path).parent / "dnsproxy.log"
        proc = self._spawn(_in_netns(node.netns, [sys.executable, "-m", "weft.dnsproxy.main", "--config",
                                                  node.config_path]), log_path)
        client = ProxyClient(node.proxy_socket, timeout=5)

        def ready() -> bool:
            if proc.poll() is not None:
                raise LabError(f"DNS proxy of {node.name} exited with {proc.returncode}; see {log_path}")
            try:
                status = client.status()
            except (ProxyUnavailable, ProxyCallError):
                return False
            return int(status.get("pid", 0)) == proc.pid and bool(status.get("ready", True))

        wait_for(f"DNS proxy of {node.name}", ready, timeout=30)
        node.proxy_pid = proc.pid
        self.save(state)
        return proc.pid

    def restart_dnsproxy(self, state: LabState, node_name: str) -> int:
        """A zero-outage restart: the new proxy takes the sockets over, the old one exits."""
        old = self.node(state, node_name).proxy_pid
        pid = self.start_dnsproxy(state, node_name)
        if old and old != pid:
            wait_for(f"old DNS proxy pid {old} to exit", lambda: not _alive(old), timeout=30)
        return pid

    def stop_dnsproxy(self, state: LabState, node_name: str, sig: int = signal.SIGTERM) -> None:
        node = self.node(state, node_name)
        _stop_process("DNS proxy", node.proxy_pid, sig)
        node.proxy_pid = 0
        self.save(state)

    def agent_alive(self, node_name: str) -> bool:
        node = self.node(self.load(), node_name)
        return bool(node.agent_pid) and _alive(node.agent_pid)

    def stop_agent(self, state: LabState, node_name: str, sig: int = signal.SIGTERM) -> None:
        node = self.node(state, node_name)
        _stop_process("agent", node.agent_pid, sig)
        node.agent_pid = 0
        self.save(state)

    def down(self, quiet: bool = False) -> list[str]:
        """Remove everything the lab made, found by name and marker, not only from lab.json."""
        removed: list[str] = []
        killed: list[int] = []
        for pid in _pids_with_env("WEFT_LAB", self.name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                removed.append(f"process {pid}")
        with contextlib.suppress(LabError):
            wait_for("lab processes to exit", lambda: not any(_alive(p) for p in killed), timeout=10)
        prefix = f"{self.name}-"
        world_netns = (plan.vnet_netns(self.name), plan.world_netns(self.name), plan.store_netns(self.name))
        if NETNS_DIR.is_dir():
            # Pods first, the underlay last: a node's uplink goes with the node, the bridge after.
            for entry in sorted(NETNS_DIR.iterdir(), key=lambda e: e.name in world_netns):
                if entry.name.startswith(prefix + "node-") or entry.name.startswith(prefix + "pod-") \
                        or entry.name in world_netns:
                    _run("ip", "netns", "del", entry.name, check=False)
                    removed.append(f"netns {entry.name}")
        if self.pin_root.exists():
            shutil.rmtree(self.pin_root, ignore_errors=True)
            removed.append(f"pins {self.pin_root}")
        for parent in (BPF_DIR, LABS_DIR):
            with contextlib.suppress(OSError):
                parent.rmdir()  # only if no other lab is left in it
        if self.base.exists():
            shutil.rmtree(self.base, ignore_errors=True)
            removed.append(f"dir {self.base}")
        return removed

    # ------------------------------------------------------------------ metadata
    def namespace_add(self, name: str, labels: dict[str, str] | None = None) -> None:
        """Create (or relabel) a namespace; like Kubernetes, it always carries
        kubernetes.io/metadata.name=<name>."""
        _check_dns_label(name, name)
        state = self.load()
        state.namespaces[name] = {**(labels or {}), "kubernetes.io/metadata.name": name}
        self._push_namespace(state, name)
        self.save(state)

    def _push_namespace(self, state: LabState, name: str) -> None:
        for node in state.nodes:
            self.client(node).call("namespace.set", {"name": name, "labels": state.namespaces[name]})

    def _push_pod(self, state: LabState, pod: PodInfo) -> None:
        node = self.node(state, pod.node)
        ports = [{"name": s.name, "protocol": s.protocol.upper() if s.protocol != "http" else "TCP", "port": s.port}
                 for s in (ServeSpec.parse(x) for x in pod.serve) if s.name]
        self.client(node).call("pod.set", {"namespace": pod.namespace, "name": pod.name, "labels": pod.labels,
                                           "ports": ports})

    def label(self, kind: str, ref: str, changes: dict[str, str | None]) -> dict[str, str]:
        """Change labels like ``kubectl label``: a value sets, None removes. Takes effect at once."""
        state = self.load()
        if kind == "namespace":
            _check_dns_label(ref, ref)
            current = dict(state.namespaces.get(ref, {"kubernetes.io/metadata.name": ref}))
            current = _apply_label_changes(current, changes)
            current["kubernetes.io/metadata.name"] = ref  # Kubernetes keeps this one
            state.namespaces[ref] = current
            self._push_namespace(state, ref)
        elif kind == "pod":
            namespace, name = parse_pod_ref(ref)
            pod = state.pods.get(f"{namespace}/{name}")
            if pod is None:
                raise LabError(f"no pod {namespace}/{name} in lab {self.name}")
            pod.labels = _apply_label_changes(pod.labels, changes)
            current = pod.labels
            self._push_pod(state, pod)
        else:
            raise LabError(f"cannot label {kind!r}: pod or namespace")
        self.save(state)
        return current

    # ------------------------------------------------------------------ pods
    def pod_add(self, ref: str, node_name: str | None = None, labels: dict[str, str] | None = None,
                serve: list[str] | None = None) -> PodInfo:
        namespace, name = parse_pod_ref(ref)
        specs = [ServeSpec.parse(s) for s in serve or []]
        state = self.load()
        return self._add_pod(state, namespace, name, node_name, labels, specs, nameservers=state.dns_servers,
                             start=self._start_servers if specs else None)

    def _add_pod(self, state: LabState, namespace: str, name: str, node_name: str | None,
                 labels: dict[str, str] | None, specs: list[ServeSpec], nameservers: list[str],
                 start: Callable[[PodInfo], int] | None) -> PodInfo:
        """A pod as kubelet makes one: metadata to the agents, sandbox netns, CNI ADD, then its
        resolv.conf and ``start`` (its servers, which get the pod's pid recorded)."""
        if f"{namespace}/{name}" in state.pods:
            raise LabError(f"pod {namespace}/{name} already exists")
        if node_name is None:
            counts = {n.name: 0 for n in state.nodes}
            for pod in state.pods.values():
                counts[pod.node] = counts.get(pod.node, 0) + 1
            node_name = min(state.nodes, key=lambda n: (counts[n.name], n.index)).name
        node = self.node(state, node_name)
        netns = f"{self.name}-pod-{namespace}-{name}"
        container_id = uuid.uuid4().hex + uuid.uuid4().hex
        pod = PodInfo(namespace=namespace, name=name, node=node.name, netns=netns, container_id=container_id,
                      labels=dict(labels or {}), serve=[str(s) for s in specs])
        if namespace not in state.namespaces:
            state.namespaces[namespace] = {"kubernetes.io/metadata.name": namespace}
            self._push_namespace(state, namespace)
            self.save(state)
        # What the API server would hold for kubelet: labels and ports, before the sandbox.
        self._push_pod(state, pod)
        _run("ip", "netns", "add", netns)
        try:
            _run("ip", "-n", netns, "link", "set", "lo", "up")
            result = self.runtime(node).add(container_id, str(NETNS_DIR / netns), "eth0",
                                            args=cni_args(namespace, name, container_id))
            pod.addresses = [ip["address"].split("/")[0] for ip in result.get("ips", [])]
            self._write_resolv_conf(pod, nameservers)
            if start is not None:
                pod.server_pid = start(pod)
        except BaseException:
            with contextlib.suppress(Exception):
                self.runtime(node).delete(container_id, str(NETNS_DIR / netns), "eth0",
                                          args=cni_args(namespace, name, container_id))
            _run("ip", "netns", "del", netns, check=False)
            shutil.rmtree(self._pod_dir(pod), ignore_errors=True)
            raise
        state.pods[pod.key] = pod
        with _state_lock:
            # Into the latest state: another thread may have added a pod meanwhile.
            latest = self.load()
            latest.pods[pod.key] = pod
            self.save(latest)
        return pod

    def _pod_dir(self, pod: PodInfo) -> Path:
        return self.base / "pods" / pod.netns

    def _write_resolv_conf(self, pod: PodInfo, nameservers: list[str]) -> None:
        path = self._pod_dir(pod) / "resolv.conf"
        path.parent.mkdir(parents=True, exist_ok=True)
        if pod.key == "kube-system/kube-dns":
            comment = f"kube-dns of lab {self.name}: the node's resolver (dnsPolicy Default), the world's DNS"
        elif nameservers:
            comment = f"pod {pod.key} of lab {self.name}: kube-dns"
        else:
            comment = f"pod {pod.key} of lab {self.name}: no kube-dns in this lab (lab up --no-world)"
        path.write_text(plan.resolv_conf(nameservers, comment))

    def _pod_argv(self, pod: PodInfo, argv: list[str]) -> list[str]:
        resolv = self._pod_dir(pod) / "resolv.conf"
        return plan.in_pod_argv(str(NETNS_DIR / pod.netns), resolv if resolv.exists() else None, argv)

    def _start_servers(self, pod: PodInfo) -> int:
        ready_file = self.base / "servers" / f"{pod.netns}.ready"
        ready_file.parent.mkdir(parents=True, exist_ok=True)
        ready_file.unlink(missing_ok=True)
        log = ready_file.with_suffix(".log")
        proc = self._spawn(self._pod_argv(pod, [sys.executable, "-m", "weft.lab.servers", *pod.serve]), log,
                           WEFT_SERVER_READY_FILE=str(ready_file), WEFT_POD=pod.key)
        _wait_daemon(f"servers of {pod.key}", proc, log, ready_file.exists)
        return proc.pid

    def pod_del(self, ref: str) -> None:
        namespace, name = parse_pod_ref(ref)
        state = self.load()
        pod = state.pods.get(f"{namespace}/{name}")
        if pod is None:
            raise LabError(f"no pod {namespace}/{name} in lab {self.name}")
        if pod.server_pid:
            _kill(pod.server_pid)
        node = self.node(state, pod.node)
        netns_path = str(NETNS_DIR / pod.netns)
        self.runtime(node).delete(pod.container_id, netns_path, "eth0",
                                  args=cni_args(namespace, name, pod.container_id))
        _run("ip", "netns", "del", pod.netns, check=False)
        shutil.rmtree(self._pod_dir(pod), ignore_errors=True)
        if pod.key == "kube-system/kube-dns":
            state.dns_servers = []  # pods keep the resolv.conf they have, as in a cluster
        del state.pods[pod.key]
        self.save(state)

    def pod(self, ref: str) -> PodInfo:
        namespace, name = parse_pod_ref(ref)
        state = self.load()
        pod = state.pods.get(f"{namespace}/{name}")
        if pod is None:
            raise LabError(f"no pod {namespace}/{name} in lab {self.name}")
        return pod

    def exec_argv(self, ref: str, command: list[str]) -> list[str]:
        """Run ``command`` in the pod: its netns and its resolv.conf as /etc/resolv.conf."""
        return self._pod_argv(self.pod(ref), command)

    # ------------------------------------------------------------------ the world
    @property
    def world_peer_log(self) -> Path:
        """JSON lines, one per connection (or UDP peer) the world's servers saw."""
        return self.base / "world" / "peers.jsonl"

    @property
    def kube_dns_log(self) -> Path:
        """kube-dns's dnsmasq log: every query, with the asking pod's address, and its answer."""
        return self.base / "kube-dns.log"

    def world_address(self, name: str) -> list[str]:
        """The addresses (IPv4 first) a name of the lab's world resolves to, CNAMEs followed."""
        try:
            return plan.world_addresses(name)
        except plan.UnknownName as exc:
            raise LabError(str(exc.args[0])) from None

    def node_uplink_address(self, node: str) -> list[str]:
        """A node's addresses on the underlay (IPv4, IPv6): what the world sees of its pods."""
        found = self.node(self.load(), node)
        if not found.uplink:
            raise LabError(f"lab {self.name} has no underlay (it was made with --no-world)")
        return list(found.uplink)

    def dns_servers(self) -> list[str]:
        """kube-dns's addresses: the cluster resolver named in every pod's resolv.conf."""
        return list(self.load().dns_servers)

    def world_peers(self) -> list[dict[str, Any]]:
        """Every connection (and UDP peer) the world's servers saw, oldest first: protocol,
        port, local (world) address and the peer's address as it arrived."""
        try:
            lines = self.world_peer_log.read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.strip()]


def parse_pod_ref(ref: str) -> tuple[str, str]:
    namespace, sep, name = ref.partition("/")
    if not sep:
        namespace, name = "default", ref
    for part in (namespace, name):
        _check_dns_label(part, f"pod reference {ref!r}")
    return namespace, name


def _check_dns_label(part: str, what: str) -> None:
    if not part or len(part) > 63 or not all(c.isalnum() or c == "-" for c in part) \
            or not part[0].isalnum() or not part[-1].isalnum() or part != part.lower():
        raise LabError(f"{what}: {part!r} is not a DNS-1123 label (lower-case letters, digits and dashes, "
                       "at most 63)")


def _apply_label_changes(labels: dict[str, str], changes: dict[str, str | None]) -> dict[str, str]:
    out = dict(labels)
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def cni_args(namespace: str, name: str, container_id: str) -> str:
    """CNI_ARGS as containerd's CRI plugin sends them."""
    return (f"IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};"
            f"K8S_POD_INFRA_CONTAINER_ID={container_id};K8S_POD_UID={uuid.uuid5(uuid.NAMESPACE_DNS, name)}")


def pod_resolv_conf(netns: str) -> Path | None:
    """The resolv.conf of the lab pod whose netns is ``netns``; None for any other netns."""
    if not LABS_DIR.is_dir():
        return None
    for lab_dir in LABS_DIR.iterdir():
        if netns.startswith(f"{lab_dir.name}-pod-"):
            path = lab_dir / "pods" / netns / "resolv.conf"
            if path.exists():
                return path
    return None


def pod_argv(netns: str, argv: list[str]) -> list[str]:
    """``argv`` run inside the pod whose netns is ``netns``, with the pod's resolver."""
    return plan.in_pod_argv(str(NETNS_DIR / netns), pod_resolv_conf(netns), argv)


def _kill(pid: int) -> None:
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_for(f"pid {pid} to exit", lambda: not _alive(pid), timeout=10)


def _wait_daemon(what: str, proc: subprocess.Popen[bytes], log: Path, ready: Callable[[], bool]) -> None:
    """Wait until a just-started daemon is ready; one that never gets there is killed."""
    def check() -> bool:
        if proc.poll() is not None:
            raise LabError(f"{what} exited with {proc.returncode}: see {log}")
        return ready()

    try:
        wait_for(what, check, timeout=20)
    except BaseException:
        _kill(proc.pid)
        raise


def _listening(pid: int, port: int, addresses: list[str]) -> bool:
    """Whether the process ``pid`` listens on ``port`` over TCP and UDP on each of ``addresses``,
    read from /proc/<pid>/net (its own netns: no need to enter it)."""
    want = {(ipaddress.ip_address(a), port) for a in addresses}
    return want <= _sockets(pid, "tcp", "0A") and want <= _sockets(pid, "udp", "07")


def _sockets(pid: int, proto: str, state: str) -> set[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]]:
    out: set[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]] = set()
    for suffix in ("", "6"):
        try:
            lines = Path(f"/proc/{pid}/net/{proto}{suffix}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != state:
                continue
            addr_hex, port_hex = fields[1].split(":")
            raw = bytes.fromhex(addr_hex)
            # The kernel prints each 32-bit word in host (little-endian) order.
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            out.add((ipaddress.ip_address(raw), int(port_hex, 16)))
    return out


def _stop_process(what: str, pid: int, sig: int) -> None:
    """Signal a lab daemon and wait until it is gone (nothing to do when it is not running)."""
    if pid and _alive(pid):
        os.kill(pid, sig)
        wait_for(f"{what} pid {pid} to exit", lambda: not _alive(pid), timeout=20)


def _alive(pid: int) -> bool:
    child = _children.get(pid)
    if child is not None:
        if child.poll() is None:
            return True
        del _children[pid]
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            # A zombie has exited; it only waits for its parent to reap it.
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _pids_with_env(key: str, value: str) -> list[int]:
    marker = f"{key}={value}".encode()
    me = os.getpid()
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker in env.split(b"\0"):
            out.append(int(entry.name))
    return out


def _ensure_bpffs() -> None:
    if _run("mountpoint", "-q", "/sys/fs/bpf", check=False).returncode != 0:
        _run("mount", "-t", "bpf", "bpf", "/sys/fs/bpf")
