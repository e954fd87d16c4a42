"""The fast wire path gives what weft.fqdn.dnsmsg gives, on every message, or defers to it."""

from __future__ import annotations

import ipaddress
import random
import struct

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rrset
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weft.dnsproxy import wire
from weft.dnsproxy.wire import (
    RCODE_NXDOMAIN,
    RCODE_REFUSED,
    RCODE_SERVFAIL,
    error_response,
    parse_wire_query,
    parse_wire_response,
    same_question,
)
from weft.fqdn.dnsmsg import DnsMessageError, parse_query, parse_response, refused_response

label = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABC0123456789-_", min_size=1, max_size=12)
name = st.lists(label, min_size=1, max_size=4).map(lambda labels: ".".join(labels) + ".example.com")


def outcome(fn: object, data: bytes) -> object:
    try:
        return fn(data)  # type: ignore[operator]
    except DnsMessageError as exc:
        return ("error", exc.category)


def response_wire(qname: str, rdtype: str, records: list[tuple[str, int, str, str]], rcode: int = 0,
                  edns: bool = False, authority_soa: bool = False) -> bytes:
    q = dns.message.make_query(qname, rdtype, use_edns=0 if edns else None)
    r = dns.message.make_response(q)
    r.set_rcode(rcode)
    for owner, ttl, kind, value in records:
        r.answer.append(dns.rrset.from_text(owner, ttl, "IN", kind, value))
    if authority_soa:
        r.authority.append(dns.rrset.from_text("example.com.", 30, "IN", "SOA",
                                               "ns.example.com. admin.example.com. 1 2 3 4 5"))
    data: bytes = r.to_wire()
    return data


def test_fast_query_equals_dnsmsg() -> None:
    for edns in (False, True):
        q = dns.message.make_query("App1.Example.com", "AAAA", use_edns=0 if edns else None)
        data = q.to_wire()
        fast = wire._fast_query(data)  # the fast path itself, not its fallback
        slow = parse_query(data)
        assert (fast.id, fast.qname, fast.edns) == (slow.id, slow.qname, edns)
        assert fast.qtype_text == slow.qtypes[0]
        assert error_response(fast, RCODE_REFUSED) == refused_response(slow)
        assert error_response(fast, RCODE_NXDOMAIN) == refused_response(slow, "NXDOMAIN")


def test_cookie_query_is_fast_and_other_options_defer() -> None:
    q = dns.message.make_query("a.example.com", "A", use_edns=0,
                               options=[dns.edns.GenericOption(dns.edns.OptionType.COOKIE, b"12345678")])
    assert wire._fast_query(q.to_wire()).edns
    ecs = dns.message.make_query("a.example.com", "A", use_edns=0, options=[dns.edns.ECSOption("192.0.2.0", 24)])
    with pytest.raises(wire._Slow):
        wire._fast_query(ecs.to_wire())
    assert parse_wire_query(ecs.to_wire()).qname == "a.example.com."  # the slow path answers


def test_servfail_shape() -> None:
    q = parse_wire_query(dns.message.make_query("x.example.com", "A").to_wire())
    msg = dns.message.from_wire(error_response(q, RCODE_SERVFAIL))
    assert msg.rcode() == dns.rcode.SERVFAIL and msg.flags & dns.flags.QR and msg.id == q.id
    assert msg.question[0].name == dns.name.from_text("x.example.com")


@pytest.mark.parametrize("records", [
    [("app.example.com.", 30, "A", "192.0.2.1")],
    [("app.example.com.", 30, "CNAME", "lb.example.com."), ("lb.example.com.", 20, "A", "192.0.2.1"),
     ("lb.example.com.", 40, "A", "192.0.2.2"), ("lb.example.com.", 20, "AAAA", "2001:db8::1")],
    [("app.example.com.", 30, "CNAME", "a.example.com."), ("a.example.com.", 5, "CNAME", "app.example.com.")],
    [("app.example.com.", 30, "CNAME", "b.example.com.")],
    [("other.example.com.", 30, "A", "192.0.2.9"), ("app.example.com.", 30, "A", "192.0.2.1"),
     ("app.example.com.", 30, "A", "192.0.2.1")],
    [("App.Example.com.", 30, "A", "192.0.2.1"), ("app.example.com.", 30, "AAAA", "2001:db8::1"),
     ("APP.example.com.", 10, "A", "192.0.2.3")],
])
@pytest.mark.parametrize("rcode", [0, 3])
def test_fast_response_equals_dnsmsg(records: list[tuple[str, int, str, str]], rcode: int) -> None:
    data = response_wire("app.example.com", "A", records, rcode=rcode, edns=True, authority_soa=True)
    assert wire._fast_response(data) == parse_response(data)


@settings(max_examples=200, deadline=None)
@given(qname=name, chain=st.lists(name, max_size=3), ttls=st.lists(st.integers(0, 3600), min_size=5, max_size=5),
       v4=st.lists(st.integers(1, 2**32 - 1), max_size=4), v6=st.lists(st.integers(1, 2**128 - 1), max_size=3),
       edns=st.booleans(), soa=st.booleans(), seed=st.integers(0, 1000))
def test_generated_responses_agree(qname: str, chain: list[str], ttls: list[int], v4: list[int], v6: list[int],
                                   edns: bool, soa: bool, seed: int) -> None:
    names = [qname, *chain]
    records = [(names[i] + ".", ttls[i % 5], "CNAME", names[i + 1] + ".") for i in range(len(names) - 1)]
    last = names[-1] + "."
    records += [(last, ttls[(i + 1) % 5], "A", str(ipaddress.IPv4Address(a))) for i, a in enumerate(v4)]
    records += [(last, ttls[(i + 2) % 5], "AAAA", str(ipaddress.IPv6Address(a))) for i, a in enumerate(v6)]
    random.Random(seed).shuffle(records)
    data = response_wire(qname, "A", records, edns=edns, authority_soa=soa)
    assert outcome(parse_wire_response, data) == outcome(parse_response, data)
    # Every cut of it is classified as dnsmsg classifies it.
    for cut in sorted({len(data) // 2, len(data) - 1, 12, 5}):
        assert outcome(parse_wire_response, data[:cut]) == outcome(parse_response, data[:cut])


def query_outcome(fn: object, data: bytes) -> object:
    try:
        q = fn(data)  # type: ignore[operator]
    except DnsMessageError as exc:
        return ("error", exc.category)
    return (q.id, q.qname)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(min_size=0, max_size=80), prefix=st.sampled_from([
    b"", struct.pack("!6H", 1, 0x0100, 1, 0, 0, 0), struct.pack("!6H", 1, 0x8180, 1, 1, 0, 0),
    struct.pack("!6H", 1, 0x0100, 1, 0, 0, 1)]))
def test_random_bytes_agree(data: bytes, prefix: bytes) -> None:
    raw = prefix + data
    assert query_outcome(parse_wire_query, raw) == query_outcome(parse_query, raw)
    assert outcome(parse_wire_response, raw) == outcome(parse_response, raw)


def test_pointer_loop_in_cname_data() -> None:
    data = bytearray(response_wire("app.example.com", "A", [("app.example.com.", 30, "CNAME", "b.example.com.")]))
    # The CNAME's data is the last name of the message: make it a pointer to itself.
    rdata_at = len(data) - len(b"\x01b\xc0\x10")
    fixed = data[:rdata_at - 2] + struct.pack("!H", 2) + struct.pack("!H", 0xC000 | rdata_at)
    assert outcome(parse_wire_response, bytes(fixed)) == outcome(parse_response, bytes(fixed))
    assert outcome(parse_wire_response, bytes(fixed))[0] == "error"  # type: ignore[index]


def test_hostile_queries_are_classified() -> None:
    good = dns.message.make_query("app.example.com", "A").to_wire()
    loop = good[:12] + b"\xc0\x0c" + b"\x00\x01\x00\x01"
    cases = {"truncated": good[:20], "pointer_loop": loop, "oversized": good + b"\0" * 2000,
             "not_a_query": dns.message.make_response(dns.message.from_wire(good)).to_wire(),
             "malformed": good[:12] + b"\x03app\x41\x00" + b"\x00\x01\x00\x01"}
    for category, data in cases.items():
        with pytest.raises(DnsMessageError) as info:
            parse_wire_query(data, max_size=1232)
        assert info.value.category == category, (category, info.value)


def test_same_question_ignores_case_only() -> None:
    q = parse_wire_query(dns.message.make_query("App.example.com", "A").to_wire())
    r = response_wire("app.EXAMPLE.com", "A", [])
    assert same_question(q, r)
    assert not same_question(q, response_wire("app.example.com", "AAAA", []))
    assert not same_question(q, response_wire("other.example.com", "A", []))
    assert not same_question(q, b"\0" * 10)
