"""Fixtures shared by every test module."""

from __future__ import annotations

import signal

import pytest
from doubles import FakeClock
from hypothesis import settings

# Hypothesis fails an example that runs longer than 200 ms by default: a timing assertion, which a
# loaded machine breaks. Speed is measured by `make bench`, never asserted here.
settings.register_profile("workerpool", deadline=None)
settings.load_profile("workerpool")


def pytest_configure(config) -> None:
    # The servers the real-process tests start run in their own session, so that a signal to the
    # runner's group does not reach them; only the tests' finally blocks and the fixtures' teardown
    # stop them. A SIGTERM (a `timeout` that expires, a CI job cancelled) would end the runner
    # without either and leave them serving: take it as Ctrl-C, which unwinds and tears down.
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item) -> None:
    # Before the test's fixtures, a module's shared server included: only a test marked e2e may start one.
    import http_fixtures

    http_fixtures.RUNNING_E2E = item.get_closest_marker("e2e") is not None


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"stopped by signal {signum}")


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
