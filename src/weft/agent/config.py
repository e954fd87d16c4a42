"""The agent's node configuration (one JSON file per node, written by the installer or the lab)."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from weft.dnsproxy.config import DnsProxySettings
from weft.ipam.pool import IPFamilies
from weft.observe.config import FlowSettings

VXLAN_PORT = 8472  # Cilium's (the Linux default for VXLAN before IANA assigned 4789)
TUNNEL_DEVICE = "weft_vxlan"


class ClusterSettings(BaseModel):
    """How this node joins the others: the cluster store it shares with them, and how packets
    reach other nodes' pods (``overlay``: VXLAN encapsulation by the datapath; ``direct``: pods
    addressed from the underlay, routed by the datapath)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["overlay", "direct"] = "overlay"
    store: Literal["sqlite", "etcd"] = "sqlite"
    store_path: Path | None = None  # sqlite: the database file every agent of the cluster opens
    store_endpoint: str | None = None  # etcd: http://host:port of its client URL
    # The node's underlay device and its addresses there (what other nodes reach it at).
    uplink: str = "eth0"
    addresses: list[str] = Field(min_length=1)
    tunnel_device: str = TUNNEL_DEVICE
    vxlan_port: int = Field(default=VXLAN_PORT, ge=1, le=65535)
    # The node's keys (node record, endpoints, identity references) live as long as this lease
    # (15 minutes, Cilium's kvstore lease TTL): an agent that is down for less changes nothing
    # for the other nodes; a node that is gone for good is removed explicitly (or expires).
    lease_ttl_s: float = Field(default=900.0, gt=0)
    identity_gc_interval_s: float = Field(default=30.0, gt=0)

    @field_validator("addresses")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        for addr in value:
            ipaddress.ip_address(addr)
        return value

    @model_validator(mode="after")
    def _store_location(self) -> ClusterSettings:
        if self.store == "sqlite" and self.store_path is None:
            raise ValueError("cluster.store sqlite needs cluster.store_path")
        if self.store == "etcd" and not self.store_endpoint:
            raise ValueError("cluster.store etcd needs cluster.store_endpoint (http://host:port)")
        return self

    def underlay_address(self, families: tuple[int, ...]) -> str:
        """The address tunnels to this node use: IPv4 when the cluster runs IPv4 (as Cilium's
        default underlay), else IPv6."""
        return pick_underlay(self.addresses, families)


def pick_underlay(addresses: list[str] | tuple[str, ...], families: tuple[int, ...]) -> str:
    want = 4 if 4 in families else 6
    for addr in addresses:
        if ipaddress.ip_address(addr).version == want:
            return addr
    raise ValueError(f"no IPv{want} underlay address among {list(addresses)}")


class NodeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    node_name: str = Field(min_length=1)
    state_dir: Path
    socket_path: Path
    pin_dir: Path
    bpf_object: Path | None = None
    ip_family: IPFamilies = IPFamilies.DUAL
    pod_block_v4: str | None = None
    pod_block_v6: str | None = None
    mtu: int = Field(default=1500, ge=1280, le=65535)
    gc_interval_s: float = Field(default=60.0, gt=0)
    reconcile_interval_s: float = Field(default=30.0, gt=0)
    # The node's DNS proxy (a process of its own, reading this same file).
    dns_proxy: DnsProxySettings = Field(default_factory=DnsProxySettings)
    # Flows (weft observe): event aggregation level, flow ring size, flow log.
    flows: FlowSettings = Field(default_factory=FlowSettings)
    # Prometheus /metrics (Hubble's and Cilium's names), in the node's netns; "" turns it off.
    metrics_address: str = "0.0.0.0:9962"
    # Other nodes and the cluster store (None: a node on its own).
    cluster: ClusterSettings | None = None
    # The cluster's pod CIDRs (every node's blocks); empty: the default pools.
    cluster_cidrs: list[str] = Field(default_factory=list)

    @field_validator("pod_block_v4", "pod_block_v6")
    @classmethod
    def _network(cls, value: str | None) -> str | None:
        if value is not None:
            ipaddress.ip_network(value, strict=True)
        return value

    def blocks(self) -> dict[int, ipaddress.IPv4Network | ipaddress.IPv6Network]:
        out: dict[int, ipaddress.IPv4Network | ipaddress.IPv6Network] = {}
        for version in self.ip_family.versions:
            raw = self.pod_block_v4 if version == 4 else self.pod_block_v6
            if raw is None:
                raise ValueError(f"ip_family {self.ip_family.value} needs pod_block_v{version}")
            out[version] = ipaddress.ip_network(raw)
        return out

    @property
    def del_queue_dir(self) -> Path:
        # weft-cni queues DELs next to the socket while the agent is away (see weft.cni.plugin).
        return self.socket_path.parent / "del-queue"

    @classmethod
    def load(cls, path: Path) -> NodeConfig:
        return cls.model_validate(json.loads(path.read_text()))
