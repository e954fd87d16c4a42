"""Fixtures for privileged tests: root is required (they fail loudly without it), and one lab is
shared by the tests of a session where isolation allows (each test uses its own pods)."""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator

import pytest

from weft.lab.cluster import Lab


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "privileged" in str(item.fspath):
            item.add_marker(pytest.mark.privileged)


@pytest.fixture(scope="session", autouse=True)
def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("privileged tests need root (network namespaces, bpffs, tc); run them with `make test` as root")
    subprocess.run(["make", "-s", "bpf"], check=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))


def unique_lab_name(tag: str) -> str:
    return f"wt{tag}{secrets.token_hex(2)}"


def one_node_lab(tag: str, world: bool = False) -> Iterator[Lab]:
    """A one-node dual-stack lab; without the world and kube-dns unless asked (tests count
    endpoints, IPAM use and pods from zero)."""
    lab = Lab(unique_lab_name(tag))
    try:
        lab.up(nodes=1, ip_family="dual", world=world)
        yield lab
    finally:
        lab.down(quiet=True)


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    """A one-node dual-stack lab shared by the session's tests."""
    yield from one_node_lab("s")


@pytest.fixture
def fresh_lab() -> Iterator[Lab]:
    """A lab of its own, for tests that kill agents or otherwise disturb a node."""
    yield from one_node_lab("f")
