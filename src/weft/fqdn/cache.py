"""The learned-address model of one node: which endpoint resolved which name to which address, until when.

Pure and deterministic: no clock is read, ``now`` is passed in (seconds of a monotonic clock, like
``time.monotonic()``), and whether a connection is alive is asked of a callback
(``is_live(ep_id, address)``, given to the constructor or to each call) so the model never cuts a
live connection:

* **Expiry.** An entry ``(endpoint, name, address)`` expires at ``now + max(ttl, min_ttl) + grace``
  (``min_ttl``: Cilium's ``--tofqdns-min-ttl``; ``grace``: time for the client to connect after the
  answer, for the datapath update to land, for a TTL-0 answer). Learning it again refreshes it; a
  refresh never moves an expiry earlier (an earlier answer with a longer TTL still stands).
* **Zombies.** :meth:`NameCache.expired` lists entries past expiry whose address has no live
  connection, for the caller to :meth:`NameCache.remove` (and withdraw from the datapath). An
  expired entry whose address still has a live connection is kept and flagged ``zombie`` until the
  connection closes, as Cilium's DNS zombies are; a later :meth:`NameCache.expired` lists it then.
* **Cap.** At most ``max_ips_per_name`` addresses per endpoint and name (Cilium's
  ``--tofqdns-max-ip-per-hostname``, 50). Over it, :meth:`NameCache.learn` evicts expired entries
  first, then the least recently refreshed; it never evicts an address with a live connection, so
  when more than the cap are live the cap is exceeded until they close
  (:attr:`LearnResult.over_cap` says by how much). New addresses that do not fit are ``rejected``.
* **Persistence.** :meth:`NameCache.to_json` / :meth:`NameCache.from_json` carry the cache across a
  proxy restart. Monotonic times are saved with the wall-clock and monotonic readings at save time
  (and the boot id, when the caller has it): on the same boot they are kept as they are; after a
  reboot, when the monotonic clock restarted, they are carried over through the wall clock.

Names are normalized (lowercase, trailing dot) on the way in; addresses are ``ipaddress`` objects.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from weft.fqdn.dnsmsg import Response
from weft.fqdn.matchpattern import normalize_name
from weft.types.addresses import IPAddress

IsLive = Callable[[int, IPAddress], bool]

JSON_VERSION = 1
# Without a boot id, the monotonic clock is taken to have kept running across the restart when it
# advanced as much as the wall clock did, give or take this (NTP slews; the two are read apart).
SAME_BOOT_TOLERANCE = 2.0


def _never_live(ep_id: int, address: IPAddress) -> bool:
    return False


def _addr_key(address: IPAddress) -> tuple[int, int]:
    # IPv4Address and IPv6Address do not compare with each other.
    return (address.version, int(address))


@dataclass
class _Entry:
    expiry: float
    refreshed: float
    ttl: int
    source: str
    # Among entries refreshed at the same instant: learned in an earlier call first, then (within a
    # call) later in the answer first, so a response with more addresses than the cap keeps its first ones.
    order: tuple[int, int] = (0, 0)
    zombie: bool = False


@dataclass(frozen=True)
class LearnResult:
    """What one :meth:`NameCache.learn` changed for ``(ep_id, name)``.

    ``added``: addresses the name did not hold and now does. ``refreshed``: held already, expiry
    renewed. ``evicted``: held before, evicted by the cap. ``rejected``: offered, not kept (the name
    was full of live or fresher addresses). ``released``: the evicted addresses the endpoint no
    longer holds under any name (the ones to withdraw from the datapath; an evicted address may
    still be held under another name). ``over_cap``: how many addresses over the cap the name
    holds because they have live connections (0 normally).
    """

    ep_id: int
    name: str
    added: list[tuple[int, IPAddress]] = field(default_factory=list)
    refreshed: list[tuple[int, IPAddress]] = field(default_factory=list)
    evicted: list[tuple[int, IPAddress]] = field(default_factory=list)
    rejected: list[tuple[int, IPAddress]] = field(default_factory=list)
    released: list[tuple[int, IPAddress]] = field(default_factory=list)
    over_cap: int = 0


@dataclass(frozen=True)
class CacheEntry:
    """One row of a listing: an endpoint's name and one of its addresses."""

    ep_id: int
    name: str
    address: IPAddress
    ttl: int  # as answered
    ttl_left: float  # until expiry (grace included); 0 once expired
    source: str
    zombie: bool  # expired, kept for a live connection


class NameCache:
    """Per endpoint, per name, per address: an expiry. See the module docstring for the rules."""

    def __init__(
        self,
        min_ttl: int = 0,
        grace: float = 5.0,
        max_ips_per_name: int = 50,
        is_live: IsLive | None = None,
    ) -> None:
        if min_ttl < 0:
            raise ValueError(f"min_ttl {min_ttl} is negative")
        if grace < 0 or not math.isfinite(grace):
            raise ValueError(f"grace {grace} must be a finite number >= 0")
        if max_ips_per_name < 1:
            raise ValueError(f"max_ips_per_name {max_ips_per_name} must be at least 1")
        self.min_ttl = min_ttl
        self.grace = grace
        self.max_ips_per_name = max_ips_per_name
        self.is_live: IsLive = is_live or _never_live
        self._eps: dict[int, dict[str, dict[IPAddress, _Entry]]] = {}
        self._calls = 0

    # ------------------------------------------------------------------------- learning

    def learn(
        self,
        ep_id: int,
        name: str,
        addresses: Iterable[IPAddress],
        ttl: int,
        now: float,
        source: str = "lookup",
        is_live: IsLive | None = None,
    ) -> LearnResult:
        """Record that endpoint ``ep_id`` resolved ``name`` to ``addresses`` with ``ttl`` at ``now``."""
        if ttl < 0:
            raise ValueError(f"ttl {ttl} is negative")
        live = is_live or self.is_live
        fq = normalize_name(name)
        expiry = now + max(ttl, self.min_ttl) + self.grace
        self._calls += 1
        held = self._eps.setdefault(ep_id, {}).setdefault(fq, {})
        added: list[IPAddress] = []
        refreshed: list[IPAddress] = []
        for i, address in enumerate(dict.fromkeys(addresses)):
            order = (self._calls, -i)
            entry = held.get(address)
            if entry is None:
                held[address] = _Entry(expiry=expiry, refreshed=now, ttl=ttl, source=source, order=order)
                added.append(address)
            else:
                entry.expiry = max(entry.expiry, expiry)
                entry.refreshed, entry.ttl, entry.source, entry.order = now, ttl, source, order
                entry.zombie = entry.zombie and entry.expiry <= now
                refreshed.append(address)

        evicted: list[IPAddress] = []
        rejected: list[IPAddress] = []
        if len(held) > self.max_ips_per_name:
            # Never a live one; expired first, then the least recently refreshed.
            candidates = sorted(
                (address for address in held if not live(ep_id, address)),
                key=lambda a: (held[a].expiry > now, held[a].refreshed, held[a].order, _addr_key(a)),
            )
            new = set(added)
            for address in candidates[: len(held) - self.max_ips_per_name]:
                del held[address]
                if address in new:
                    added.remove(address)
                    rejected.append(address)
                else:
                    if address in refreshed:
                        refreshed.remove(address)
                    evicted.append(address)
        over_cap = max(0, len(held) - self.max_ips_per_name)
        if not held:
            self._drop_name(ep_id, fq)
        still = self.addresses_for(ep_id) if evicted else {}
        return LearnResult(
            ep_id=ep_id,
            name=fq,
            added=[(ep_id, a) for a in added],
            refreshed=[(ep_id, a) for a in refreshed],
            evicted=[(ep_id, a) for a in evicted],
            rejected=[(ep_id, a) for a in rejected],
            released=[(ep_id, a) for a in evicted if a not in still],
            over_cap=over_cap,
        )

    def learn_response(
        self, ep_id: int, response: Response, now: float, is_live: IsLive | None = None
    ) -> list[LearnResult]:
        """Learn every name of a response's CNAME chain: the question name as ``lookup``, the
        names it led to as ``cname`` (each with its own TTL, see ``dnsmsg.parse_response``)."""
        return [
            self.learn(
                ep_id,
                name,
                answer.addresses,
                answer.ttl,
                now,
                source="lookup" if name == response.qname else "cname",
                is_live=is_live,
            )
            for name, answer in response.answers.items()
        ]

    # ------------------------------------------------------------------------- expiry

    def expired(self, now: float, is_live: IsLive | None = None) -> list[tuple[int, str, IPAddress]]:
        """Entries past expiry whose address has no live connection: the ones to :meth:`remove`.

        Expired entries with a live connection are flagged ``zombie`` and kept. Nothing is removed.
        """
        live = is_live or self.is_live
        out: list[tuple[int, str, IPAddress]] = []
        for ep_id, names in self._eps.items():
            for name, held in names.items():
                for address, entry in held.items():
                    if entry.expiry > now:
                        continue
                    if live(ep_id, address):
                        entry.zombie = True
                    else:
                        out.append((ep_id, name, address))
        out.sort(key=lambda t: (t[0], t[1], _addr_key(t[2])))
        return out

    def remove(self, entries: Iterable[tuple[int, str, IPAddress]]) -> list[tuple[int, IPAddress]]:
        """Remove entries (absent ones are ignored); return the ``(ep_id, address)`` pairs the
        endpoint no longer holds under any name, the ones to withdraw from the datapath."""
        touched: dict[tuple[int, IPAddress], None] = {}
        for ep_id, name, address in entries:
            fq = normalize_name(name)
            held = self._eps.get(ep_id, {}).get(fq)
            if held is None or held.pop(address, None) is None:
                continue
            touched[(ep_id, address)] = None
            if not held:
                self._drop_name(ep_id, fq)
        still = {ep_id: self.addresses_for(ep_id) for ep_id, _ in touched}
        return [(ep_id, a) for ep_id, a in touched if a not in still[ep_id]]

    def collect(
        self, now: float, is_live: IsLive | None = None
    ) -> tuple[list[tuple[int, str, IPAddress]], list[tuple[int, IPAddress]]]:
        """:meth:`expired` then :meth:`remove`: the removed entries, and the released pairs."""
        gone = self.expired(now, is_live)
        return gone, self.remove(gone)

    def forget_endpoint(self, ep_id: int) -> list[tuple[str, IPAddress]]:
        """Drop everything endpoint ``ep_id`` learned (it was deleted); return what it held."""
        names = self._eps.pop(ep_id, {})
        return [(name, address) for name, held in sorted(names.items()) for address in held]

    def _drop_name(self, ep_id: int, name: str) -> None:
        names = self._eps.get(ep_id)
        if names is not None:
            names.pop(name, None)
            if not names:
                del self._eps[ep_id]

    # ------------------------------------------------------------------------- queries

    def addresses_for(self, ep_id: int) -> dict[IPAddress, dict[str, float]]:
        """address -> {name: expiry} for one endpoint (zombies included)."""
        out: dict[IPAddress, dict[str, float]] = {}
        for name, held in self._eps.get(ep_id, {}).items():
            for address, entry in held.items():
                out.setdefault(address, {})[name] = entry.expiry
        return out

    def names_for(self, ep_id: int) -> list[str]:
        return sorted(self._eps.get(ep_id, {}))

    def endpoints(self) -> list[int]:
        return sorted(self._eps)

    def entries(self, now: float) -> list[CacheEntry]:
        """Every entry, for listing, ordered by endpoint, name and address."""
        rows = [
            CacheEntry(
                ep_id=ep_id,
                name=name,
                address=address,
                ttl=entry.ttl,
                ttl_left=max(0.0, entry.expiry - now),
                source=entry.source,
                zombie=entry.zombie,
            )
            for ep_id, names in self._eps.items()
            for name, held in names.items()
            for address, entry in held.items()
        ]
        rows.sort(key=lambda r: (r.ep_id, r.name, _addr_key(r.address)))
        return rows

    def __len__(self) -> int:
        return sum(len(held) for names in self._eps.values() for held in names.values())

    # ------------------------------------------------------------------------- persistence

    def to_json(self, wall_now: float, mono_now: float, boot_id: str | None = None) -> dict[str, Any]:
        """A JSON-able snapshot. ``wall_now`` and ``mono_now`` are ``time.time()`` and
        ``time.monotonic()`` read together; ``boot_id`` is /proc/sys/kernel/random/boot_id if known."""
        return {
            "version": JSON_VERSION,
            "saved": {"wall": wall_now, "mono": mono_now, "boot_id": boot_id},
            "config": {"min_ttl": self.min_ttl, "grace": self.grace, "max_ips_per_name": self.max_ips_per_name},
            "entries": [
                {
                    "ep": ep_id,
                    "name": name,
                    "address": str(address),
                    "expiry": entry.expiry,
                    "refreshed": entry.refreshed,
                    "ttl": entry.ttl,
                    "source": entry.source,
                    "zombie": entry.zombie,
                }
                for ep_id, names in sorted(self._eps.items())
                for name, held in sorted(names.items())
                for address, entry in sorted(held.items(), key=lambda kv: _addr_key(kv[0]))
            ],
        }

    @classmethod
    def from_json(
        cls,
        data: Mapping[str, Any],
        wall_now: float,
        mono_now: float,
        boot_id: str | None = None,
        *,
        is_live: IsLive | None = None,
        min_ttl: int | None = None,
        grace: float | None = None,
        max_ips_per_name: int | None = None,
    ) -> NameCache:
        """Rebuild a cache saved by :meth:`to_json`, its times moved onto this boot's monotonic clock.

        Settings given here override the saved ones (the restarted proxy's flags win); the cap is
        not re-applied to restored entries (the next learn of a name does). Raises ``ValueError``
        on a snapshot this version cannot read.
        """
        try:
            if data["version"] != JSON_VERSION:
                raise ValueError(f"name cache snapshot version {data['version']!r}, expected {JSON_VERSION}")
            saved, config = data["saved"], data["config"]
            cache = cls(
                min_ttl=int(config["min_ttl"]) if min_ttl is None else min_ttl,
                grace=float(config["grace"]) if grace is None else grace,
                max_ips_per_name=int(config["max_ips_per_name"]) if max_ips_per_name is None else max_ips_per_name,
                is_live=is_live,
            )
            shift = _clock_shift(
                float(saved["wall"]), float(saved["mono"]), saved.get("boot_id"), wall_now, mono_now, boot_id
            )
            for i, row in enumerate(data["entries"]):
                address = ipaddress.ip_address(row["address"])
                names = cache._eps.setdefault(int(row["ep"]), {})
                names.setdefault(normalize_name(str(row["name"])), {})[address] = _Entry(
                    expiry=float(row["expiry"]) + shift,
                    refreshed=float(row["refreshed"]) + shift,
                    ttl=int(row["ttl"]),
                    source=str(row["source"]),
                    order=(0, -i),
                    zombie=bool(row["zombie"]),
                )
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"name cache snapshot is not readable: {type(e).__name__}: {e}") from e
        return cache


def _clock_shift(
    saved_wall: float,
    saved_mono: float,
    saved_boot: object,
    wall_now: float,
    mono_now: float,
    boot_id: str | None,
) -> float:
    """What to add to a saved monotonic time to put it on today's monotonic clock.

    Same boot: nothing (the monotonic clock kept running, and it is the one immune to wall-clock
    steps). Another boot: go through the wall clock, saved monotonic -> wall -> current monotonic.
    Boot ids decide when both are known; otherwise the same boot is assumed when the monotonic
    clock advanced as much as the wall clock did.
    """
    if isinstance(saved_boot, str) and saved_boot and boot_id:
        same = saved_boot == boot_id
    else:
        same = mono_now >= saved_mono and abs((mono_now - saved_mono) - (wall_now - saved_wall)) <= SAME_BOOT_TOLERANCE
    return 0.0 if same else (saved_wall - saved_mono) - (wall_now - mono_now)
