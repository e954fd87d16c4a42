"""The UI's HTTP API over a fake relay: the page, the map, an edge's flows, the DNS panel, bad
parameters refused with a message naming them, and loopback only."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from test_ui_servicemap import WORLD, dns_flow, make_flow, pod  # type: ignore[import-not-found]

from weft.ui import servicemap
from weft.ui.server import build_app, start_ui


class FakeRelay:
    def __init__(self, flows: list[dict[str, Any]]) -> None:
        self.flows = flows
        self.limits: list[int] = []

    async def recent_flows(self, limit: int) -> list[dict[str, Any]]:
        self.limits.append(limit)
        return self.flows[-limit:]

    async def node_names(self) -> list[str]:
        return ["n1", "n2"]


FLOWS = [make_flow(pod("default", "client-1"), pod("default", "web-1")),
         make_flow(pod("default", "client-1"), pod("default", "web-1"), verdict="DROPPED", reason="POLICY_DENIED"),
         make_flow(pod("default", "client-1"), WORLD, dst_ip="192.0.2.1"),
         dns_flow("a.example.")]


def run(body: Callable[[TestClient[Any, Any], FakeRelay], Awaitable[None]], window: int = 10_000,
        max_age_s: float = 0.0) -> None:
    relay = FakeRelay(list(FLOWS))

    async def main() -> None:
        async with TestClient(TestServer(build_app(relay, window=window, max_age_s=max_age_s))) as client:
            await body(client, relay)

    asyncio.run(main())


def test_page_is_self_contained() -> None:
    async def body(client: TestClient[Any, Any], _: FakeRelay) -> None:
        resp = await client.get("/")
        assert resp.status == 200 and resp.content_type == "text/html"
        text = await resp.text()
        assert "<svg" in text and "/api/servicemap" in text
        assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "").replace(
            '"http://www.w3.org/2000/svg"', "")
        assert "https://" not in text and "<link" not in text and "src=" not in text
    run(body)


def test_servicemap_flows_and_dns() -> None:
    async def body(client: TestClient[Any, Any], relay: FakeRelay) -> None:
        m = await (await client.get("/api/servicemap")).json()
        assert m["node_names"] == ["n1", "n2"]
        assert {n["id"] for n in m["nodes"]} == {"default/client", "default/web", "ip:192.0.2.1"}
        edge = next(e for e in m["edges"] if e["destination"] == "default/web")
        assert edge["verdicts"] == {"DROPPED": 1, "FORWARDED": 1}
        got = await (await client.get("/api/flows", params={"edge": edge["id"], "limit": "1"})).json()
        assert got["edge"] == edge["id"]
        assert len(got["flows"]) == 1
        both = await (await client.get("/api/flows", params={"edge": edge["id"]})).json()
        assert sorted((f["verdict"], f["drop_reason"]) for f in both["flows"]) == [
            ("DROPPED", "POLICY_DENIED"), ("FORWARDED", "")]
        dns = await (await client.get("/api/dns")).json()
        assert dns["names"] == [{"name": "a.example", "queries": 1, "errors": 0, "denied": 0}]
        assert set(relay.limits) == {5}
    run(body, window=5)


@pytest.mark.parametrize(("query", "message"), [
    ({}, "edge parameter is missing"),
    ({"edge": "e1", "limit": "ten"}, "limit must be an integer, not 'ten'"),
    ({"edge": "e1", "limit": "0"}, "limit must be between 1 and"),
    ({"edge": "e1", "limit": "100000"}, "limit must be between 1 and"),
])
def test_bad_flow_queries_are_refused(query: dict[str, str], message: str) -> None:
    async def body(client: TestClient[Any, Any], _: FakeRelay) -> None:
        resp = await client.get("/api/flows", params=query)
        assert resp.status == 400
        assert message in (await resp.json())["error"]
    run(body)


def test_map_follows_new_flows() -> None:
    async def body(client: TestClient[Any, Any], relay: FakeRelay) -> None:
        before = await (await client.get("/api/servicemap")).json()
        relay.flows.append(make_flow(pod("shop", "db-0"), pod("shop", "cache-0"), port=6379))
        after = await (await client.get("/api/servicemap")).json()
        assert len(after["edges"]) == len(before["edges"]) + 1
        assert servicemap.edge_id("shop/db", "shop/cache", "TCP", 6379) in {e["id"] for e in after["edges"]}
    run(body)


def test_one_fetch_serves_the_pages_requests_of_a_second() -> None:
    async def body(client: TestClient[Any, Any], relay: FakeRelay) -> None:
        for path in ("/api/servicemap", "/api/dns", "/api/servicemap"):
            assert (await client.get(path)).status == 200
        assert relay.limits == [10_000]
    run(body, max_age_s=60)


def test_only_loopback_and_a_real_listener() -> None:
    async def main() -> None:
        with pytest.raises(ValueError, match="loopback"):
            await start_ui(FakeRelay([]), host="0.0.0.0", port=0)
        runner = await start_ui(FakeRelay(list(FLOWS)), port=0)
        try:
            host, port = runner.addresses[0][:2]
            assert host == "127.0.0.1"
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"GET /api/dns HTTP/1.0\r\n\r\n")
            await writer.drain()
            assert b"a.example" in await reader.read()
            writer.close()
        finally:
            await runner.cleanup()
    asyncio.run(main())
    with pytest.raises(ValueError, match="window must be at least 1"):
        build_app(FakeRelay([]), window=0)
