"""Fixtures shared by every test module."""

from __future__ import annotations

import pytest
from doubles import FakeClock
from hypothesis import settings

# Hypothesis fails an example that runs longer than 200 ms by default: a timing assertion, which a
# loaded machine breaks. Speed is measured by `make bench`, never asserted here.
settings.register_profile("workerpool", deadline=None)
settings.load_profile("workerpool")


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
