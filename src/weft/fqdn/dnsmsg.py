"""DNS messages for the proxy: parse a query, parse a response into learned names, refuse a query.

dnspython does the wire format. In front of it, a small structural walk of the message (header
counts, names, record headers, record lengths) classifies what dnspython would only call a
``FormError``, so the proxy can count and log drops by cause (:class:`DnsMessageError.category`):

* ``oversized`` — longer than the caller's limit (65535 at most: the TCP length prefix is 16 bits);
* ``truncated`` — the bytes end inside the header, a name, a record header or a record's data
  (every prefix of a valid message is ``truncated``);
* ``pointer_loop`` — a compressed name whose pointers come back to where they already went;
* ``not_a_query`` — not a standard query exchange: for :func:`parse_query`, QR set, opcode other
  than QUERY or a question count other than 1; for :func:`parse_response`, QR clear, opcode other
  than QUERY or a question count other than 1 (a response with no question cannot be tied to a
  name);
* ``malformed`` — everything else dnspython rejects (reserved label types, forward pointers, a
  name over 255 octets, bad record data, trailing bytes...).

The walk is iterative and bounded by the message length: no input makes it recurse, loop forever or
raise anything but :class:`DnsMessageError`.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype

from weft.fqdn.matchpattern import normalize_name
from weft.types.addresses import IPAddress

MAX_MESSAGE_SIZE = 65535
CATEGORIES = ("truncated", "malformed", "oversized", "pointer_loop", "not_a_query")

_HEADER = struct.Struct("!6H")
_RR_FIXED = struct.Struct("!HHIH")  # type, class, ttl, rdlength
_QR = 0x8000
_OPCODE_SHIFT, _OPCODE_MASK = 11, 0xF

# Record types whose data starts with a (compressible) domain name; the walk follows those names
# too so a pointer loop in, say, a CNAME target is reported as one. MX and SOA add offsets.
_RDATA_NAMES: dict[int, tuple[int, ...]] = {
    dns.rdatatype.NS: (0,),
    dns.rdatatype.CNAME: (0,),
    dns.rdatatype.PTR: (0,),
    dns.rdatatype.DNAME: (0,),
    dns.rdatatype.MX: (2,),
}

# Denied queries are answered with one of these (Cilium's --tofqdns-dns-reject-response-code:
# refused or nameError).
_REFUSAL_RCODES = {"REFUSED": dns.rcode.REFUSED, "NXDOMAIN": dns.rcode.NXDOMAIN}


class DnsMessageError(ValueError):
    """A message the proxy cannot use; ``category`` is one of :data:`CATEGORIES`."""

    def __init__(self, category: str, detail: str) -> None:
        assert category in CATEGORIES, category
        super().__init__(f"{category}: {detail}")
        self.category = category
        self.detail = detail


@dataclass(frozen=True)
class Query:
    """A parsed query. ``qname`` is normalized (lowercase, trailing dot); ``raw`` is the wire form."""

    id: int
    qname: str
    qtypes: list[str]
    qclass: str
    rd: bool
    raw: bytes = field(repr=False)
    message: dns.message.Message = field(repr=False, compare=False)


@dataclass(frozen=True)
class Answer:
    """What one name of a CNAME chain resolves to: the final A/AAAA addresses and the TTL to use."""

    addresses: list[IPAddress]
    ttl: int


@dataclass(frozen=True)
class Response:
    """A parsed response.

    ``answers`` maps every name of the CNAME chain that starts at ``qname`` (normalized) to the
    chain's final addresses, when there are some and ``rcode`` is NOERROR; otherwise it is empty.
    ``chain`` lists the names walked, ``qname`` first (also on a NODATA answer or a CNAME loop).
    """

    id: int
    rcode: str
    qname: str
    qtypes: list[str]
    answers: dict[str, Answer]
    chain: list[str]
    tc: bool
    raw: bytes = field(repr=False)


# ----------------------------------------------------------------------------- structural walk


def _walk_name(wire: bytes, pos: int, end: int, where: str, *, in_place: bool = True) -> int:
    """Check the name at ``pos`` and return the offset just after it.

    ``in_place`` names sit in the message's byte stream (owner names, questions): running out of
    bytes there means the message was cut, ``truncated``. Inside record data (``end`` is the data's
    end, whole by then) or after following a pointer, running out is ``malformed``. Pointers may
    point anywhere inside the message (dnspython then rejects forward ones as ``malformed``); one
    that lands on a label this name already went through is a ``pointer_loop`` — caught at the
    first repeat, before the loop can grow the name past any length check.
    """
    after: int | None = None  # where the name ends in the byte stream
    seen: set[int] = set()  # offsets of the labels and pointers walked
    octets = 0
    limit = end
    while True:
        cut = "truncated" if in_place and after is None else "malformed"
        if pos >= limit:
            raise DnsMessageError(cut, f"{where}: name runs past the end at offset {pos}")
        seen.add(pos)
        length = wire[pos]
        kind = length & 0xC0
        if kind == 0xC0:
            if pos + 1 >= limit:
                raise DnsMessageError(cut, f"{where}: compression pointer cut at offset {pos}")
            target = ((length & 0x3F) << 8) | wire[pos + 1]
            if after is None:
                after = pos + 2
            if target in seen:
                raise DnsMessageError("pointer_loop", f"{where}: compression pointer at {pos} loops back to {target}")
            # A target outside the message is not a truncation: the pointer itself is wrong.
            if target >= len(wire):
                raise DnsMessageError("malformed", f"{where}: compression pointer to offset {target}, past the end")
            pos, limit = target, len(wire)
        elif kind == 0:
            octets += length + 1
            if octets > 255:
                raise DnsMessageError("malformed", f"{where}: name longer than 255 octets")
            if length == 0:
                return after if after is not None else pos + 1
            if pos + 1 + length > limit:
                raise DnsMessageError(cut, f"{where}: label runs past the end at offset {pos}")
            pos += 1 + length
        else:
            raise DnsMessageError("malformed", f"{where}: reserved label type 0x{length:02x} at offset {pos}")


def _walk(wire: bytes) -> None:
    """Walk every section the header announces; raise :class:`DnsMessageError` on the first problem."""
    _, _, qd, an, ns, ar = _HEADER.unpack_from(wire)
    pos = _HEADER.size
    for i in range(qd):
        pos = _walk_name(wire, pos, len(wire), f"question {i}")
        if pos + 4 > len(wire):
            raise DnsMessageError("truncated", f"question {i}: type and class cut at offset {pos}")
        pos += 4
    for section, count in (("answer", an), ("authority", ns), ("additional", ar)):
        for i in range(count):
            where = f"{section} {i}"
            pos = _walk_name(wire, pos, len(wire), where)
            if pos + _RR_FIXED.size > len(wire):
                raise DnsMessageError("truncated", f"{where}: record header cut at offset {pos}")
            rtype, _, _, rdlength = _RR_FIXED.unpack_from(wire, pos)
            pos += _RR_FIXED.size
            if pos + rdlength > len(wire):
                raise DnsMessageError("truncated", f"{where}: record data cut ({rdlength} octets from offset {pos})")
            data_end = pos + rdlength
            for offset in _RDATA_NAMES.get(rtype, ()):
                if offset < rdlength:
                    _walk_name(wire, pos + offset, data_end, f"{where} data", in_place=False)
            if rtype == dns.rdatatype.SOA and rdlength:
                second = _walk_name(wire, pos, data_end, f"{where} data", in_place=False)
                if second < data_end:
                    _walk_name(wire, second, data_end, f"{where} data", in_place=False)
            pos += rdlength
    if pos != len(wire):
        raise DnsMessageError("malformed", f"{len(wire) - pos} octets after the last record")


def _parse(wire: bytes, max_size: int, want_response: bool) -> dns.message.Message:
    if max_size > MAX_MESSAGE_SIZE:
        raise ValueError(f"max_size {max_size} is over the DNS limit of {MAX_MESSAGE_SIZE}")
    if len(wire) > max_size:
        raise DnsMessageError("oversized", f"{len(wire)} octets, over the limit of {max_size}")
    if len(wire) < _HEADER.size:
        raise DnsMessageError("truncated", f"{len(wire)} octets, shorter than the 12-octet header")
    _, flags, qd, _, _, _ = _HEADER.unpack_from(wire)
    is_response = bool(flags & _QR)
    opcode = (flags >> _OPCODE_SHIFT) & _OPCODE_MASK
    kind = "response" if want_response else "query"
    if is_response != want_response:
        raise DnsMessageError("not_a_query", f"QR bit {'set' if is_response else 'clear'} in a {kind}")
    if opcode != dns.opcode.QUERY:
        raise DnsMessageError("not_a_query", f"opcode {dns.opcode.to_text(opcode)} in a {kind}, not QUERY")
    if qd != 1:
        raise DnsMessageError("not_a_query", f"{qd} questions in a {kind}, not 1")
    _walk(wire)
    try:
        # keyring=False: a TSIG-signed message parses, unverified (the proxy holds no keys and
        # forwards the bytes as they came).
        return dns.message.from_wire(wire, keyring=False)
    except dns.exception.DNSException as e:
        raise DnsMessageError("malformed", f"{type(e).__name__}: {e}") from e
    except (ValueError, TypeError, IndexError, KeyError, UnicodeError, struct.error) as e:
        # dnspython's record-data parsers can fail this way on hostile bytes the walk accepted.
        raise DnsMessageError("malformed", f"{type(e).__name__}: {e}") from e


def _question(msg: dns.message.Message) -> tuple[str, list[str], str]:
    rrset = msg.question[0]
    qname = normalize_name(rrset.name.to_text())
    return qname, [dns.rdatatype.to_text(rrset.rdtype)], dns.rdataclass.to_text(rrset.rdclass)


# ----------------------------------------------------------------------------- API


def parse_query(wire: bytes, *, max_size: int = MAX_MESSAGE_SIZE) -> Query:
    """Parse a query from a client; raise :class:`DnsMessageError` if it is not one the proxy can use."""
    msg = _parse(wire, max_size, want_response=False)
    qname, qtypes, qclass = _question(msg)
    return Query(
        id=msg.id,
        qname=qname,
        qtypes=qtypes,
        qclass=qclass,
        rd=bool(msg.flags & dns.flags.RD),
        raw=bytes(wire),
        message=msg,
    )


def refused_response(query: Query, rcode: str = "REFUSED") -> bytes:
    """The answer to a denied query: same id and question, QR set, ``rcode`` REFUSED or NXDOMAIN.

        RD and CD are copied from the query, as every responder does; RA is set when the query asked
        for recursion (RD), since the proxy stands in front of a recursive resolver and a stub seeing
        RD without RA warns that "recursion was not available" rather than showing the refusal. No
        answer, authority or additional record; if the query used EDNS, the response carries a bare
        OPT record (RFC 6891): header, question and 11 octets at most, never larger than a query that
    fitted. The same bytes
        serve UDP and TCP (the caller adds the TCP length prefix, :func:`frame_tcp`).
    """
    code = _REFUSAL_RCODES.get(rcode.upper())
    if code is None:
        raise ValueError(f"rcode {rcode!r}: a denied query is answered REFUSED or NXDOMAIN")
    q = query.message
    resp = dns.message.Message(id=q.id)
    resp.flags = dns.flags.QR | (q.flags & (dns.flags.RD | dns.flags.CD))
    if q.flags & dns.flags.RD:
        resp.flags |= dns.flags.RA
    resp.set_opcode(dns.opcode.QUERY)
    resp.set_rcode(code)
    for rrset in q.question:
        resp.find_rrset(resp.question, rrset.name, rrset.rdclass, rrset.rdtype, create=True, force_unique=True)
    if q.edns >= 0:
        resp.use_edns(0, 0, 1232)
    wire: bytes = resp.to_wire()
    return wire


def parse_response(wire: bytes, *, max_size: int = MAX_MESSAGE_SIZE) -> Response:
    """Parse a response from the upstream resolver; raise :class:`DnsMessageError` if unusable.

    The CNAME chain is walked from the question name through the answer section (class IN, names
    compared case-insensitively, record order irrelevant). The addresses are the A and AAAA records
    of the chain's last name; records of names off the chain are ignored. The TTL of a name is the
    smallest TTL from that name to the addresses (its CNAME records and the address records), so the
    question name gets the minimum over the whole chain, as in Cilium. A CNAME loop ends the walk
    at the repeated name, with no addresses.
    """
    msg = _parse(wire, max_size, want_response=True)
    qname, qtypes, _ = _question(msg)
    rcode = dns.rcode.to_text(msg.rcode())

    cname: dict[str, tuple[str, int]] = {}
    addrs: dict[str, list[tuple[IPAddress, int]]] = {}
    for rrset in msg.answer:
        if rrset.rdclass != dns.rdataclass.IN:
            continue
        owner = normalize_name(rrset.name.to_text())
        if rrset.rdtype == dns.rdatatype.CNAME:
            # Two CNAMEs for one name is invalid DNS; the first one seen wins.
            if owner not in cname and len(rrset):
                cname[owner] = (normalize_name(next(iter(rrset)).target.to_text()), rrset.ttl)
        elif rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            addrs.setdefault(owner, []).extend((ipaddress.ip_address(rd.address), rrset.ttl) for rd in rrset)

    chain = [qname]
    ttls: list[int] = []  # ttls[i]: TTL of the CNAME from chain[i] to chain[i+1]
    looped = False
    while chain[-1] in cname:
        target, ttl = cname[chain[-1]]
        ttls.append(ttl)
        if target in chain:
            looped = True
            break
        chain.append(target)

    answers: dict[str, Answer] = {}
    final = addrs.get(chain[-1], [])
    if rcode == "NOERROR" and final and not looped:
        seen: dict[IPAddress, None] = {}
        for address, _ in final:
            seen.setdefault(address)
        ttl = min(t for _, t in final)
        # Walk back from the addresses, each name taking the minimum of what lies after it.
        for i in range(len(chain) - 1, -1, -1):
            if i < len(ttls):
                ttl = min(ttl, ttls[i])
            answers[chain[i]] = Answer(addresses=list(seen), ttl=ttl)
        answers = dict(reversed(list(answers.items())))  # qname first

    return Response(
        id=msg.id,
        rcode=rcode,
        qname=qname,
        qtypes=qtypes,
        answers=answers,
        chain=chain,
        tc=bool(msg.flags & dns.flags.TC),
        raw=bytes(wire),
    )


def frame_tcp(wire: bytes) -> bytes:
    """DNS over TCP: the message prefixed with its length (2 octets, network order)."""
    if len(wire) > MAX_MESSAGE_SIZE:
        raise DnsMessageError("oversized", f"{len(wire)} octets cannot be framed (TCP limit {MAX_MESSAGE_SIZE})")
    return struct.pack("!H", len(wire)) + wire
