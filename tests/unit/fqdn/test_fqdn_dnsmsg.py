"""DNS messages: queries, responses and refusals, and every way a hostile packet can be wrong."""

from __future__ import annotations

import ipaddress
import struct

import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weft.fqdn.dnsmsg import (
    CATEGORIES,
    Answer,
    DnsMessageError,
    Query,
    Response,
    frame_tcp,
    parse_query,
    parse_response,
    refused_response,
)


def query_wire(name: str = "www.example.com", rdtype: str = "A", edns: bool = False, qid: int = 0x1234) -> bytes:
    q = dns.message.make_query(name, rdtype, use_edns=0 if edns else None)
    q.id = qid
    wire: bytes = q.to_wire()
    return wire


def header(qid: int = 7, flags: int = 0x0100, qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0) -> bytes:
    return struct.pack("!6H", qid, flags, qd, an, ns, ar)


def category(wire: bytes, parse: object = parse_query, **kw: int) -> str:
    with pytest.raises(DnsMessageError) as info:
        parse(wire, **kw)  # type: ignore[operator]
    assert info.value.category in CATEGORIES
    return info.value.category


def response_wire(
    qname: str, records: list[tuple[str, int, str, list[str]]], rcode: int = dns.rcode.NOERROR, rdtype: str = "A"
) -> bytes:
    q = dns.message.make_query(qname, rdtype)
    r = dns.message.make_response(q)
    r.set_rcode(rcode)
    for name, ttl, rtype, values in records:
        r.answer.append(dns.rrset.from_text(name, ttl, "IN", rtype, *values))
    wire: bytes = r.to_wire()
    return wire


# ----------------------------------------------------------------------------- queries


def test_parse_query_fields() -> None:
    wire = query_wire("WWW.Example.COM", "AAAA", qid=0xBEEF)
    q = parse_query(wire)
    assert isinstance(q, Query)
    assert (q.id, q.qname, q.qtypes, q.qclass, q.rd) == (0xBEEF, "www.example.com.", ["AAAA"], "IN", True)
    assert q.raw == wire


def test_parse_query_with_edns_and_unknown_type() -> None:
    q = parse_query(query_wire("a.b", "TYPE65280", edns=True))
    assert q.qtypes == ["TYPE65280"]


def test_every_prefix_of_a_valid_query_is_truncated() -> None:
    for wire in (query_wire(), query_wire("x.y", "TXT", edns=True)):
        parse_query(wire)
        for n in range(len(wire)):
            assert category(wire[:n]) == "truncated", n


def test_every_prefix_of_a_valid_response_is_truncated() -> None:
    wire = response_wire(
        "www.example.com",
        [("www.example.com.", 60, "CNAME", ["cdn.example.net."]), ("cdn.example.net.", 30, "A", ["192.0.2.1"])],
    )
    parse_response(wire)
    for n in range(len(wire)):
        assert category(wire[:n], parse_response) == "truncated", n


@pytest.mark.parametrize(
    ("wire", "what"),
    [
        (header(flags=0x8100) + b"\x01a\x00\x00\x01\x00\x01", "QR bit set"),
        (header(flags=0x2800) + b"\x01a\x00\x00\x01\x00\x01", "opcode UPDATE"),
        (header(flags=0x1000) + b"\x01a\x00\x00\x01\x00\x01", "opcode STATUS"),
        (header(flags=0x2000) + b"\x01a\x00\x00\x01\x00\x01", "NOTIFY"),
        (header(qd=0), "0 questions"),
        (header(qd=2) + b"\x01a\x00\x00\x01\x00\x01" * 2, "2 questions"),
    ],
)
def test_not_a_query(wire: bytes, what: str) -> None:
    with pytest.raises(DnsMessageError, match=what) as info:
        parse_query(wire)
    assert info.value.category == "not_a_query"


def test_a_query_is_not_a_response() -> None:
    assert category(query_wire(), parse_response) == "not_a_query"


def test_oversized() -> None:
    wire = query_wire()
    assert category(wire + b"\x00" * 70000) == "oversized"
    assert category(wire, max_size=len(wire) - 1) == "oversized"
    parse_query(wire, max_size=len(wire))
    with pytest.raises(ValueError, match="over the DNS limit"):
        parse_query(wire, max_size=70000)


QUESTION_TAIL = b"\x00\x01\x00\x01"


@pytest.mark.parametrize(
    "name",
    [
        b"\xc0\x0c",  # points at itself
        b"\x01a\xc0\x0c",  # label, then back to the label
        b"\x01a\x01b\xc0\x0e",  # back to the second label
        b"\xc0\x0e\xc0\x0c",  # two pointers pointing at each other (forward, then back)
        b"\x3f" + b"x" * 63 + b"\xc0\x0c",  # a long label: the loop is found before the length check
    ],
)
def test_pointer_loop_in_question(name: bytes) -> None:
    wire = header() + name + QUESTION_TAIL
    with pytest.raises(DnsMessageError) as info:
        parse_query(wire)
    assert info.value.category == "pointer_loop", info.value


def test_pointer_loop_in_cname_data() -> None:
    good = response_wire("a.com", [("a.com.", 60, "CNAME", ["b.com."]), ("b.com.", 60, "A", ["192.0.2.1"])])
    # Rebuild the CNAME record by hand: its data is a pointer to itself.
    qlen = len(b"\x01a\x03com\x00") + 4
    rr_start = 12 + qlen
    rdata_at = rr_start + 2 + 10
    wire = (
        header(qid=1, flags=0x8180, an=1)
        + good[12 : 12 + qlen]
        + b"\xc0\x0c"
        + struct.pack("!HHIH", 5, 1, 60, 2)
        + struct.pack("!H", 0xC000 | rdata_at)
    )
    assert category(wire, parse_response) == "pointer_loop"


@pytest.mark.parametrize(
    ("tail", "what"),
    [
        (b"\x80a\x00" + QUESTION_TAIL, "reserved label type"),
        (b"\x40a\x00" + QUESTION_TAIL, "reserved label type"),
        (b"\xc0\xff" + QUESTION_TAIL, "past the end"),  # pointer outside the message
        (b"\x01a\x00" + QUESTION_TAIL + b"junk", "after the last record"),
        ((b"\x3f" + b"x" * 63) * 4 + b"\x00" + QUESTION_TAIL, "longer than 255"),
        (b"\xc0\x12" + QUESTION_TAIL + b"\x01a\x00", "BadPointer|after the last"),  # forward pointer
    ],
)
def test_malformed_queries(tail: bytes, what: str) -> None:
    with pytest.raises(DnsMessageError, match=what) as info:
        parse_query(header() + tail)
    assert info.value.category == "malformed"


def test_bad_record_data_is_malformed() -> None:
    # An A record with 3 octets of data.
    wire = header(qid=1, flags=0x8180, an=1) + b"\x01a\x00" + QUESTION_TAIL + b"\xc0\x0c"
    wire += struct.pack("!HHIH", 1, 1, 60, 3) + b"\x01\x02\x03"
    assert category(wire, parse_response) == "malformed"


def test_pointer_into_cut_data_is_malformed_not_truncated() -> None:
    # A pointer that lands on a label running past the end: the pointer is wrong, the message whole.
    wire = header() + b"\xc0\x12" + QUESTION_TAIL + b"\x05ab"
    assert category(wire) == "malformed"


def test_tsig_signed_query_parses() -> None:
    import dns.tsigkeyring

    q = dns.message.make_query("a.example.com", "A")
    q.use_tsig(dns.tsigkeyring.from_text({"key.": "MTIzNDU2Nzg5MDEyMzQ1Ng=="}), keyname="key.")
    assert parse_query(q.to_wire()).qname == "a.example.com."


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_random_garbage_only_raises_dns_message_error(data: bytes) -> None:
    for parse in (parse_query, parse_response):
        try:
            parse(data)
        except DnsMessageError as e:
            assert e.category in CATEGORIES


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=120), st.integers(min_value=0, max_value=1))
def test_garbage_after_a_valid_header(body: bytes, response: int) -> None:
    flags = 0x8180 if response else 0x0100
    an = body[0] % 4
    wire = header(flags=flags, an=an, ar=body[-1] % 2) + body
    for parse in (parse_query, parse_response):
        try:
            parse(wire)
        except DnsMessageError as e:
            assert e.category in CATEGORIES


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_valid_response(data: st.DataObject) -> None:
    wire = bytearray(
        response_wire(
            "www.example.com",
            [("www.example.com.", 60, "CNAME", ["cdn.example.net."]), ("cdn.example.net.", 30, "A", ["192.0.2.1"])],
        )
    )
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        at = data.draw(st.integers(min_value=0, max_value=len(wire) - 1))
        wire[at] = data.draw(st.integers(min_value=0, max_value=255))
    try:
        parse_response(bytes(wire))
    except DnsMessageError as e:
        assert e.category in CATEGORIES


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("edns", [False, True])
@pytest.mark.parametrize(("rcode", "code"), [("REFUSED", dns.rcode.REFUSED), ("nxdomain", dns.rcode.NXDOMAIN)])
def test_refused_response(edns: bool, rcode: str, code: int) -> None:
    q = parse_query(query_wire("Mixed.Case.example", "AAAA", edns=edns, qid=4242))
    wire = refused_response(q, rcode)
    r = dns.message.from_wire(wire)
    assert r.id == 4242
    assert r.rcode() == code
    assert r.flags & dns.flags.QR
    assert r.flags & dns.flags.RD and r.flags & dns.flags.RA
    assert not r.flags & (dns.flags.AA | dns.flags.TC)
    assert [(str(rr.name), rr.rdtype) for rr in r.question] == [("Mixed.Case.example.", 28)]
    assert not r.answer and not r.authority
    assert (r.edns >= 0) is edns
    assert len(wire) <= len(q.raw)
    assert q.message.is_response(r)
    resp = parse_response(wire)
    assert resp.id == 4242 and resp.qname == "mixed.case.example." and resp.answers == {}


def test_refused_response_without_recursion_desired() -> None:
    q = dns.message.make_query("a.com", "A")
    q.flags &= ~dns.flags.RD
    q.flags |= dns.flags.CD
    r = dns.message.from_wire(refused_response(parse_query(q.to_wire())))
    assert not r.flags & (dns.flags.RD | dns.flags.RA)
    assert r.flags & dns.flags.CD


def test_refused_response_rejects_other_rcodes() -> None:
    with pytest.raises(ValueError, match="REFUSED or NXDOMAIN"):
        refused_response(parse_query(query_wire()), "SERVFAIL")


def test_frame_tcp() -> None:
    wire = refused_response(parse_query(query_wire()))
    framed = frame_tcp(wire)
    assert framed[:2] == struct.pack("!H", len(wire)) and framed[2:] == wire
    assert frame_tcp(b"") == b"\x00\x00"
    with pytest.raises(DnsMessageError) as info:
        frame_tcp(b"\x00" * 65536)
    assert info.value.category == "oversized"


# ----------------------------------------------------------------------------- responses

V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address


def test_response_plain_a_records() -> None:
    r = parse_response(response_wire("Example.com", [("example.com.", 300, "A", ["192.0.2.1", "192.0.2.2"])]))
    assert isinstance(r, Response)
    assert (r.rcode, r.qname, r.qtypes, r.tc) == ("NOERROR", "example.com.", ["A"], False)
    # Addresses keep the order of the message (dnspython's rdataset order here).
    assert list(r.answers) == ["example.com."]
    assert sorted(r.answers["example.com."].addresses) == [V4("192.0.2.1"), V4("192.0.2.2")]
    assert r.answers["example.com."].ttl == 300
    assert r.chain == ["example.com."]


def test_response_cname_chain_maps_every_name_to_final_addresses() -> None:
    wire = response_wire(
        "www.example.com",
        [
            ("www.example.com.", 300, "CNAME", ["CDN.example.net."]),
            ("cdn.example.net.", 60, "CNAME", ["edge.example.org."]),
            ("edge.example.org.", 120, "A", ["192.0.2.1"]),
            ("edge.example.org.", 90, "AAAA", ["2001:db8::1"]),
            ("unrelated.example.", 5, "A", ["198.51.100.9"]),  # out of chain: ignored
        ],
    )
    r = parse_response(wire)
    final = [V4("192.0.2.1"), V6("2001:db8::1")]
    assert r.chain == ["www.example.com.", "cdn.example.net.", "edge.example.org."]
    assert list(r.answers) == r.chain
    assert r.answers["www.example.com."] == Answer(final, 60)  # the minimum over the whole chain
    assert r.answers["cdn.example.net."] == Answer(final, 60)
    assert r.answers["edge.example.org."] == Answer(final, 90)  # only what lies after it
    assert all(a.addresses == final for a in r.answers.values())


def test_response_chain_order_does_not_matter() -> None:
    wire = response_wire(
        "a.com",
        [
            ("c.com.", 50, "A", ["192.0.2.3"]),
            ("b.com.", 40, "CNAME", ["c.com."]),
            ("a.com.", 30, "CNAME", ["b.com."]),
        ],
    )
    r = parse_response(wire)
    assert r.chain == ["a.com.", "b.com.", "c.com."]
    assert {n: a.ttl for n, a in r.answers.items()} == {"a.com.": 30, "b.com.": 40, "c.com.": 50}


def test_response_cname_loop_terminates_without_addresses() -> None:
    wire = response_wire(
        "a.com",
        [("a.com.", 30, "CNAME", ["b.com."]), ("b.com.", 30, "CNAME", ["a.com."]), ("a.com.", 30, "A", ["192.0.2.1"])],
    )
    r = parse_response(wire)
    assert r.chain == ["a.com.", "b.com."]
    assert r.answers == {}


def test_response_self_cname() -> None:
    r = parse_response(response_wire("a.com", [("a.com.", 30, "CNAME", ["A.com."])]))
    assert r.chain == ["a.com."] and r.answers == {}


def test_response_addresses_of_other_names_are_ignored() -> None:
    # The question name's A records are absent; a sibling's are present.
    r = parse_response(response_wire("a.com", [("b.com.", 30, "A", ["192.0.2.1"])]))
    assert r.answers == {}


def test_response_duplicate_addresses_collapse() -> None:
    wire = response_wire("a.com", [("a.com.", 30, "A", ["192.0.2.1"]), ("A.COM.", 20, "A", ["192.0.2.1", "192.0.2.2"])])
    r = parse_response(wire)
    assert sorted(r.answers["a.com."].addresses) == [V4("192.0.2.1"), V4("192.0.2.2")]
    assert r.answers["a.com."].ttl == 20


@pytest.mark.parametrize("rcode", [dns.rcode.NXDOMAIN, dns.rcode.SERVFAIL, dns.rcode.REFUSED])
def test_error_rcodes_learn_nothing(rcode: int) -> None:
    r = parse_response(response_wire("a.com", [("a.com.", 30, "A", ["192.0.2.1"])], rcode=rcode))
    assert r.rcode == dns.rcode.to_text(rcode)
    assert r.answers == {}


def test_nxdomain_after_cname() -> None:
    wire = response_wire("a.com", [("a.com.", 30, "CNAME", ["gone.com."])], rcode=dns.rcode.NXDOMAIN)
    r = parse_response(wire)
    assert r.rcode == "NXDOMAIN" and r.chain == ["a.com.", "gone.com."] and r.answers == {}


def test_nodata_response() -> None:
    r = parse_response(response_wire("a.com", [], rdtype="AAAA"))
    assert r.rcode == "NOERROR" and r.qtypes == ["AAAA"] and r.answers == {} and r.chain == ["a.com."]


def test_non_in_class_records_are_ignored() -> None:
    q = dns.message.make_query("a.com", "A")
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text("a.com.", 30, "HS", "A", r"\# 4 c0000208"))
    r.answer.append(dns.rrset.from_text("a.com.", 30, "IN", "A", "192.0.2.7"))
    assert parse_response(r.to_wire()).answers == {"a.com.": Answer([V4("192.0.2.7")], 30)}


def test_truncated_flag_is_reported() -> None:
    q = dns.message.make_query("a.com", "A")
    r = dns.message.make_response(q)
    r.flags |= dns.flags.TC
    assert parse_response(r.to_wire()).tc


def test_response_zero_ttl() -> None:
    r = parse_response(response_wire("a.com", [("a.com.", 0, "A", ["192.0.2.1"])]))
    assert r.answers["a.com."].ttl == 0


def test_compressed_response_from_dnspython_parses() -> None:
    # dnspython compresses owner names and CNAME targets: the walk must follow valid pointers.
    wire = response_wire(
        "x.example.com",
        [("x.example.com.", 10, "CNAME", ["y.example.com."]), ("y.example.com.", 10, "A", ["192.0.2.9"])],
    )
    assert b"\xc0" in wire
    assert parse_response(wire).answers["x.example.com."].addresses == [V4("192.0.2.9")]


def test_error_message_names_the_category() -> None:
    with pytest.raises(DnsMessageError, match=r"^truncated: 3 octets"):
        parse_query(b"abc")
