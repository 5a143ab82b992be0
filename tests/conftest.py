"""Fixtures shared by every test module."""

from __future__ import annotations

import pytest
from doubles import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["memory", "sqlite"])
def harness_store(request, tmp_path, monkeypatch):
    """Run the module's tests on each store: ``make_harness`` builds its pools on it.

    Use as ``pytestmark = pytest.mark.usefixtures("harness_store")``.
    """
    import http_fixtures

    directory = tmp_path if request.param == "sqlite" else None
    monkeypatch.setattr(http_fixtures, "HARNESS_STORE", http_fixtures.HarnessStore(directory))
    return request.param
