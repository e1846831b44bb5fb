"""Shared fixtures: the corpus location (optional) and small trained models."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shakespeare() -> str:
    """A slice of tinyshakespeare; the tests that use it skip where ../shared is absent."""
    path = SHARED_DATA / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.skip(f"{path} not present (only on the development machines)")
    return path.read_text()[:60_000]
