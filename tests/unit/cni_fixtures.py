"""Fixtures shared by the CNI plugin tests (test_cni_plugin.py, test_cni_native.py), imported by
name: a conftest.py here would shadow tests/privileged/conftest.py, which tests import from."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def sockdir() -> Iterator[Path]:
    # unix socket paths are limited to 107 bytes: keep them short, not under pytest's tmp_path
    path = Path(tempfile.mkdtemp(prefix="wcni-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def netns(tmp_path: Path) -> str:
    # stands in for /run/netns/<name>: the plugin only checks that it exists
    path = tmp_path / "netns-pod1"
    path.touch()
    return str(path)
