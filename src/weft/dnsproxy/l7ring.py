"""The DNS proxy's L7 records: one per query as it arrives (REQUEST) and one when its answer,
REFUSED or SERVFAIL is released (RESPONSE), kept in a bounded ring with sequence numbers.
Verdicts as Cilium's proxy reports them: FORWARDED; DROPPED for a query the policy denies (one
REQUEST record, no RESPONSE); ERROR for a SERVFAIL the proxy made itself (upstream unreachable,
unusable answer, datapath not updated). A query that times out upstream has its REQUEST only.

The proxy only appends a tuple per record (no dict, no parsing: the query path stays fast); a
reader (the agent, over the control socket's ``l7.get``) gets them as JSON objects built at read
time, the response's answers parsed then. The ring lives in the proxy, so the proxy never waits
for the agent and an agent restart loses nothing the ring still holds; a reader that falls
further behind than the ring holds is told how many records it missed.
"""

from __future__ import annotations

import collections
import ipaddress
import time
from typing import Any

from weft.dnsproxy.wire import parse_wire_response, rcode_of

L7_RING_SIZE = 8192
# Response bytes the ring may hold (a TCP answer can be 64 KiB): past it the oldest records go,
# so the proxy's memory stays bounded whatever the answers' sizes.
L7_RING_BYTES = 4 << 20
L7_PAGE_MAX = 1024
REQUEST, RESPONSE = 0, 1
VERDICT_FORWARDED, VERDICT_DROPPED, VERDICT_ERROR = "FORWARDED", "DROPPED", "ERROR"

# (seq, wall_ns, kind, ep_id, pod, src_ip, src_port, dst_ip, dst_port, proto, qname, qtype,
#  verdict, latency_ns, response wire bytes or b"")
Record = tuple[int, int, int, int, str, str, int, str, int, int, str, str, str, int, bytes]


class L7Ring:
    def __init__(self, size: int = L7_RING_SIZE, max_bytes: int = L7_RING_BYTES) -> None:
        if size < 1 or max_bytes < 1:
            raise ValueError(f"L7 ring size and byte budget must be at least 1, got {size} and {max_bytes}")
        self.size = size
        self.max_bytes = max_bytes
        self.bytes = 0  # response bytes held
        self.records: collections.deque[Record] = collections.deque()
        self.next_seq = 1
        # Tells this process's sequence numbers from another's (a reader's cursor is for one epoch).
        self.epoch = time.time_ns()

    def add(self, wall_ns: int, kind: int, ep_id: int, pod: str, src: tuple[Any, ...], dst: tuple[str, int],
            proto: int, qname: str, qtype: str, verdict: str, latency_ns: int = 0, wire: bytes = b"") -> None:
        seq = self.next_seq
        self.next_seq = seq + 1
        records = self.records
        records.append((seq, wall_ns, kind, ep_id, pod, str(src[0]), int(src[1]), dst[0], dst[1], proto,
                        qname, qtype, verdict, latency_ns, wire))
        self.bytes += len(wire)
        while len(records) > self.size or (self.bytes > self.max_bytes and len(records) > 1):
            self.bytes -= len(records.popleft()[14])

    def read(self, cursor: int, max_items: int = L7_PAGE_MAX) -> dict[str, Any]:
        """Records with seq >= ``cursor`` (at most ``max_items``), the cursor to ask for next and
        how many records between ``cursor`` and the oldest kept were overwritten (``missed``).
        A cursor of 0 starts at the oldest record kept."""
        if cursor < 0 or max_items < 1:
            raise ValueError(f"cursor must be >= 0 and max >= 1, got cursor={cursor} max={max_items}")
        records = self.records
        first = records[0][0] if records else self.next_seq
        missed = 0
        if cursor == 0:
            cursor = first
        elif cursor > self.next_seq:
            # A cursor from another proxy process (its sequence started anew): start over.
            cursor = first
        elif cursor < first:
            missed = first - cursor
            cursor = first
        start = cursor - first
        out = [record_json(records[i]) for i in range(start, min(len(records), start + max_items))]
        return {"records": out, "next": cursor + len(out), "missed": missed, "first": first, "epoch": self.epoch}


def _answers(wire: bytes) -> dict[str, Any]:
    """ips, ttl, cnames and rrtypes of a response, as Hubble's DNS record has them."""
    out: dict[str, Any] = {"rcode": rcode_of(wire) if len(wire) >= 12 else 2}
    try:
        response = parse_wire_response(wire)
    except Exception:  # an unusable response was answered with SERVFAIL: nothing more to say
        return out
    ips: list[str] = []
    ttl = 0
    answer = response.answers.get(response.qname)
    if answer is not None:
        ips = [str(ip) for ip in answer.addresses]
        ttl = answer.ttl
    rrtypes: list[str] = []
    cnames = response.chain[1:]
    if cnames:
        rrtypes.append("CNAME")
    for ip in ips:
        kind = "A" if ipaddress.ip_address(ip).version == 4 else "AAAA"
        if kind not in rrtypes:
            rrtypes.append(kind)
    if ips:
        out["ips"] = ips
        out["ttl"] = ttl
    if cnames:
        out["cnames"] = cnames
    if rrtypes:
        out["rrtypes"] = rrtypes
    return out


def record_json(record: Record) -> dict[str, Any]:
    (seq, wall_ns, kind, ep_id, pod, src_ip, src_port, dst_ip, dst_port, proto, qname, qtype, verdict,
     latency_ns, wire) = record
    dns: dict[str, Any] = {"query": qname, "qtypes": [qtype], "observation_source": "proxy"}
    if kind == RESPONSE:
        dns.update(_answers(wire))
    return {"seq": seq, "time_ns": wall_ns, "type": "RESPONSE" if kind == RESPONSE else "REQUEST",
            "ep_id": ep_id, "pod": pod, "source": {"ip": src_ip, "port": src_port},
            "destination": {"ip": dst_ip, "port": dst_port}, "protocol": "TCP" if proto == 6 else "UDP",
            "verdict": verdict, "latency_ns": latency_ns, "dns": dns}
