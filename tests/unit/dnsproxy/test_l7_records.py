"""The proxy's L7 records on its query path (no sockets: replies are captured): a denied query is
one REQUEST record with verdict DROPPED, an answer a RESPONSE with latency and its answers, a
SERVFAIL the proxy makes itself a RESPONSE with verdict ERROR, a throttled query a REQUEST only;
and ``l7.get`` over the control handlers refuses a bad cursor."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from test_learning import DNS, EXT4, POD4, FakeMaps, answer, fake, query, write_rules

from weft.dnsproxy import control
from weft.dnsproxy.config import DnsProxySettings
from weft.dnsproxy.server import DnsProxy, Pending, ProxyPaths
from weft.dnsproxy.wire import parse_wire_query


@pytest.fixture
def proxy(tmp_path: Path) -> DnsProxy:
    write_rules(tmp_path)
    p = DnsProxy(DnsProxySettings(grace_seconds=4.0, min_ttl=0),
                 ProxyPaths(state_dir=tmp_path, pin_dir=tmp_path / "pins", socket_path=tmp_path / "p.sock"))
    p.maps = FakeMaps()  # type: ignore[assignment]
    assert p.load_rules()["loaded"]
    return p


def replies(p: DnsProxy, monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    sent: list[bytes] = []
    monkeypatch.setattr(p, "_reply_udp", lambda orig, client, v6, data: sent.append(data))
    return sent


def test_denied_query_is_one_dropped_request(proxy: DnsProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    sent = replies(proxy, monkeypatch)
    proxy._query(query("evil.example.org"), (POD4, 40000), DNS, False, 17)
    assert len(sent) == 1
    (record,) = proxy.l7.read(0)["records"]
    assert record["type"] == "REQUEST" and record["verdict"] == "DROPPED"
    assert record["source"] == {"ip": POD4, "port": 40000} and record["destination"] == {"ip": DNS[0], "port": 53}
    assert record["dns"] == {"query": "evil.example.org.", "qtypes": ["A"], "observation_source": "proxy"}
    assert record["ep_id"] == 7 and record["pod"] == "ns/client" and record["protocol"] == "UDP"


def test_answer_and_own_servfail_are_responses(proxy: DnsProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    replies(proxy, monkeypatch)
    endpoint = proxy.rules.endpoints[7]
    q = parse_wire_query(query("app.example.com"))
    proxy._answer(Pending(q, endpoint, (POD4, 40001), DNS, False, 0.0),
                  answer("app.example.com", [("app.example.com.", 30, "A", EXT4)]))
    fake(proxy).fail = True  # the datapath cannot be updated: the proxy answers SERVFAIL itself
    q2 = parse_wire_query(query("new.example.com"))
    proxy._answer(Pending(q2, endpoint, (POD4, 40002), DNS, False, 0.0),
                  answer("new.example.com", [("new.example.com.", 30, "A", "198.51.100.77")]))
    ok, failed = proxy.l7.read(0)["records"]
    assert ok["type"] == "RESPONSE" and ok["verdict"] == "FORWARDED" and ok["latency_ns"] > 0
    assert ok["dns"]["ips"] == [EXT4] and ok["dns"]["ttl"] == 30 and ok["dns"]["rcode"] == 0
    assert failed["verdict"] == "ERROR" and failed["dns"]["rcode"] == 2 and "ips" not in failed["dns"]


def test_throttled_query_has_its_request_only(proxy: DnsProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    sent = replies(proxy, monkeypatch)
    proxy.settings = proxy.settings.model_copy(update={"max_pending": 0})
    proxy._query(query("app.example.com"), (POD4, 40003), DNS, False, 17)
    assert sent == [] and proxy.counters["throttled"] == 1
    (record,) = proxy.l7.read(0)["records"]
    assert record["type"] == "REQUEST" and record["verdict"] == "FORWARDED"


def test_l7_get_handler(proxy: DnsProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    replies(proxy, monkeypatch)
    proxy._query(query("evil.example.org"), (POD4, 40000), DNS, False, 17)
    handler = proxy.handlers()["l7.get"]
    page: dict[str, Any] = asyncio.run(handler({"cursor": 0}))
    assert page["next"] == 2 and len(page["records"]) == 1 and page["epoch"] == proxy.l7.epoch
    for bad in ({"cursor": "x"}, {"cursor": -1}, {"cursor": 0, "max": 0}):
        with pytest.raises(control.ControlError, match=r"l7\.get"):
            asyncio.run(handler(bad))
