"""What the DNS proxy is told: its node settings and the agent's per-endpoint DNS rules.

The agent writes :class:`ProxyRules` to ``<state_dir>/dnsproxy/rules.json`` (atomically, tmp +
rename) whenever policy, identities or endpoints change, then asks the proxy to reload over its
control socket (best effort: a proxy that is down reads the file when it starts).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

RULES_VERSION = 1


class DnsProxySettings(BaseModel):
    """The ``dns_proxy`` section of a node's configuration (node.json)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    port: int = Field(default=10053, ge=1, le=65535)  # UDP and TCP, IPv4 and IPv6, node netns
    socket_path: Path | None = None  # control socket; default <state_dir>/dnsproxy/proxy.sock
    min_ttl: int = Field(default=0, ge=0)  # seconds; a shorter TTL in an answer counts as this
    grace_seconds: float = Field(default=5.0, ge=0)  # kept past the TTL before a learned address goes
    max_ips_per_name: int = Field(default=50, ge=1)  # per endpoint and name
    deny_response: Literal["refused", "nxdomain"] = "refused"  # answer to a query the rules deny
    upstream_timeout_s: float = Field(default=2.0, gt=0)
    # UDP queries waiting for their upstream answer; more are dropped and counted as throttled.
    max_pending: int = Field(default=8192, ge=1)


class DnsRule(BaseModel):
    """One toPorts rule with DNS rules (or an L4 rule on a redirected port) of an endpoint's egress
    policy: queries to ``peers`` (identities; None = any peer) on ``protocol``/ports whose name
    matches one of ``names`` are allowed. An empty ``names`` allows every name (a rule without
    DNS rules on a port that another rule redirects, as in Cilium)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    peers: list[int] | None = None
    protocol: int = 0  # 0 any, 6 TCP, 17 UDP
    port: int = Field(default=53, ge=0, le=65535)  # 0 = any port
    end_port: int | None = Field(default=None, ge=0, le=65535)
    names: list[dict[Literal["matchName", "matchPattern"], str]] = Field(default_factory=list)
    rule: str = ""  # which policy rule this came from (for reports)


class FqdnSelectorRule(BaseModel):
    """A toFQDNs selector of the endpoint's egress policy and the identity standing for it: the
    agent's policy entries for that identity say which ports are allowed; the proxy writes the
    learned addresses of matching names into weft_fqdn with this identity in a slot."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    identity: int = Field(ge=1)
    selector: dict[Literal["matchName", "matchPattern"], str]

    @model_validator(mode="after")
    def _one_key(self) -> FqdnSelectorRule:
        if len(self.selector) != 1:
            raise ValueError("selector needs exactly one of matchName, matchPattern")
        return self


class EndpointRules(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    ep_id: int = Field(ge=1)
    pod: str  # "namespace/name"
    identity: int
    addresses: list[str]  # the endpoint's own addresses: a query's source says which endpoint asks
    dns_rules: list[DnsRule] = Field(default_factory=list)
    fqdn_selectors: list[FqdnSelectorRule] = Field(default_factory=list)


class ProxyRules(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = RULES_VERSION
    revision: int = 0  # the agent's policy revision these rules come from
    # Pod CIDRs of the cluster: toFQDNs never selects in-cluster pod addresses.
    cluster_cidrs: list[str] = Field(default_factory=list)
    endpoints: list[EndpointRules] = Field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> ProxyRules:
        return cls.model_validate(json.loads(path.read_text()))

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.model_dump_json())
        tmp.replace(path)


def rules_path(state_dir: Path) -> Path:
    return state_dir / "dnsproxy" / "rules.json"


def default_socket_path(state_dir: Path) -> Path:
    return state_dir / "dnsproxy" / "proxy.sock"
