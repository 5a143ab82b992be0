"""The dashboard in a real headless Chromium against the app on a real HTTP server."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import threading
from collections.abc import Iterator

import pytest
from doubles import FakeClock
from http_fixtures import TEST_CONFIG, WAIT_S, Client, FinalStates
from playwright.sync_api import expect
from werkzeug.exceptions import NotFound
from werkzeug.middleware.dispatcher import DispatcherMiddleware

from app import create_app
from bench.browser import chromium, served
from config import Config
from service.live import LiveFigures
from service.metrics import Metrics
from workerpool import PermanentFailure, PoolStats, StoreUnavailable, Task, WorkerPool
from workerpool.stores.base import InvalidPosition

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TOKEN = "dashboard-t0ken-0123456789"
WAIT_MS = WAIT_S * 1000


class Handler:
    """Payload "block" runs until ``release`` (or the task's cancel event), "fail" fails for good, others succeed."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.blocked = threading.Event()

    def __call__(self, task: Task, cancel: threading.Event) -> None:
        if task.payload == "block":
            self.blocked.set()
            while not (self.release.wait(0.05) or cancel.is_set()):
                pass
            if cancel.is_set():
                raise RuntimeError("cancelled")
        elif task.payload == "fail":
            raise PermanentFailure("refused by the test")


@dataclasses.dataclass
class Instance:
    url: str
    client: Client
    pool: WorkerPool
    handler: Handler
    final: FinalStates
    token: str = ""

    def submit(self, task_id: str, payload: str = "") -> dict:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        body = json.dumps({"id": task_id, "payload": payload, "max_retries": 0}).encode()
        status, _, text = self.client.request("POST", "/enqueue", body, headers=headers)
        assert status == 202, text
        return json.loads(text)

    def get(self, path: str) -> tuple[int, dict]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        status, _, text = self.client.request("GET", path, headers=headers)
        return status, json.loads(text)


@pytest.fixture(scope="module")
def browser():
    with chromium() as context:
        yield context


class StuckPool(WorkerPool):
    """A pool that reports two worker threads stuck in timed-out attempts, one more than get a replacement."""

    def stats(self) -> PoolStats:
        return dataclasses.replace(super().stats(), stuck_threads=2, stuck_threads_limit=1)


def _instance(
    config: Config, pool_class: type[WorkerPool] = WorkerPool, live: LiveFigures | None = None, queue_size: int = 50
) -> Iterator[Instance]:
    handler = Handler()
    metrics, final = Metrics(), FinalStates()
    live = live if live is not None else LiveFigures()
    pool = pool_class(handler, workers=1, queue_size=queue_size, observers=[metrics, live, final])
    app = create_app(config, pool=pool, metrics=metrics, live=live)
    with served(app) as server:
        port = server.server.server_port
        yield Instance(server.url, Client(port), pool, handler, final, config.api_token)
        handler.release.set()
        pool.shutdown(WAIT_S)


@pytest.fixture
def instance() -> Iterator[Instance]:
    yield from _instance(TEST_CONFIG)


@pytest.fixture
def crowded() -> Iterator[Instance]:
    yield from _instance(TEST_CONFIG, queue_size=2000)


@pytest.fixture
def guarded() -> Iterator[Instance]:
    yield from _instance(dataclasses.replace(TEST_CONFIG, api_token=TOKEN))


@pytest.fixture
def stuck() -> Iterator[Instance]:
    yield from _instance(TEST_CONFIG, StuckPool)


@pytest.fixture
def page(browser):
    page = browser.new_page()
    page.errors = []  # console errors and uncaught exceptions
    page.on("console", lambda message: message.type == "error" and page.errors.append(message.text))
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    yield page
    page.close()


def _open(page, instance: Instance) -> None:
    page.goto(instance.url + "/dashboard")
    expect(page.locator("#connection")).to_have_text(re.compile("^Live"), timeout=WAIT_MS)


def _figure(page, name: str) -> int:
    return int(page.text_content(f"#fig-{name}"))


def test_the_page_loads_without_errors_and_shows_the_figures_of_the_api(page, instance):
    for n in range(3):
        instance.submit(f"done-{n}")
    instance.submit("failed-0", "fail")
    instance.final.wait("done-0", "done-1", "done-2", "failed-0")
    instance.submit("running-0", "block")
    assert instance.handler.blocked.wait(WAIT_S)
    instance.submit("queued-0")
    instance.submit("queued-1")

    _open(page, instance)
    # Nothing moves until the blocked task is released, so the page and the API must agree exactly.
    expect(page.locator("#fig-queued")).to_have_text("2", timeout=WAIT_MS)
    status, health = instance.get("/healthz")
    assert status == 200
    for state, expected in {"queued": 2, "running": 1, "done": 3, "failed": 1}.items():
        assert _figure(page, state) == health["tasks"][state] == expected, state
    assert _figure(page, "queue-depth") == health["queue_depth"] == 2
    assert _figure(page, "queue-waiting") == health["queue_waiting"] == 2
    assert _figure(page, "queue-capacity") == health["queue_capacity"] == 50
    assert _figure(page, "busy") == 1
    assert _figure(page, "workers") == health["workers"] == 1
    assert _figure(page, "retries") == health["retries_pending"] == 0
    assert page.text_content("#fig-admission") == "accepting"
    assert page.text_content("#fig-store") == "memory"
    assert page.text_content("#fig-pid") == str(os.getpid())  # whose figures these are, under gunicorn -w N
    # The table lists what GET /tasks lists, newest first.
    _, listing = instance.get("/tasks")
    expect(page.locator("#task-rows tr")).to_have_count(7, timeout=WAIT_MS)
    assert page.eval_on_selector_all("#task-rows tr", "rows => rows.map(r => r.dataset.id)") == [
        task["id"] for task in listing["tasks"]
    ]
    # Rows are updated in place: a focused control keeps its focus across refreshes. By keyboard, a task's
    # detail shows its error.
    page.focus("#task-rows tr[data-id='failed-0'] button.task-id")
    with page.expect_response(lambda response: "/tasks?limit=" in response.url):
        pass
    assert page.evaluate("document.activeElement.closest('tr').dataset.id") == "failed-0"
    page.keyboard.press("Enter")
    expect(page.locator("#detail-fields")).to_contain_text("refused by the test", timeout=WAIT_MS)
    # The filter offers the states the service reports, and lists what GET /tasks?state= lists.
    assert page.eval_on_selector_all("#state-filter option", "options => options.map(o => o.value)") == [
        "",
        *health["tasks"],
    ]
    # On a phone-sized screen nothing makes the page itself scroll sideways.
    page.set_viewport_size({"width": 360, "height": 740})
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
    page.select_option("#state-filter", "done")
    expect(page.locator("#task-rows tr")).to_have_count(3, timeout=WAIT_MS)
    _, done = instance.get("/tasks?state=done")
    assert page.eval_on_selector_all("#task-rows tr", "rows => rows.map(r => r.dataset.id)") == [
        task["id"] for task in done["tasks"]
    ]
    assert page.errors == []


def test_the_seconds_before_the_process_started_are_shaded_not_drawn_as_zero(page):
    # A reload or a new worker process starts its figures afresh: its charts drew five minutes of zeros, and
    # "Last minute: 0.0 accepted/s" for work done seconds before.
    clock = FakeClock()
    live = LiveFigures(clock=clock.time)
    clock.advance(30)
    with contextlib.contextmanager(_instance)(TEST_CONFIG, live=live) as instance:
        _open(page, instance)
        expect(page.locator("#rates-summary")).to_have_text(
            re.compile(r"^Since this process started, 30 s ago: 0\.0 accepted/s, "), timeout=WAIT_MS
        )
        for chart in ("#chart-rates", "#chart-latency"):
            expect(page.locator(f"{chart} rect.uncounted")).to_have_count(1)
            expect(page.locator(chart)).to_contain_text("not counted: this process started")
        # The rate lines begin where counting began (270 of the window's 300 seconds were not counted).
        starts = page.eval_on_selector_all("#chart-rates polyline", "lines => lines.map(l => l.points.getItem(0).x)")
        shaded = page.eval_on_selector("#chart-rates rect.uncounted", "r => r.x.baseVal.value + r.width.baseVal.value")
        assert len(starts) == 4 and all(abs(x - shaded) < 3 for x in starts), (starts, shaded)
        clock.advance(270)  # the whole window counted
        expect(page.locator("#rates-summary")).to_have_text(re.compile("^Last minute: "), timeout=WAIT_MS)
        expect(page.locator("#chart-rates rect.uncounted")).to_have_count(0)
    assert page.errors == []


def test_under_a_root_path_the_page_reads_and_submits_through_it(page):
    # The page's files and requests were absolute (/dashboard/dashboard.js, /tasks...): under SCRIPT_NAME they
    # missed the app, while the API itself answered under the prefix.
    handler, live, final = Handler(), LiveFigures(), FinalStates()
    metrics = Metrics()
    pool = WorkerPool(handler, workers=1, queue_size=50, observers=[metrics, live, final])
    app = create_app(TEST_CONFIG, pool=pool, metrics=metrics, live=live)
    with served(DispatcherMiddleware(NotFound(), {"/wp": app})) as server:
        try:
            page.goto(server.url + "/wp/dashboard")
            expect(page.locator("#connection")).to_have_text(re.compile("^Live"), timeout=WAIT_MS)
            page.fill("#submit-id", "under-a-prefix")
            page.click("#submit-form button[type=submit]")
            expect(page.locator("#task-message")).to_contain_text("under-a-prefix accepted", timeout=WAIT_MS)
            expect(page.locator("#task-rows tr[data-id='under-a-prefix']")).to_be_visible(timeout=WAIT_MS)
            assert page.errors == []
        finally:
            handler.release.set()
            pool.shutdown(WAIT_S)


def test_a_queue_full_of_delayed_tasks_shows_as_full(page, instance):
    # Its depth (tasks due) is 0: the page showed "0 of 50" and "accepting" while every submission got 503.
    for n in range(50):
        instance.pool.submit(f"later-{n}", "", delay=3600.0)
    _open(page, instance)
    expect(page.locator("#fig-admission")).to_have_text("queue full", timeout=WAIT_MS)
    figures = [_figure(page, name) for name in ("queue-waiting", "queue-capacity", "queue-depth")]
    assert figures == [50, 50, 0]
    assert page.eval_on_selector("#queue-meter", "meter => meter.value") == 1
    assert page.errors == []


def test_an_unhealthy_service_shows_as_accepting_with_its_stuck_threads_not_as_draining(page, stuck):
    # Any status but "ok" showed as "draining, new tasks are refused", while submissions got 202.
    status, health = stuck.get("/healthz")
    assert (status, health["status"]) == (503, "unhealthy")
    _open(page, stuck)
    expect(page.locator("#connection")).to_have_text(
        "Live: unhealthy, 2 worker threads stuck in timed-out attempts (1 get a replacement): fewer threads take tasks",
        timeout=WAIT_MS,
    )
    assert page.text_content("#fig-admission") == "accepting"
    stuck.submit("still-taken")
    assert page.errors == []


# Counts the page's listings of tasks (each poll asks for one) and, once the row of ``late-arrival`` is shown, how
# many had begun: in the page, whose script runs one step at a time, so the count is exact whatever the load.
COUNT_LISTINGS = """
window.listingsBegun = 0;
const pageFetch = window.fetch;
window.fetch = (resource, init) => {
  if (String(resource).startsWith("tasks?")) window.listingsBegun += 1;
  return pageFetch(resource, init);
};
"""
WATCH_ROW = """() => {
  window.shownAfterListings = null;
  new MutationObserver((_, observer) => {
    if (document.querySelector("#task-rows tr[data-id='late-arrival']")) {
      window.shownAfterListings = window.listingsBegun;
      observer.disconnect();
    }
  }).observe(document.getElementById("task-rows"), { childList: true, subtree: true });
}"""


def test_a_task_submitted_through_the_api_appears_at_the_page_s_next_poll(page, instance):
    # The page polls once a second: a task shows at the latest with the first listing begun after it was
    # submitted, hence within two seconds. Counted in polls, not timed: a loaded machine stretches seconds.
    page.add_init_script(COUNT_LISTINGS)
    _open(page, instance)
    page.evaluate(WATCH_ROW)
    instance.submit("late-arrival")
    begun = page.evaluate("window.listingsBegun")  # those begun before the task was submitted, and maybe one more
    page.wait_for_selector("#task-rows tr[data-id='late-arrival']", timeout=WAIT_MS)
    assert page.evaluate("window.shownAfterListings") <= begun + 1
    assert page.errors == []


def test_the_table_lists_tasks_without_their_results_and_the_detail_shows_the_result(page, instance):
    listings = []
    page.on("request", lambda request: "/tasks?" in request.url and listings.append(request.url))
    instance.submit("with-result", "hello")
    instance.final.wait("with-result")
    _open(page, instance)
    page.wait_for_selector("#task-rows tr[data-id='with-result']", timeout=WAIT_MS)
    assert listings and all("results=false" in url for url in listings), listings
    page.click("#task-rows tr[data-id='with-result'] .task-id")
    expect(page.locator("#detail-fields")).to_contain_text("result", timeout=WAIT_MS)
    assert page.errors == []


def test_a_task_submitted_from_the_page_is_accepted(page, instance):
    _open(page, instance)
    page.fill("#submit-id", "from-the-page")
    page.fill("#submit-payload", "hello")
    page.click("#submit-form button[type=submit]")
    expect(page.locator("#task-message")).to_contain_text("from-the-page accepted", timeout=WAIT_MS)
    instance.final.wait("from-the-page")
    status, task = instance.get("/tasks/from-the-page")
    assert (status, task["state"]) == (200, "done")
    assert page.errors == []


def test_cancel_from_the_page_cancels_queued_and_running_tasks(page, instance):
    instance.submit("running-0", "block")
    assert instance.handler.blocked.wait(WAIT_S)
    instance.submit("victim")
    _open(page, instance)
    page.click("button[aria-label='Cancel task victim']")
    expect(page.locator("#task-rows tr[data-id='victim'] td.state-cancelled")).to_be_visible(timeout=WAIT_MS)
    assert instance.get("/tasks/victim")[1]["state"] == "cancelled"
    assert "victim cancelled" in page.text_content("#task-message")
    # A running task: cancellation requested (202), then cancelled when its attempt gives up.
    page.click("button[aria-label='Cancel task running-0']")
    expect(page.locator("#task-message")).to_contain_text("cancellation requested", timeout=WAIT_MS)
    expect(page.locator("#task-rows tr[data-id='running-0'] td.state-cancelled")).to_be_visible(timeout=WAIT_MS)
    assert page.errors == []


def test_with_a_token_the_page_asks_for_it_and_shows_tasks_only_with_it(page, guarded):
    guarded.submit("secret-task")
    _open(page, guarded)
    expect(page.locator("#token-dialog")).to_be_visible(timeout=WAIT_MS)
    assert "secret-task" not in page.content()

    page.fill("#token-input", "wrong-token-0123456789")
    page.click("#token-form button[type=submit]")
    expect(page.locator("#token-error")).to_contain_text("refused", timeout=WAIT_MS)
    with page.expect_response(lambda response: "/dashboard/live" in response.url):
        pass  # the reason stays through the next poll
    assert "refused" in page.text_content("#token-error")
    assert page.is_visible("#token-dialog")
    assert "secret-task" not in page.content()

    page.fill("#token-input", TOKEN)
    page.click("#token-form button[type=submit]")
    expect(page.locator("#task-rows tr[data-id='secret-task']")).to_be_visible(timeout=WAIT_MS)
    assert not page.is_visible("#token-dialog")
    # The wrong token's 401 is the only error the browser logged.
    assert all("401" in error for error in page.errors), page.errors


def test_a_task_store_outage_is_told_apart_from_a_lost_connection(page, instance, monkeypatch):
    # The page said "Connection lost" while the service answered, 503 store-unavailable, that its store was down.
    _open(page, instance)

    def store_down(pool):
        raise StoreUnavailable("redis: Error 111 connecting to 127.0.0.1:6390. Connection refused.")

    monkeypatch.setattr(WorkerPool, "stats", store_down)  # its instances have no __dict__
    expect(page.locator("#connection")).to_have_text("Task store unavailable: retrying every second", timeout=WAIT_MS)
    monkeypatch.undo()
    expect(page.locator("#connection")).to_have_text(re.compile("^Live"), timeout=WAIT_MS)


def test_a_page_of_another_origin_cannot_submit_tasks(browser, instance):
    # A simple cross-origin POST (no-cors, text/plain): the browser sends it without asking the service first.
    script = (
        f'fetch("{instance.url}/enqueue", {{method: "POST", mode: "no-cors", '
        'body: JSON.stringify({id: "from-elsewhere", payload: "x"})})'
        '.then(() => { document.title = "sent"; }, () => { document.title = "failed"; });'
    )

    def elsewhere(environ, start_response):  # another origin: another port of 127.0.0.1
        start_response("200 OK", [("Content-Type", "text/html")])
        return [f"<!doctype html><title>page</title><script>{script}</script>".encode()]

    with served(elsewhere) as other:
        page = browser.new_page()
        try:
            page.goto(other.url)
            expect(page).to_have_title("sent", timeout=WAIT_MS)
        finally:
            page.close()
    assert instance.get("/tasks/from-elsewhere")[0] == 404
    assert instance.submit("from-here")["state"] in ("queued", "running", "done")  # a client that is no browser


PAGE_SIZE = 25  # the page's
MARKUP_ID = '<img src="x" onerror="window.injected = true">'


def _shown_ids(page) -> list[str]:
    return page.eval_on_selector_all("#task-rows tr", "rows => rows.map(r => r.dataset.id)")


def _api_pages(instance: Instance, state: str = "") -> list[list[str]]:
    """The ids of every page of GET /tasks, walked by its cursors as the page walks them."""
    pages, cursor = [], None
    while True:
        query = f"limit={PAGE_SIZE}&results=false" + (f"&state={state}" if state else "")
        status, body = instance.get("/tasks?" + query + (f"&cursor={cursor}" if cursor else ""))
        assert status == 200, body
        pages.append([task["id"] for task in body["tasks"]])
        if (cursor := body["next"]) is None:
            return pages


def _go(page, button: str, number: int) -> None:
    # Called once the page before shows its label (or at the start, once Older is enabled): its `next` is known.
    page.click(f"#page-{button}")
    expect(page.locator("#page-label")).to_have_text(f"Page {number}", timeout=WAIT_MS)


def _next_poll_shown(page) -> None:
    """Wait until a whole poll of the page has begun and ended after this call."""
    # A poll asks for the live figures, then lists the tasks, then schedules the next: the live figures after
    # the next ones are those of a poll begun after the listing of the one before was shown.
    for _ in range(2):
        with page.expect_response(lambda response: "/dashboard/live" in response.url, timeout=WAIT_MS):
            pass


def test_the_pages_reach_every_task_past_the_newest_thousand_and_an_older_page_stays_put(page, crowded):
    # The pages read GET /tasks?limit=n from the newest end: they stopped at the newest 1,000 tasks.
    for n in range(30):
        crowded.pool.submit(f"done-{n:02d}", "")
    crowded.final.wait(*(f"done-{n:02d}" for n in range(30)))
    crowded.pool.submit(MARKUP_ID, "", delay=3600.0)  # ids are client text: the deepest page shows it as text
    for n in range(1040):
        crowded.pool.submit(f"task-{n:04d}", "", delay=3600.0)  # queued, delayed: nothing moves
    expected = _api_pages(crowded)
    assert len(expected) == 43 and sum(map(len, expected)) == 1071

    _open(page, crowded)
    expect(page.locator("#page-label")).to_have_text("Page 1", timeout=WAIT_MS)
    assert page.is_disabled("#page-newer") and page.is_disabled("#page-newest")
    expect(page.locator("#task-rows tr")).to_have_count(PAGE_SIZE, timeout=WAIT_MS)
    assert _shown_ids(page) == expected[0]
    for number in range(2, 6):
        _go(page, "older", number)
        assert _shown_ids(page) == expected[number - 1], number
    # By keyboard, *Older* keeps its focus from page to page.
    page.focus("#page-older")
    for number in (6, 7):
        page.keyboard.press("Enter")
        expect(page.locator("#page-label")).to_have_text(f"Page {number}", timeout=WAIT_MS)
        expect(page.locator("#page-older")).to_be_enabled()
        assert page.evaluate("document.activeElement.id") == "page-older"
        assert _shown_ids(page) == expected[number - 1], number

    # Tasks accepted while page 7 is read list ahead of it: it stays as it was, as does page 6 when gone back to,
    # and the first page shows them.
    for n in range(PAGE_SIZE + 5):
        crowded.pool.submit(f"newer-{n:02d}", "", delay=3600.0)
    expect(page.locator("#fig-queued")).to_have_text("1071", timeout=WAIT_MS)
    _next_poll_shown(page)
    assert _shown_ids(page) == expected[6]
    _go(page, "newer", 6)
    assert _shown_ids(page) == expected[5]
    _go(page, "newest", 1)
    expect(page.locator("#task-rows tr").first).to_have_attribute("data-id", "newer-29", timeout=WAIT_MS)

    # Every page of the walk from there, past the thousandth task, to the oldest.
    expected = _api_pages(crowded)
    assert any(MARKUP_ID in ids for ids in expected[40:])
    assert len(expected) == 45 and sum(map(len, expected)) == 1101
    for number in range(2, 46):
        _go(page, "older", number)
        assert _shown_ids(page) == expected[number - 1], number
        if MARKUP_ID in expected[number - 1]:  # text in its cell, which ran nothing
            assert MARKUP_ID in page.eval_on_selector_all("#task-rows .task-id", "ids => ids.map(b => b.textContent)")
            assert page.locator("#task-rows img").count() == 0
            assert page.evaluate("window.injected") is None
    expect(page.locator("#page-older")).to_be_disabled()
    assert _shown_ids(page)[-1] == "done-00"

    # Each poll of that deep page is one request from its cursor, never the pages before it.
    listings = []
    page.on("request", lambda request: "/tasks?" in request.url and listings.append(request.url))
    _next_poll_shown(page)
    _next_poll_shown(page)
    assert len(listings) >= 2 and len(set(listings)) == 1, listings
    assert f"limit={PAGE_SIZE}&" in listings[0] and "&cursor=" in listings[0]

    # A state's pages walk by its own cursors.
    page.select_option("#state-filter", "done")
    expect(page.locator("#page-label")).to_have_text("Page 1", timeout=WAIT_MS)
    expect(page.locator("#task-rows tr")).to_have_count(PAGE_SIZE, timeout=WAIT_MS)
    done = _api_pages(crowded, "done")
    assert [len(ids) for ids in done] == [25, 5]
    assert _shown_ids(page) == done[0]
    _go(page, "older", 2)
    assert _shown_ids(page) == done[1]
    expect(page.locator("#page-older")).to_be_disabled()
    assert page.errors == []


def test_a_cursor_the_service_no_longer_reads_goes_back_to_the_first_page_with_a_notice(page, crowded, monkeypatch):
    for n in range(PAGE_SIZE * 3):
        crowded.pool.submit(f"task-{n:02d}", "", delay=3600.0)
    _open(page, crowded)
    _go(page, "older", 2)
    _go(page, "older", 3)
    page_of = WorkerPool.page

    def forgotten(pool, state=None, limit=100, *, results=True, after=None):
        if after is not None:  # a store of another kind, or a service that no longer reads the cursors it made
            raise InvalidPosition(f"not a position of this store's listings: {after!r}")
        return page_of(pool, state, limit, results=results, after=after)

    monkeypatch.setattr(WorkerPool, "page", forgotten)
    expect(page.locator("#task-message")).to_have_text(
        "Back to the newest tasks: page 3 can no longer be listed (cursor is not a position in this service's task"
        " store: list from the first page again).",
        timeout=WAIT_MS,
    )
    expect(page.locator("#page-label")).to_have_text("Page 1", timeout=WAIT_MS)
    expect(page.locator("#task-rows tr").first).to_have_attribute("data-id", "task-74", timeout=WAIT_MS)
    assert page.is_disabled("#page-newer")
    monkeypatch.undo()
    _go(page, "older", 2)  # and the walk goes on from there
    assert _shown_ids(page) == _api_pages(crowded)[1]
    # The refused listing is the only error the browser logged.
    assert page.errors and all("400" in error for error in page.errors), page.errors


def test_a_pager_button_that_the_keyboard_disables_hands_its_focus_to_the_other_way(page, instance):
    # Older into the last page, and Newer back into the first, disabled the button under the keyboard's focus,
    # which fell to the page's body: the next Tab started again from the top of the page.
    for n in range(PAGE_SIZE + 5):
        instance.pool.submit(f"task-{n:02d}", "", delay=3600.0)
    _open(page, instance)
    expect(page.locator("#page-older")).to_be_enabled(timeout=WAIT_MS)
    page.focus("#page-older")
    for button, number, other in (("older", 2, "newer"), ("newer", 1, "older")):
        page.keyboard.press("Enter")
        expect(page.locator("#page-label")).to_have_text(f"Page {number}", timeout=WAIT_MS)
        expect(page.locator(f"#page-{button}")).to_be_disabled()
        assert page.evaluate("document.activeElement.id") == f"page-{other}", button
    page.focus("#page-older")
    page.keyboard.press("Enter")
    expect(page.locator("#page-label")).to_have_text("Page 2", timeout=WAIT_MS)
    page.focus("#page-newest")
    page.keyboard.press("Enter")
    expect(page.locator("#page-label")).to_have_text("Page 1", timeout=WAIT_MS)
    assert page.evaluate("document.activeElement.id") == "page-older"
    assert page.errors == []
