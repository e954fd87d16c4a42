"""Shared test configuration."""

from __future__ import annotations

import sys
from pathlib import Path

# tests import helpers from their own folders
sys.path.insert(0, str(Path(__file__).parent))
