"""The agent's node configuration (one JSON file per node, written by the installer or the lab)."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from weft.dnsproxy.config import DnsProxySettings
from weft.ipam.pool import IPFamilies
from weft.observe.config import FlowSettings


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
