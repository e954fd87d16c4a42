"""The proxy's fast path over the DNS wire format, with :mod:`weft.fqdn.dnsmsg` as the authority.

``weft.fqdn.dnsmsg`` parses with dnspython: about 30 µs for a query and 190 µs for a response with a
CNAME chain on the machines of this project, which alone would cap the proxy near 5,000 queries/s.
Here a direct walk of the bytes handles the messages a proxy sees almost always (one LDH question,
EDNS, A/AAAA/CNAME answers, SOA/NS authority) in a few microseconds and gives exactly what
``dnsmsg`` would give; anything it does not fully check (another record type, an escaped label, a
non-IN class, an EDNS option dnspython interprets, an extended rcode...) goes to ``dnsmsg``, which
then decides and classifies errors. So the fast path can only be slower, never different:
tests/unit/dnsproxy/test_wire.py holds both to the same answers on generated messages.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

import dns.flags
import dns.rcode
import dns.rdatatype

from weft.fqdn.dnsmsg import MAX_MESSAGE_SIZE, Answer, DnsMessageError, Response, parse_query, parse_response
from weft.types.addresses import IPAddress

_HEADER = struct.Struct("!6H")
_RR = struct.Struct("!HHIH")
_OPT_OPTION = struct.Struct("!HH")
_QR, _TC, _RD, _RA, _CD = 0x8000, 0x0200, 0x0100, 0x0080, 0x0010
_OPCODE_MASK = 0x7800
_MAX_POINTER_HOPS = 16  # dnspython's MAX_COMPRESSION_POINTER_CHAIN
# Label octets a name may use on the fast path: dnspython's text form of these needs no escaping.
_LDH = b"-0123456789_abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
T_A, T_NS, T_CNAME, T_SOA, T_PTR, T_MX, T_OPT, T_AAAA, T_DNAME = 1, 2, 5, 6, 12, 15, 41, 28, 39
C_IN = 1
# EDNS options dnspython interprets (and may reject); COOKIE is checked here, the rest go slow.
_EDNS_COOKIE = 10
_EDNS_INTERPRETED = frozenset(int(t) for t in (3, 8, 15, 18, 22, 23, 24, 25))
_RCODE_TEXT = tuple(dns.rcode.to_text(dns.rcode.Rcode(i)) for i in range(16))
_TYPE_TEXT: dict[int, str] = {}

RCODE_NOERROR, RCODE_SERVFAIL, RCODE_NXDOMAIN, RCODE_REFUSED = 0, 2, 3, 5


class _Slow(Exception):
    """The fast path does not vouch for this message: ask dnsmsg."""


@dataclass(frozen=True, slots=True)
class WireQuery:
    """A query as the proxy needs it. ``question`` is the question section's bytes as sent (used to
    build refusals and to tie the upstream's response to this question)."""

    id: int
    flags: int
    qname: str  # normalized: lowercase, trailing dot
    qtype: int
    qclass: int
    question: bytes
    edns: bool
    raw: bytes

    @property
    def qtype_text(self) -> str:
        return type_text(self.qtype)


def type_text(rdtype: int) -> str:
    text = _TYPE_TEXT.get(rdtype)
    if text is None:
        text = _TYPE_TEXT[rdtype] = dns.rdatatype.to_text(dns.rdatatype.RdataType.make(rdtype))
    return text


def rcode_of(wire: bytes) -> int:
    """The header's 4-bit rcode (the extended bits live in OPT; 0-15 is what the proxy reports)."""
    return wire[3] & 0xF if len(wire) >= 4 else RCODE_SERVFAIL


def rcode_text(rcode: int) -> str:
    return _RCODE_TEXT[rcode] if 0 <= rcode < 16 else str(rcode)


# Names already decoded in a message, by offset: (text, where its in-place part ends, pointer hops).
_Memo = dict[int, tuple[str, int, int]]


def _name(wire: bytes, pos: int, end: int, memo: _Memo | None = None) -> tuple[str, int]:
    """The normalized name at ``pos`` (labels within ``end``) and the offset after it in place.
    Compression pointers must point strictly backwards and the name they lead to must end before
    the pointer's segment (dnspython's rules); anything unusual raises _Slow. ``memo`` short-cuts
    the usual owner name, a lone pointer to a name decoded before."""
    first = wire[pos] if pos < end else 0
    if memo is not None and first >= 0xC0 and pos + 1 < end:
        known = memo.get(((first & 0x3F) << 8) | wire[pos + 1])
        if known is not None and known[1] <= pos and known[2] < _MAX_POINTER_HOPS:
            return known[0], pos + 2
    origin = pos
    labels: list[bytes] = []
    after = -1
    start = pos
    limit = end
    octets = 1
    hops = 0
    while True:
        if pos >= limit:
            raise _Slow
        length = wire[pos]
        if length == 0:
            break
        if length < 64:
            nxt = pos + 1 + length
            if nxt > limit:
                raise _Slow
            label = wire[pos + 1:nxt]
            if label.translate(None, _LDH):
                raise _Slow
            labels.append(label)
            octets += length + 1
            pos = nxt
        elif length >= 0xC0:
            if pos + 1 >= limit:
                raise _Slow
            target = ((length & 0x3F) << 8) | wire[pos + 1]
            if after < 0:
                after = pos + 2
            hops += 1
            if target >= start or hops > _MAX_POINTER_HOPS:
                raise _Slow
            limit = start  # the target must not overlap this segment
            pos = start = target
        else:
            raise _Slow
    if octets > 255:
        raise _Slow
    inplace_end = pos + 1 if after < 0 else after
    text = b".".join(labels).lower().decode("ascii") + "." if labels else "."
    if memo is not None and first < 0xC0:
        memo[origin] = (text, inplace_end, hops)
    return text, inplace_end


def _check_opt(wire: bytes, pos: int, rdend: int, ttl: int, in_response: bool) -> None:
    if in_response and ttl >> 24:
        raise _Slow  # an extended rcode: let dnspython combine it
    while pos < rdend:
        if pos + 4 > rdend:
            raise _Slow
        code, length = _OPT_OPTION.unpack_from(wire, pos)
        pos += 4 + length
        if pos > rdend or code in _EDNS_INTERPRETED:
            raise _Slow
        if code == _EDNS_COOKIE and not (length == 8 or 16 <= length <= 40):
            raise _Slow


def _fast_query(wire: bytes) -> WireQuery:
    size = len(wire)
    if size < 12:
        raise _Slow
    msg_id, flags, qd, an, ns, ar = _HEADER.unpack_from(wire)
    if flags & (_QR | _OPCODE_MASK) or qd != 1 or an or ns or ar > 1:
        raise _Slow
    qname, pos = _name(wire, 12, size)
    if pos + 4 > size or wire[12] >= 0xC0:
        raise _Slow
    qtype, qclass = struct.unpack_from("!HH", wire, pos)
    pos += 4
    question = wire[12:pos]
    edns = False
    if ar:
        if pos + 11 > size or wire[pos] != 0:
            raise _Slow
        rtype, _payload, ttl, rdlength = _RR.unpack_from(wire, pos + 1)
        rdstart = pos + 11
        pos = rdstart + rdlength
        if rtype != T_OPT or pos > size:
            raise _Slow
        _check_opt(wire, rdstart, pos, ttl, in_response=False)
        edns = True
    if pos != size:
        raise _Slow
    return WireQuery(msg_id, flags, qname, qtype, qclass, question, edns, wire)


def parse_wire_query(wire: bytes, *, max_size: int = MAX_MESSAGE_SIZE) -> WireQuery:
    """A query from a pod; raises :class:`DnsMessageError` (with dnsmsg's category) if unusable."""
    if len(wire) <= max_size:
        try:
            return _fast_query(wire)
        except (_Slow, struct.error, UnicodeError):
            pass
    query = parse_query(wire, max_size=max_size)  # decides, and raises with the category
    msg = query.message
    rrset = msg.question[0]
    question = (rrset.name.to_wire() or b"") + struct.pack("!HH", rrset.rdtype, rrset.rdclass)
    return WireQuery(query.id, int(msg.flags), query.qname, int(rrset.rdtype), int(rrset.rdclass), question,
                     msg.edns >= 0, bytes(wire))


def _fast_response(wire: bytes) -> Response:
    size = len(wire)
    if size < 12:
        raise _Slow
    msg_id, flags, qd, an, ns, ar = _HEADER.unpack_from(wire)
    if not flags & _QR or flags & _OPCODE_MASK or qd != 1:
        raise _Slow
    memo: _Memo = {}
    qname, pos = _name(wire, 12, size, memo)
    if pos + 4 > size:
        raise _Slow
    qtype, _qclass = struct.unpack_from("!HH", wire, pos)
    pos += 4
    # owner -> (target, min ttl over the owner's CNAME records); owner -> {rdtype: [addresses]}
    cname: dict[str, tuple[str, int]] = {}
    addrs: dict[str, dict[int, list[IPAddress]]] = {}
    addr_ttl: dict[str, int] = {}
    opt_seen = False
    for index in range(an + ns + ar):
        owner, pos = _name(wire, pos, size, memo)
        if pos + 10 > size:
            raise _Slow
        rtype, rclass, ttl, rdlength = _RR.unpack_from(wire, pos)
        pos += 10
        rdend = pos + rdlength
        if rdend > size:
            raise _Slow
        if rtype == T_OPT:
            if index < an + ns or opt_seen or owner != ".":
                raise _Slow
            opt_seen = True
            _check_opt(wire, pos, rdend, ttl, in_response=True)
            pos = rdend
            continue
        if rclass != C_IN or ttl > 0x7FFFFFFF:
            raise _Slow
        answer = index < an
        if rtype in (T_A, T_AAAA):
            if rdlength != (4 if rtype == T_A else 16):
                raise _Slow
            if answer:
                raw = wire[pos:rdend]
                ip: IPAddress = ipaddress.IPv4Address(raw) if rtype == T_A else ipaddress.IPv6Address(raw)
                per_type = addrs.setdefault(owner, {}).setdefault(rtype, [])
                if ip not in per_type:
                    per_type.append(ip)
                addr_ttl[owner] = min(ttl, addr_ttl.get(owner, ttl))
        elif rtype in (T_CNAME, T_NS, T_PTR, T_DNAME):
            target, after = _name(wire, pos, rdend, memo)
            if after != rdend:
                raise _Slow
            if answer and rtype == T_CNAME:
                # dnspython's CNAME rdataset is a singleton: a later record replaces the target,
                # the TTL is the minimum over all of them.
                known = cname.get(owner)
                cname[owner] = (target, ttl if known is None else min(known[1], ttl))
        elif rtype == T_MX:
            if rdlength < 3 or _name(wire, pos + 2, rdend)[1] != rdend:
                raise _Slow
        elif rtype == T_SOA:
            _, after = _name(wire, pos, rdend)
            _, after = _name(wire, after, rdend)
            if after + 20 != rdend:
                raise _Slow
        else:
            raise _Slow
        pos = rdend
    if pos != size:
        raise _Slow
    rcode = rcode_text(flags & 0xF)
    chain = [qname]
    ttls: list[int] = []
    looped = False
    while chain[-1] in cname:
        target, ttl = cname[chain[-1]]
        ttls.append(ttl)
        if target in chain:
            looped = True
            break
        chain.append(target)
    answers: dict[str, Answer] = {}
    final = addrs.get(chain[-1])
    if rcode == "NOERROR" and final and not looped:
        # dnspython keeps one rrset per type, in order of first appearance, each deduplicated.
        addresses = [ip for per_type in final.values() for ip in per_type]
        ttl = addr_ttl[chain[-1]]
        backwards: list[tuple[str, Answer]] = []
        for i in range(len(chain) - 1, -1, -1):
            if i < len(ttls):
                ttl = min(ttl, ttls[i])
            backwards.append((chain[i], Answer(addresses=addresses, ttl=ttl)))
        answers = dict(reversed(backwards))
    return Response(id=msg_id, rcode=rcode, qname=qname, qtypes=[type_text(qtype)], answers=answers, chain=chain,
                    tc=bool(flags & _TC), raw=wire)


def parse_wire_response(wire: bytes, *, max_size: int = MAX_MESSAGE_SIZE) -> Response:
    """A response from the upstream; raises :class:`DnsMessageError` (dnsmsg's category) if unusable."""
    if len(wire) <= max_size:
        try:
            return _fast_response(wire)
        except (_Slow, struct.error, UnicodeError, ValueError):
            pass
    return parse_response(wire, max_size=max_size)


def error_response(query: WireQuery, rcode: int) -> bytes:
    """The proxy's own answer to ``query``: REFUSED or NXDOMAIN for a denied query (the bytes
    ``dnsmsg.refused_response`` builds), SERVFAIL when the upstream failed. Same id and question,
    QR set, RD and CD copied, RA when RD was asked, no records but a bare OPT (payload 1232) when
    the query used EDNS."""
    flags = _QR | (query.flags & (_RD | _CD)) | rcode
    if query.flags & _RD:
        flags |= _RA
    header = _HEADER.pack(query.id, flags, 1, 0, 0, 1 if query.edns else 0)
    opt = b"\x00" + _RR.pack(T_OPT, 1232, 0, 0) if query.edns else b""
    return header + query.question + opt


def same_question(query: WireQuery, response: bytes) -> bool:
    """Whether ``response`` answers ``query``'s question (compared without case: resolvers may
    echo the name in another case). Cheap: no parse."""
    end = 12 + len(query.question)
    return len(response) >= end and response[12:end].lower() == query.question.lower()


__all__ = [
    "RCODE_NOERROR",
    "RCODE_NXDOMAIN",
    "RCODE_REFUSED",
    "RCODE_SERVFAIL",
    "DnsMessageError",
    "WireQuery",
    "error_response",
    "parse_wire_query",
    "parse_wire_response",
    "rcode_of",
    "rcode_text",
    "same_question",
    "type_text",
]
