"""Fixtures shared by every test module."""

from __future__ import annotations

import pytest
from doubles import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
