"""Address helpers shared by every layer."""

from __future__ import annotations

import ipaddress
from typing import TypeAlias

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network


def family_of(addr: IPAddress | IPNetwork) -> int:
    """4 or 6."""
    return addr.version


def host_prefix(addr: IPAddress) -> str:
    """The address as a host prefix: /32 for IPv4, /128 for IPv6."""
    return f"{addr}/{addr.max_prefixlen}"
