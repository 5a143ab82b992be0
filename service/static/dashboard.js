// The workerpool dashboard: polls the live figures and the task list once a second; no build step.
// Task ids and errors come from clients, so they are only ever set as text, never as HTML.
"use strict";

const POLL_MS = 1000;
const PAGE_SIZE = 25;
const TOKEN_KEY = "workerpool-token"; // sessionStorage: forgotten when the tab closes
const UNFINISHED = new Set(["queued", "running"]);
const SVG = "http://www.w3.org/2000/svg";

const $ = (id) => document.getElementById(id);

const view = {
  token: sessionStorage.getItem(TOKEN_KEY) || "",
  tokenRequired: false,
  tokenDeclined: false,
  listing: firstPage(""),
  asked: 0, // listings asked for, numbered: an answer older than the one shown is not shown
  shown: 0,
  detailId: null,
  rows: new Map(), // task id -> <tr>, reused so focus and selection survive a refresh
  connected: null,
  paused: false,
};

// The table's place: the state filter, the cursor each page walked so far starts at (none for the first:
// the newest tasks, live), the page shown, and its `next` as last listed (where "Older" goes). A cursor is a
// place in the store's own order, so tasks accepted meanwhile list ahead of it: an older page stays as it
// was while it is read, and each poll reads that one page, however deep, with one request.
function firstPage(state) {
  return { state, cursors: [null], page: 0, next: null };
}

// -- HTTP ----------------------------------------------------------------------------------

function taskPath(id) {
  return "tasks/" + id.split("/").map(encodeURIComponent).join("/");
}

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (view.token) headers.Authorization = "Bearer " + view.token;
  const init = { method, headers, cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const type = response.headers.get("Content-Type") || "";
  const data = type.includes("json") ? await response.json() : null;
  if (response.status === 401) {
    askForToken(view.token ? "The token was refused: enter it again." : "This needs the API token.");
    view.token = "";
    sessionStorage.removeItem(TOKEN_KEY);
  }
  return { status: response.status, data };
}

function describeProblem(result) {
  const problem = result.data || {};
  const fields = (problem.errors || []).map((e) => `${e.field} ${e.message}`);
  const text = problem.detail || problem.title || `HTTP ${result.status}`;
  return fields.length ? `${text}: ${fields.join("; ")}` : text;
}

// -- live figures --------------------------------------------------------------------------

function setText(id, value) {
  const element = $(id);
  const text = String(value);
  if (element.textContent !== text) element.textContent = text;
}

function renderLive(live) {
  for (const state of ["queued", "running", "done", "failed", "cancelled"]) {
    setText("fig-" + state, live.tasks[state] ?? "–"); // "–": a state this service does not have
  }
  offerStates(Object.keys(live.tasks));
  // The places taken, delayed tasks included: a queue full of tasks not yet due refuses submissions too.
  setText("fig-queue-waiting", live.queue_waiting);
  setText("fig-queue-depth", live.queue_depth);
  setText("fig-queue-capacity", live.queue_capacity);
  $("queue-meter").value = live.queue_capacity ? live.queue_waiting / live.queue_capacity : 0;
  setText("fig-retries", live.retries_pending);
  setText("fig-busy", live.busy_workers);
  setText("fig-workers", live.workers);
  const full = live.queue_waiting >= live.queue_capacity;
  // "unhealthy" (more stuck threads than get a replacement) still accepts tasks: only draining refuses them all.
  setText("fig-admission", live.status === "draining" ? "draining" : full ? "queue full" : "accepting");
  setText("fig-store", live.store);
  setText("fig-pid", live.pid);
  setText("window-minutes", Math.round(live.series.seconds / 60));
  renderSummary(live.series);
  const s = live.series;
  // The seconds before this process started were not counted: no line there, rather than one at zero.
  const uncounted = s.seconds - countedSeconds(s);
  const counted = (points) => points.map((v, i) => (i < uncounted ? null : v));
  const since = { uncounted, started: new Date(s.since * 1000).toLocaleTimeString() };
  drawChart($("chart-rates"), [
    { name: "accepted", points: counted(s.accepted) },
    { name: "done", points: counted(s.done) },
    { name: "failed", points: counted(s.failed) },
    { name: "cancelled", points: counted(s.cancelled) },
  ], { seconds: s.seconds, unit: "/s", ...since });
  drawChart($("chart-latency"), [
    { name: "p50", points: s.latency.p50 },
    { name: "p90", points: s.latency.p90 },
    { name: "p99", points: s.latency.p99 },
  ], { seconds: s.seconds, unit: " s", ...since });
}

function countedSeconds(series) {
  // The window's last seconds, from `since` (when this process began counting: a reload or a new worker begins again).
  return Math.max(0, Math.min(series.seconds, series.start + series.seconds - (series.since ?? series.start)));
}

function offerStates(states) {
  // The filter offers the states the service reports, so it never asks for one it would refuse.
  const select = $("state-filter");
  const offered = [...select.options].slice(1).map((option) => option.value);
  if (offered.join() === states.join()) return;
  const options = states.map((state) => new Option(state, state, false, state === select.value));
  select.replaceChildren(new Option("all", ""), ...options);
}

function renderSummary(series) {
  const span = Math.min(60, countedSeconds(series));
  if (span === 0) {
    setText("rates-summary", "This process has just started: no figures yet.");
    return;
  }
  const mean = (points) => points.slice(-span).reduce((a, b) => a + b, 0) / span;
  const rate = (name) => `${mean(series[name]).toFixed(1)} ${name}/s`;
  const recent = series.recent_latency;
  const latency = recent.p50 === null
    ? "no attempts finished"
    : `attempts: median ${seconds(recent.p50)}, 99th percentile ${seconds(recent.p99)}`;
  const over = span < 60 ? `Since this process started, ${span} s ago` : "Last minute";
  setText("rates-summary", `${over}: ${["accepted", "done", "failed", "cancelled"].map(rate).join(", ")}; ${latency}.`);
}

function seconds(value) {
  return value < 1 ? `${Math.round(value * 1000)} ms` : `${value.toPrecision(3)} s`;
}

function niceMax(value) {
  if (value <= 0) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 5, 10]) if (value <= step * power) return step * power;
  return 10 * power;
}

function svg(name, attributes, text) {
  const element = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
  if (text !== undefined) element.textContent = text;
  return element;
}

function drawChart(chart, lines, { seconds: span, unit, uncounted = 0, started = "" }) {
  const [width, height, left, right, top, bottom] = [600, 200, 48, 8, 10, 24];
  const values = lines.flatMap((line) => line.points).filter((v) => v !== null);
  const max = niceMax(Math.max(0, ...values));
  const x = (i, n) => left + (n <= 1 ? 0 : (i / (n - 1)) * (width - left - right));
  const y = (v) => top + (1 - v / max) * (height - top - bottom);
  const parts = [];
  if (uncounted > 0) {
    // Before this process started: shaded and said, not drawn as zero.
    const end = left + (uncounted / span) * (width - left - right);
    parts.push(svg("rect", { class: "uncounted", x: left, y: top, width: end - left, height: height - top - bottom }));
    if (end - left > 150) {
      parts.push(svg("text", { class: "axis", x: (left + end) / 2, y: top + 16, "text-anchor": "middle" },
        `not counted: this process started ${started}`));
    }
  }
  for (const fraction of [0, 0.5, 1]) {
    const value = max * fraction;
    parts.push(svg("line", { class: "grid", x1: left, x2: width - right, y1: y(value), y2: y(value) }));
    parts.push(svg("text", { class: "axis", x: left - 6, y: y(value) + 4, "text-anchor": "end" },
      `${+value.toPrecision(3)}${unit}`));
  }
  const minutes = Math.round(span / 60);
  parts.push(svg("text", { class: "axis", x: left, y: height - 6 }, `−${minutes} min`));
  parts.push(svg("text", { class: "axis", x: width - right, y: height - 6, "text-anchor": "end" }, "now"));
  for (const line of lines) {
    // A gap (no attempt in a step) breaks the line rather than drawing it through zero.
    let segment = [];
    const flush = () => {
      if (segment.length) parts.push(svg("polyline", { class: "line line-" + line.name, points: segment.join(" ") }));
      segment = [];
    };
    line.points.forEach((v, i) => {
      if (v === null) flush();
      else segment.push(`${x(i, line.points.length).toFixed(1)},${y(v).toFixed(1)}`);
    });
    flush();
  }
  chart.replaceChildren(...parts);
}

// -- tasks ---------------------------------------------------------------------------------

function localTime(iso) {
  return iso ? new Date(iso).toLocaleTimeString() : "—";
}

function cell(row, index) {
  while (row.cells.length <= index) row.insertCell();
  return row.cells[index];
}

function renderRow(row, task) {
  const idButton = row.querySelector(".task-id") || cell(row, 0).appendChild(document.createElement("button"));
  idButton.type = "button";
  idButton.className = "task-id link";
  if (idButton.textContent !== task.id) idButton.textContent = task.id;
  const state = cell(row, 1);
  state.className = "state state-" + task.state;
  if (state.textContent !== task.state) state.textContent = task.state;
  const attempts = `${task.attempts} of ${task.max_retries + 1}`;
  if (cell(row, 2).textContent !== attempts) cell(row, 2).textContent = attempts;
  const created = localTime(task.created_at);
  if (cell(row, 3).textContent !== created) cell(row, 3).textContent = created;
  const error = cell(row, 4);
  const errorText = task.last_error || "";
  if (error.textContent !== errorText) {
    error.textContent = errorText;
    error.title = errorText;
    error.className = "error-text";
  }
  const actions = cell(row, 5);
  const cancellable = UNFINISHED.has(task.state) && !task.cancel_requested;
  let cancel = actions.querySelector("button");
  if (cancellable && !cancel) {
    cancel = actions.appendChild(document.createElement("button"));
    cancel.type = "button";
    cancel.className = "cancel";
    cancel.textContent = "Cancel";
    cancel.setAttribute("aria-label", "Cancel task " + task.id);
  } else if (!cancellable && cancel) {
    cancel.remove();
  }
}

function renderTasks(tasks) {
  const wanted = new Set(tasks.map((t) => t.id));
  for (const [id, row] of view.rows) {
    if (!wanted.has(id)) {
      row.remove();
      view.rows.delete(id);
    }
  }
  const body = $("task-rows");
  // Rows that stay keep their order, so only new rows move in: a focused button is never detached.
  let next = body.firstElementChild;
  for (const task of tasks) {
    let row = view.rows.get(task.id);
    if (!row) {
      row = document.createElement("tr");
      row.dataset.id = task.id;
      view.rows.set(task.id, row);
    }
    renderRow(row, task);
    if (row === next) next = next.nextElementSibling;
    else body.insertBefore(row, next);
  }
}

async function refreshTasks() {
  const listing = view.listing;
  const cursor = listing.cursors[listing.page];
  // The table shows no results: leaving them out spares up to MAX_RESULT_BYTES per task every second.
  const params = new URLSearchParams({ limit: String(PAGE_SIZE), results: "false" });
  if (listing.state) params.set("state", listing.state);
  if (cursor !== null) params.set("cursor", cursor);
  const asked = ++view.asked;
  const result = await api("GET", "tasks?" + params);
  // Moved to another page or state meanwhile, or a later answer is shown already: this one is out of date.
  if (listing !== view.listing || asked < view.shown) return;
  view.shown = asked;
  const lost = result.status === 400 && cursor !== null && fieldError(result, "cursor");
  if (lost) {
    // The service cannot read the cursor any more (a new version, another store): start again from the newest.
    setText("task-message", `Back to the newest tasks: page ${listing.page + 1} can no longer be listed (${lost}).`);
    moveTo(firstPage(listing.state));
    return;
  }
  if (result.status !== 200) return;
  listing.next = result.data.next;
  renderTasks(result.data.tasks);
  const focused = document.activeElement;
  $("page-newer").disabled = listing.page === 0;
  $("page-newest").disabled = listing.page === 0;
  $("page-older").disabled = listing.next === null;
  keepPagerFocus(focused);
  setText("page-label", `Page ${listing.page + 1}`);
  if (view.detailId !== null) await refreshDetail();
}

// A pager button disabled under the keyboard's focus would drop it on the page's body (the next Tab starts
// from the top): it goes to the button that leads the other way, at the first and at the last page.
function keepPagerFocus(focused) {
  if (!focused || !focused.disabled || !focused.closest(".pager")) return;
  const other = $(focused.id === "page-older" ? "page-newer" : "page-older");
  if (!other.disabled) other.focus();
}

function moveTo(listing) {
  // "Older" stays enabled meanwhile (it does nothing until the page's `next` is known): disabled, it would lose
  // the keyboard's focus at every step.
  view.listing = listing;
  refreshTasks();
}

function olderPage() {
  const { state, cursors, page, next } = view.listing;
  if (next !== null) moveTo({ state, cursors: [...cursors.slice(0, page + 1), next], page: page + 1, next: null });
}

function newerPage() {
  // The newer page's own cursor again: it shows what it showed, rather than what the tasks accepted since push down.
  const { state, cursors, page } = view.listing;
  if (page > 0) moveTo({ state, cursors, page: page - 1, next: null });
}

function fieldError(result, field) {
  const error = ((result.data || {}).errors || []).find((e) => e.field === field);
  return error ? `${error.field} ${error.message}` : "";
}

async function refreshDetail() {
  const id = view.detailId;
  const result = await api("GET", taskPath(id));
  if (id !== view.detailId) return; // closed or changed meanwhile
  const fields = $("detail-fields");
  if (result.status !== 200) {
    fields.replaceChildren(term("state"), definition(describeProblem(result)));
    return;
  }
  const parts = [];
  for (const [key, value] of Object.entries(result.data)) {
    if (key === "id") continue;
    parts.push(term(key), definition(value === null ? "—" : typeof value === "object" ? JSON.stringify(value) : value));
  }
  fields.replaceChildren(...parts);
}

function term(text) {
  const dt = document.createElement("dt");
  dt.textContent = text.replaceAll("_", " ");
  return dt;
}

function definition(text) {
  const dd = document.createElement("dd");
  dd.textContent = String(text);
  return dd;
}

function showDetail(id) {
  view.detailId = id;
  $("detail-id").textContent = id;
  $("detail-fields").replaceChildren();
  $("task-detail").hidden = false;
  $("detail-heading").focus();
  refreshDetail();
}

async function cancelTask(id) {
  const result = await api("DELETE", taskPath(id));
  const messages = {
    200: `Task ${id} cancelled.`,
    202: `Task ${id} is running: cancellation requested.`,
    405: "This service cannot cancel tasks.",
  };
  setText("task-message", messages[result.status] || `Task ${id} not cancelled: ${describeProblem(result)}`);
  await refreshTasks();
}

function newTestId() {
  return "test-" + Date.now().toString(36) + "-" + Math.random().toString(36).slice(2, 6);
}

async function submitTask(event) {
  event.preventDefault();
  const body = { payload: $("submit-payload").value };
  const id = $("submit-id").value.trim();
  if (id) body.id = id;
  const retries = $("submit-retries").value.trim();
  if (retries) body.max_retries = Number(retries);
  const result = await api("POST", "enqueue", body);
  if (result.status === 202) {
    setText("task-message", `Task ${result.data.id} accepted.`);
    $("submit-id").value = newTestId();
  } else {
    setText("task-message", `Task not accepted: ${describeProblem(result)}`);
  }
  await refreshTasks();
}

// -- the token -----------------------------------------------------------------------------

function askForToken(message) {
  const dialog = $("token-dialog");
  if (message) $("token-error").textContent = message; // kept until there is a new reason
  $("token-open").hidden = false;
  if (!dialog.open && (!view.tokenDeclined || message)) {
    dialog.showModal();
    $("token-input").focus();
  }
}

async function useToken(event) {
  event.preventDefault();
  view.token = $("token-input").value.trim();
  const check = await api("GET", "tasks?limit=1&results=false");
  if (check.status !== 200) return; // api() has asked again, with the reason
  sessionStorage.setItem(TOKEN_KEY, view.token);
  $("token-input").value = "";
  $("token-dialog").close();
  $("token-open").hidden = true;
  setText("task-message", "");
  await refreshTasks();
}

// -- the loop ------------------------------------------------------------------------------

function setConnection(connected, text) {
  // A status region is read aloud on change: change it when the connection does, not every second.
  if (view.connected === connected && $("connection").textContent === text) return;
  view.connected = connected;
  $("connection").textContent = text;
  $("connection").className = connected ? "ok" : "lost";
}

function liveStatus(live) {
  if (live.status === "ok") return "Live";
  if (live.status === "draining") return "Live: draining, new tasks are refused";
  if (live.status === "unhealthy") {
    return `Live: unhealthy, ${live.stuck_threads} worker threads stuck in timed-out attempts` +
      ` (${live.stuck_threads_limit} get a replacement): fewer threads take tasks`;
  }
  return `Live: ${live.status}`;
}

// The service answered without its figures: what it said, rather than that the connection is lost.
async function whyNoFigures(response) {
  let problem = {};
  try {
    problem = await response.json();
  } catch (error) {
    // not a problem document (a proxy's page): the status alone
  }
  if (String(problem.type || "").endsWith(":store-unavailable")) {
    return "Task store unavailable: retrying every second";
  }
  const title = problem.title ? ` ${problem.title}` : "";
  return `No figures (HTTP ${response.status}${title}): retrying every second`;
}

async function tick() {
  try {
    const response = await fetch("dashboard/live", { cache: "no-store" });
    if (!response.ok) {
      setConnection(false, await whyNoFigures(response));
      return; // the next poll is still scheduled
    }
    const live = await response.json();
    view.tokenRequired = live.token_required;
    renderLive(live);
    setConnection(true, liveStatus(live));
    if (view.tokenRequired && !view.token) {
      setText("task-message", "Enter the API token to see and change tasks.");
      askForToken();
    } else {
      await refreshTasks();
    }
  } catch (error) {
    setConnection(false, "Connection lost: retrying every second");
  } finally {
    // A hidden tab stops polling; it starts again when shown.
    if (document.hidden) view.paused = true;
    else setTimeout(tick, POLL_MS);
  }
}

function start() {
  $("submit-id").value = newTestId();
  $("submit-form").addEventListener("submit", submitTask);
  $("token-form").addEventListener("submit", useToken);
  $("token-cancel").addEventListener("click", () => {
    view.tokenDeclined = true;
    $("token-dialog").close();
  });
  $("token-open").addEventListener("click", () => {
    $("token-error").textContent = "";
    view.tokenDeclined = false;
    askForToken();
  });
  // A cursor is made for one state: another state starts from its newest tasks.
  $("state-filter").addEventListener("change", () => moveTo(firstPage($("state-filter").value)));
  $("page-newest").addEventListener("click", () => moveTo(firstPage(view.listing.state)));
  $("page-newer").addEventListener("click", newerPage);
  $("page-older").addEventListener("click", olderPage);
  $("detail-close").addEventListener("click", () => {
    view.detailId = null;
    $("task-detail").hidden = true;
    $("tasks-heading").focus();
  });
  $("task-rows").addEventListener("click", (event) => {
    const button = event.target.closest("button");
    if (!button) return;
    const id = button.closest("tr").dataset.id;
    if (button.classList.contains("cancel")) cancelTask(id);
    else showDetail(id);
  });
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && view.paused) {
      view.paused = false;
      tick();
    }
  });
  tick();
}

start();
