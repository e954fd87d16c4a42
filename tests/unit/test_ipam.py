"""IPAM: node blocks, allocation order, reservation, exhaustion, persistence round trip."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from weft.agent.state import AgentState, EndpointRecord
from weft.ipam.pool import BlockAllocator, ClusterPool, IPAMError, PoolExhausted, default_pools, gateway_of


@pytest.mark.parametrize(
    ("cidr", "mask", "index", "block"),
    [
        ("10.244.0.0/16", 24, 1, "10.244.1.0/24"),
        ("10.244.0.0/16", 24, 255, "10.244.255.0/24"),
        ("fd12:3456:789a::/64", 80, 1, "fd12:3456:789a:0:1::/80"),
        ("fd12:3456:789a::/64", 80, 2, "fd12:3456:789a:0:2::/80"),
        ("10.0.0.0/8", 26, 3, "10.0.0.192/26"),
    ],
    ids=["v4-first", "v4-last", "v6-first", "v6-second", "v4-small-blocks"],
)
def test_node_blocks(cidr: str, mask: int, index: int, block: str) -> None:
    assert str(ClusterPool.parse(cidr, mask).node_block(index)) == block


def test_defaults_are_azure_overlay() -> None:
    pools = default_pools()
    assert (str(pools[4].cidr), pools[4].node_mask) == ("10.244.0.0/16", 24)
    assert (str(pools[6].cidr), pools[6].node_mask) == ("fd12:3456:789a::/64", 80)


@pytest.mark.parametrize(("cidr", "mask"), [("10.244.0.0/16", 15), ("10.244.0.0/16", 31), ("10.244.0.1/16", 24),
                                            ("nonsense", 24)])
def test_bad_pools_rejected(cidr: str, mask: int) -> None:
    with pytest.raises(IPAMError):
        ClusterPool.parse(cidr, mask)


def test_block_index_out_of_range() -> None:
    with pytest.raises(PoolExhausted, match="256 /24 blocks"):
        ClusterPool.parse("10.244.0.0/16", 24).node_block(256)


def test_v4_allocation_skips_reserved_and_exhausts_clearly() -> None:
    alloc = BlockAllocator(ipaddress.ip_network("10.1.0.0/29"))  # .0 net, .1 gw, .7 broadcast
    got = [alloc.allocate(f"c{i}") for i in range(5)]
    assert [str(a) for a in got] == ["10.1.0.2", "10.1.0.3", "10.1.0.4", "10.1.0.5", "10.1.0.6"]
    with pytest.raises(PoolExhausted, match=r"no free IPv4 address in node block 10\.1\.0\.0/29 \(5 of 5 in use\)"):
        alloc.allocate("c6")


def test_allocation_is_idempotent_per_owner_and_not_reused_at_once() -> None:
    alloc = BlockAllocator(ipaddress.ip_network("10.1.0.0/28"))
    a = alloc.allocate("x")
    assert alloc.allocate("x") == a
    alloc.release_owner("x")
    b = alloc.allocate("y")
    assert b != a, "a released address is not handed out again immediately"


def test_v6_reserves_router_and_gateway() -> None:
    block = ipaddress.ip_network("fd00::/126")
    alloc = BlockAllocator(block)
    assert gateway_of(block) == ipaddress.ip_address("fd00::1")
    assert [str(alloc.allocate(str(i))) for i in range(2)] == ["fd00::2", "fd00::3"]
    with pytest.raises(PoolExhausted):
        alloc.allocate("z")


def test_foreign_allocation_rejected() -> None:
    with pytest.raises(IPAMError, match="not in this node's block"):
        BlockAllocator(ipaddress.ip_network("10.1.0.0/24"), {ipaddress.ip_address("10.2.0.5"): "x"})
    with pytest.raises(IPAMError, match="reserved"):
        BlockAllocator(ipaddress.ip_network("10.1.0.0/24"), {ipaddress.ip_address("10.1.0.1"): "x"})


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 20)), max_size=200))
def test_allocator_invariants(ops: list[tuple[bool, int]]) -> None:
    block = ipaddress.ip_network("10.9.0.0/27")
    alloc = BlockAllocator(block)
    for is_alloc, n in ops:
        owner = f"o{n}"
        if is_alloc:
            try:
                alloc.allocate(owner)
            except PoolExhausted:
                assert alloc.used == alloc.capacity
        else:
            alloc.release_owner(owner)
        ips = alloc.allocations()
        assert len(ips) == alloc.used <= alloc.capacity
        assert all(ip in block and ip not in (block.network_address, block.broadcast_address, gateway_of(block))
                   for ip in ips)
        owners = list(ips.values())
        assert len(owners) == len(set(owners)), "one address per owner and family"


def test_state_round_trip_keeps_allocations() -> None:
    """Allocations live in the endpoint records that hold them and come back from there."""
    blocks = {4: ipaddress.ip_network("10.244.1.0/24"), 6: ipaddress.ip_network("fd12:3456:789a:0:1::/80")}
    state = AgentState.from_json({"version": 1}, blocks)
    a4 = state.ipam[4].allocate("c/eth0")
    a6 = state.ipam[6].allocate("c/eth0")
    state.endpoints["c/eth0"] = EndpointRecord("c", "eth0", "/run/netns/x", "weft", 1, "lxc0", [str(a4), str(a6)])
    again = AgentState.from_json(state.to_json(), blocks)
    assert again.ipam[4].allocations() == {a4: "c/eth0"}
    assert again.ipam[6].allocations() == {a6: "c/eth0"}
    assert again.ipam[4].allocate("d/eth0") != a4, "allocation goes on after the last one handed out"
    record = again.endpoints["c/eth0"]
    text = record.json_text()
    record.state = "ready"
    assert record.json_text() != text and '"state":"ready"' in record.json_text()
    changed = AgentState.from_json({"version": 1}, {4: ipaddress.ip_network("10.245.1.0/24")})
    assert changed.ipam[4].allocations() == {}
