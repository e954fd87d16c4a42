"""``python -m weft.dnsproxy.main --config <node.json>``: the node's DNS proxy, in the node's netns.

Start-up: read the node configuration (only the keys the proxy needs), install the redirect's
routing, open the pinned maps, read the rules and the saved name cache, then either take the
listening sockets over from a running proxy (zero-outage restart) or open them, and serve.
SIGTERM/SIGINT: stop reading, finish the queries in flight, save, exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from weft.dnsproxy.config import DnsProxySettings
from weft.dnsproxy.routing import install_proxy_routing
from weft.dnsproxy.server import DnsProxy, ProxyPaths, open_listeners, resolve_socket_path, take_over

log = logging.getLogger("weft.dnsproxy")


class ProxyNodeConfig(BaseModel):
    """The keys of the agent's node.json the proxy reads (the rest is the agent's business)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    node_name: str = Field(min_length=1)
    state_dir: Path
    pin_dir: Path
    dns_proxy: DnsProxySettings = Field(default_factory=DnsProxySettings)

    @classmethod
    def load(cls, path: Path) -> ProxyNodeConfig:
        return cls.model_validate(json.loads(path.read_text()))


async def serve(config: ProxyNodeConfig) -> int:
    settings = config.dns_proxy
    paths = ProxyPaths(state_dir=config.state_dir, pin_dir=config.pin_dir,
                       socket_path=resolve_socket_path(settings, config.state_dir))
    proxy = DnsProxy(settings, paths, node_name=config.node_name)
    proxy.load_rules()
    proxy.load_state()
    if not proxy.open_maps():
        log.warning("%s; retrying every second, queries get SERVFAIL meanwhile", proxy.maps_error)
    taken = take_over(paths.socket_path, timeout=settings.upstream_timeout_s + 5)
    predecessor = None
    if taken is not None:
        listeners, predecessor = taken
        proxy.handed_over_from = 1
    else:
        try:
            listeners = open_listeners(settings.port)
        except OSError as exc:
            log.error("cannot open the DNS sockets on port %d: %s (another proxy that does not answer on %s?)",
                      settings.port, exc, paths.socket_path)
            return 1
    loop = asyncio.get_running_loop()

    def stop() -> None:
        proxy.stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    await proxy.run(listeners, predecessor)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="weft-dnsproxy", description="weft's per-node DNS proxy")
    parser.add_argument("--config", type=Path, required=True, help="the node's configuration (node.json)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    try:
        config = ProxyNodeConfig.load(args.config)
    except (OSError, ValueError, ValidationError) as exc:
        print(f"weft-dnsproxy: invalid config {args.config}: {exc}", file=sys.stderr)
        return 2
    if not config.dns_proxy.enabled:
        print(f"weft-dnsproxy: dns_proxy.enabled is false in {args.config}; not starting", file=sys.stderr)
        return 0
    try:
        for change in install_proxy_routing():
            log.info("installed %s", change)
    except OSError as exc:
        print(f"weft-dnsproxy: cannot install the redirect's routing: {exc}", file=sys.stderr)
        return 1
    return asyncio.run(serve(config))


if __name__ == "__main__":
    sys.exit(main())
