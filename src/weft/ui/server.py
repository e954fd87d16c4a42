"""The UI's HTTP server: the static page and its JSON API, on loopback.

``/`` the page (HTML + vanilla JS + SVG, nothing fetched from elsewhere), ``/api/servicemap``,
``/api/flows?edge=<id>&limit=N``, ``/api/dns``; the page polls them every second.
"""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any, Protocol

from aiohttp import web

from weft.ui import servicemap
from weft.ui.page import PAGE

DEFAULT_PORT = 12000  # hubble-ui's
FLOW_WINDOW = 10_000  # flows the map is drawn from
MAX_EDGE_FLOWS = 1_000


class FlowSource(Protocol):
    """What the UI needs of the relay."""

    async def recent_flows(self, limit: int) -> list[dict[str, Any]]: ...

    async def node_names(self) -> list[str]: ...


class FlowWindow:
    """The last ``size`` flows of the source, fetched at most once per ``max_age_s``: the page asks
    for the map, the DNS panel and an edge's flows every second, from one fetch."""

    def __init__(self, source: FlowSource, size: int, max_age_s: float = 0.5) -> None:
        self.source = source
        self.size = size
        self.max_age_s = max_age_s
        self._flows: list[dict[str, Any]] = []
        self._fetched = -float("inf")
        self._lock = asyncio.Lock()

    async def flows(self) -> list[dict[str, Any]]:
        async with self._lock:
            now = asyncio.get_running_loop().time()
            if now - self._fetched >= self.max_age_s:
                self._flows = await self.source.recent_flows(self.size)
                self._fetched = asyncio.get_running_loop().time()
            return self._flows


SOURCE_KEY = web.AppKey("source", FlowSource)
WINDOW_KEY = web.AppKey("window", FlowWindow)


def _bad(message: str) -> web.Response:
    return web.json_response({"error": message}, status=400)


async def _page(_: web.Request) -> web.Response:
    return web.Response(text=PAGE, content_type="text/html", headers={"Cache-Control": "no-store"})


async def _servicemap(request: web.Request) -> web.Response:
    body = servicemap.service_map(await request.app[WINDOW_KEY].flows())
    body["node_names"] = await request.app[SOURCE_KEY].node_names()
    return web.json_response(body)


async def _flows(request: web.Request) -> web.Response:
    edge = request.query.get("edge", "")
    if not edge:
        return _bad("/api/flows: the edge parameter is missing (an edge id from /api/servicemap)")
    text = request.query.get("limit", "50")
    try:
        limit = int(text)
    except ValueError:
        return _bad(f"/api/flows: limit must be an integer, not {text!r}")
    if not 1 <= limit <= MAX_EDGE_FLOWS:
        return _bad(f"/api/flows: limit must be between 1 and {MAX_EDGE_FLOWS}, not {limit}")
    flows = await request.app[WINDOW_KEY].flows()
    return web.json_response({"edge": edge, "flows": servicemap.edge_flows(flows, edge, limit)})


async def _dns(request: web.Request) -> web.Response:
    return web.json_response(servicemap.dns_panel(await request.app[WINDOW_KEY].flows()))


def build_app(source: FlowSource, *, window: int = FLOW_WINDOW, max_age_s: float = 0.5) -> web.Application:
    """The UI's application over ``source``; the last ``window`` flows make the map, fetched at
    most once per ``max_age_s``."""
    if window < 1:
        raise ValueError(f"build_app: window must be at least 1 flow, not {window}")
    app = web.Application()
    app[SOURCE_KEY] = source
    app[WINDOW_KEY] = FlowWindow(source, window, max_age_s)
    app.router.add_get("/", _page)
    app.router.add_get("/api/servicemap", _servicemap)
    app.router.add_get("/api/flows", _flows)
    app.router.add_get("/api/dns", _dns)
    return app


async def start_ui(source: FlowSource, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> web.AppRunner:
    """Start the UI and return its runner (``await runner.cleanup()`` stops it). Port 0 picks a
    free port: read it from ``runner.addresses``."""
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"UI host must be a loopback address (the UI has no authentication), not {host!r}")
    runner = web.AppRunner(build_app(source), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


async def serve_ui(source: FlowSource, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> None:
    """Serve the UI until cancelled."""
    runner = await start_ui(source, host, port)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
