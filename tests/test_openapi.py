"""The OpenAPI description: valid, true to the routes and the config, and fuzzed against the app with schemathesis."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import threading
import unicodedata

import pytest
import schemathesis
import yaml
from budget import FUZZ_EXAMPLES
from http_fixtures import TEST_CONFIG, WAIT_S, Gate, make_harness

from config import Config
from service.openapi import BEARER_SCHEME, SPEC_PATH
from service.schema import (
    DEFAULT_LIST_LIMIT,
    ENQUEUE_FIELDS,
    LIST_PARAMETERS,
    MAX_ID_CHARS,
    MAX_LIST_LIMIT,
    TaskLimits,
    parse_task,
    task_to_json,
)
from workerpool import MemoryStore, State, StoreUnavailable, Task

# Fixed seed, derandomized, no example database: the same requests on every run for a given
# FUZZ_EXAMPLES; at the default 20, about a second per instance.
FUZZ_CONFIG = {
    "seed": 20261127,
    "generation": {"mode": "all", "max-examples": FUZZ_EXAMPLES, "deterministic": True, "database": "none"},
    "operations": [
        {
            "include-operation-id": "enqueue",
            "checks": {
                # Schema-valid bodies the API refuses by design: a payload may push the body past
                # MAX_BODY_BYTES (413).
                "positive_data_acceptance": {"enabled": False},
                # The default list lacks 413, the answer to an oversized (invalid) body.
                "negative_data_rejection": {"expected-statuses": [400, 401, 413]},
            },
        },
        {
            "include-operation-id": "enqueue_batch",
            "checks": {
                # As for enqueue; and a batch with an invalid task is a 200 whose result refuses that task.
                "positive_data_acceptance": {"enabled": False},
                "negative_data_rejection": {"enabled": False},
            },
        },
        {
            "include-operation-id": "list_tasks",
            "checks": {
                # The defaults and 400: a schema-valid cursor (any text of its alphabet) is refused unless this
                # service made it for that listing (the cursors it makes are read back by tests/test_api_pages.py).
                "positive_data_acceptance": {"expected-statuses": ["2xx", "3xx", 400, 401, 403, 404, 409, 429, "5xx"]},
            },
        },
    ],
}


def _fail_odd_payloads(task: Task, cancel: threading.Event) -> None:
    """Fail attempts of tasks whose payload's JSON has an odd length, so retried and failed tasks are read back too."""
    if len(json.dumps(task.payload)) % 2:
        raise RuntimeError("odd payload")


def _fuzz(app, *, unavailable: bool = False, only: tuple[str, ...] = (), token: str | None = None):
    """The app's served description for fuzzing, limited to the operations ``only`` if given.

    ``unavailable``: the app is meant to answer 503 (documented), which schemathesis counts as a server error.
    ``token``: sent as the bearer token; schemathesis's ignored_auth check also tries without it and with a wrong one.
    """
    config = copy.deepcopy(FUZZ_CONFIG)
    if unavailable:
        config["checks"] = {"not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", 503]}}
    if token is not None:
        config["auth"] = {"openapi": {BEARER_SCHEME: {"bearer": token}}}
    schema = schemathesis.openapi.from_wsgi("/openapi.json", app, config=schemathesis.Config.from_dict(config))
    if not only:
        return schema
    # exclude, not include: include() ORs with the filter that FUZZ_CONFIG's "operations" entry adds.
    return schema.exclude(func=lambda ctx: ctx.operation.definition.raw["operationId"] not in only)


# The apps are built at import, since schemathesis.pytest.from_fixture fails under pytest 9
# (it sets Function._nodeid); each pool is stopped when the module's tests are done.
WORKING = make_harness(_fail_odd_payloads, queue_size=1000)
BUSY_GATE = Gate()
BUSY = make_harness(BUSY_GATE, queue_size=2)  # one attempt blocked, two waiting: then 503 with Retry-After
DRAINING = make_harness()
DRAINING.pool.start()
DRAINING.pool.shutdown(0)
TOKEN = "fuzz-t0ken-0123456789"
GUARDED = make_harness(_fail_odd_payloads, config=dataclasses.replace(TEST_CONFIG, api_token=TOKEN), queue_size=1000)


class _StoreDown(MemoryStore):
    """A store every request finds down, as when its Redis server stopped (``down`` until the tests end)."""

    down = True

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailable("redis: Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    def admit(self, tasks):
        self._check()
        return super().admit(tasks)

    def get(self, task_id):
        self._check()
        return super().get(task_id)

    def list(self, state=None, limit=100, *, results=True):
        self._check()
        return super().list(state, limit, results=results)

    def page(self, state=None, limit=100, *, results=True, after=None):
        self._check()
        return super().page(state, limit, results=results, after=after)

    def cancel(self, task_id):
        self._check()
        return super().cancel(task_id)

    def stats(self):
        self._check()
        return super().stats()


STORE_DOWN = make_harness(store=_StoreDown(capacity=4))
working_api = _fuzz(WORKING.app)
busy_api = _fuzz(BUSY.app, unavailable=True, only=("enqueue", "enqueue_batch"))
draining_api = _fuzz(DRAINING.app, unavailable=True, only=("enqueue", "enqueue_batch", "health", "health_alias"))
guarded_api = _fuzz(GUARDED.app, token=TOKEN)
# No token at all: every guarded operation must answer its documented 401, whatever the request.
# Every operation that reads or changes tasks answers its documented 503.
store_down_api = _fuzz(STORE_DOWN.app, unavailable=True)
locked_out_api = _fuzz(GUARDED.app, only=("enqueue", "enqueue_batch", "get_task", "list_tasks", "cancel_task"))


@pytest.fixture(scope="module", autouse=True)
def _stop_the_fuzzed_pools():
    yield
    BUSY_GATE.open()
    STORE_DOWN.pool.store.down = False
    for harness in (WORKING, BUSY, DRAINING, GUARDED, STORE_DOWN):
        harness.pool.shutdown(WAIT_S)


@pytest.mark.fuzz
@working_api.parametrize()
def test_a_working_instance_keeps_to_its_description(case):
    case.call_and_validate()


@pytest.mark.fuzz
@busy_api.parametrize()
def test_a_full_queue_keeps_to_its_description(case):
    case.call_and_validate()


@pytest.mark.fuzz
@draining_api.parametrize()
def test_a_draining_instance_keeps_to_its_description(case):
    case.call_and_validate()


@pytest.mark.fuzz
@store_down_api.parametrize()
def test_an_instance_whose_store_is_down_keeps_to_its_description(case):
    case.call_and_validate()


@pytest.mark.fuzz
@guarded_api.parametrize()
def test_an_instance_with_a_token_keeps_to_its_description(case):
    case.call_and_validate()


@pytest.mark.fuzz
@locked_out_api.parametrize()
def test_an_instance_with_a_token_refuses_requests_without_it(case):
    response = case.call_and_validate()
    if case.method.upper() != case.operation.method.upper():
        return  # another method: answered by the router (405, or Allow for OPTIONS), never by the view
    # A URL no route matches (werkzeug's path converter stops at a newline) is the router's 404.
    unrouted = response.status_code == 404 and response.json()["type"] == "about:blank"
    assert response.status_code == 401 or unrouted


# -- the description itself ---------------------------------------------------------


@pytest.fixture
def harness():
    harness = make_harness()
    yield harness
    harness.pool.shutdown(WAIT_S)


def served_spec(harness):
    response = harness.client.get("/openapi.json")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    return response.get_json()


def test_the_served_description_is_valid_openapi_3_1(harness):
    spec = served_spec(harness)
    assert spec["openapi"].startswith("3.1.")
    schemathesis.openapi.from_dict(spec).validate()


def _openapi_path(rule: str) -> str:
    return re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule)


def test_the_description_lists_exactly_the_routes(harness):
    routes = {
        (_openapi_path(rule.rule), method.lower())
        for rule in harness.app.url_map.iter_rules()
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    spec = served_spec(harness)
    described = {(path, method) for path, item in spec["paths"].items() for method in item}
    assert described == routes


@pytest.mark.parametrize("path", ["/dashboard", "/dashboard/dashboard.js", "/dashboard/dashboard.css"])
def test_the_dashboard_files_conditional_answers_are_described(harness, path):
    # Browsers send If-None-Match on every reload: a 304 (and the ETag asking for it) is part of the contract.
    schema = schemathesis.openapi.from_dict(served_spec(harness))
    operation = schema[path]["GET"]
    first = harness.client.get(path)
    etag = first.headers["ETag"]
    answers = [first, harness.client.get(path, headers={"If-None-Match": etag})]
    answers.append(harness.client.get(path, headers={"If-None-Match": "*"}))
    assert [answer.status_code for answer in answers] == [200, 304, 304]
    for answer in answers:
        operation.validate_response(answer)  # documented status, headers and body
        assert answer.headers["ETag"] == etag
    described = served_spec(harness)["paths"][path]["get"]["responses"]
    assert set(described) >= {"200", "304"}


def test_path_parameters_match_the_route_variables(harness):
    spec = served_spec(harness)
    for path, item in spec["paths"].items():
        for operation in item.values():
            in_path = {p["name"] for p in operation.get("parameters", ()) if p["in"] == "path"}
            assert in_path == set(re.findall(r"{(\w+)}", path)), path


def test_the_served_description_has_the_instance_limits():
    config = Config(
        max_body_bytes=4096,
        max_payload_chars=1000,
        default_max_retries=1,
        max_retries_limit=7,
        max_batch_tasks=9,
        max_batch_body_bytes=8192,
        max_delay_ms=1234,
    )
    harness = make_harness(config=config)
    spec = served_spec(harness)
    assert spec["paths"]["/enqueue"]["post"]["requestBody"]["x-max-body-bytes"] == 4096
    assert spec["paths"]["/enqueue/batch"]["post"]["requestBody"]["x-max-body-bytes"] == 8192
    assert spec["components"]["schemas"]["EnqueueBatchRequest"]["properties"]["tasks"]["maxItems"] == 9
    fields = spec["components"]["schemas"]["EnqueueRequest"]["properties"]
    assert fields["payload"]["x-max-chars"] == fields["payload"]["anyOf"][0]["maxLength"] == 1000
    assert (fields["max_retries"]["default"], fields["max_retries"]["maximum"]) == (1, 7)
    assert fields["delay_ms"]["maximum"] == 1234


def test_the_file_describes_an_instance_with_the_default_config():
    spec = yaml.safe_load(SPEC_PATH.read_text(encoding="utf-8"))
    defaults = Config()
    assert spec["paths"]["/enqueue"]["post"]["requestBody"]["x-max-body-bytes"] == defaults.max_body_bytes
    batch = spec["paths"]["/enqueue/batch"]["post"]["requestBody"]
    assert batch["x-max-body-bytes"] == defaults.max_batch_body_bytes
    assert spec["components"]["schemas"]["EnqueueBatchRequest"]["properties"]["tasks"]["maxItems"] == (
        defaults.max_batch_tasks
    )
    fields = spec["components"]["schemas"]["EnqueueRequest"]["properties"]
    assert fields["payload"]["x-max-chars"] == defaults.max_payload_chars
    assert fields["payload"]["anyOf"][0]["maxLength"] == defaults.max_payload_chars
    assert (fields["max_retries"]["default"], fields["max_retries"]["maximum"]) == (
        defaults.default_max_retries,
        defaults.max_retries_limit,
    )
    assert fields["delay_ms"]["maximum"] == defaults.max_delay_ms


GUARDED_OPERATIONS = {"enqueue", "enqueue_batch", "get_task", "list_tasks", "cancel_task"}


def _operations(spec):
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            yield path, method, operation


def test_the_file_offers_no_token_or_the_bearer_token_on_the_guarded_operations():
    spec = yaml.safe_load(SPEC_PATH.read_text(encoding="utf-8"))
    scheme = spec["components"]["securitySchemes"][BEARER_SCHEME]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    assert "security" not in spec  # no document-wide requirement: health, metrics and this description stay open
    guarded = {operation["operationId"] for _, _, operation in _operations(spec) if operation["security"] != []}
    assert guarded == GUARDED_OPERATIONS
    for _, _, operation in _operations(spec):
        if operation["operationId"] in GUARDED_OPERATIONS:
            assert operation["security"] == [{}, {BEARER_SCHEME: []}]
            assert operation["responses"]["401"] == {"$ref": "#/components/responses/Unauthorized"}
        else:
            assert "401" not in operation["responses"]


def test_without_a_token_the_served_description_asks_for_none(harness):
    spec = served_spec(harness)
    for path, method, operation in _operations(spec):
        assert operation["security"] == [], (method, path)
        assert "401" not in operation["responses"], (method, path)
    assert "securitySchemes" not in spec["components"]
    assert "Unauthorized" not in spec["components"].get("responses", {})


def test_with_a_token_the_served_description_requires_it_exactly_where_the_app_does():
    harness = make_harness(config=dataclasses.replace(TEST_CONFIG, api_token="t0ken-t0ken-t0ken"))
    spec = served_spec(harness)
    schemathesis.openapi.from_dict(spec).validate()
    for path, method, operation in _operations(spec):
        response = harness.client.open(path.replace("{task_id}", "a"), method=method.upper(), json={})
        if operation["operationId"] in GUARDED_OPERATIONS:
            assert operation["security"] == [{BEARER_SCHEME: []}]
            assert "401" in operation["responses"]
            assert response.status_code == 401, (method, path)
        else:
            assert operation["security"] == []
            assert response.status_code != 401, (method, path)


def test_the_description_agrees_with_the_validation_rules(harness):
    spec = served_spec(harness)
    schemas = spec["components"]["schemas"]
    request = schemas["EnqueueRequest"]
    assert tuple(request["properties"]) == ENQUEUE_FIELDS
    assert request["properties"]["id"]["maxLength"] == MAX_ID_CHARS
    assert schemas["State"]["enum"] == [str(state) for state in State]
    parameters = {p["name"]: p["schema"] for p in spec["paths"]["/tasks"]["get"]["parameters"]}
    assert tuple(parameters) == LIST_PARAMETERS
    assert (parameters["limit"]["default"], parameters["limit"]["maximum"]) == (DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT)
    task = Task(id="a", payload="", max_retries=0, created_at=0.0)
    assert set(schemas["Task"]["required"]) == set(task_to_json(task))


@pytest.mark.parametrize(
    ("task_id", "valid"),
    [("job-1", True), ("äö 😀", True), ("x" * 256, True), ("", False), ("x" * 257, False)]
    + [(f"a{c}b", False) for c in ("\x00", "\t", "\x1f", "\x7f", "\x85", "\x9f")]
    + [(f"a{c}b", False) for c in ("\u00ad", "\u200b", "\u200d", "\u202e", "\u2066", "\u2069", "\ufeff")]
    # The path shapes refused (it described them as valid), and some that are not those shapes.
    + [(i, False) for i in ("/", "a/", "/a", "a//b", ".", "..", "a/./b", "a/../b", "./a", "a/.", "a\u2028/")]
    + [(i, True) for i in ("a/b", "a.b", ".a", "a..", "a/.b/c", "...", "a/...", "ü/a.", "a b c")]
    # Blank or shown as nothing: they displayed as another id ("vis-1\u3164" as "vis-1").
    + [(f"vis-1{c}", False) for c in ("\u00a0", "\u3000", "\u2028", "\u3164", "\u2800", "\ufe0f", "\u034f")]
    + [(i, False) for i in (" vis-1", "vis-1 ", "vis  1", " ", "a/ ")],
)
def test_the_id_rule_is_the_one_the_api_applies(harness, task_id, valid):
    id_rule = served_spec(harness)["components"]["schemas"]["EnqueueRequest"]["properties"]["id"]
    described = id_rule["minLength"] <= len(task_id) <= id_rule["maxLength"] and bool(
        re.search(id_rule["pattern"], task_id)
    )
    assert described == valid
    response = harness.client.post("/enqueue", json={"id": task_id, "payload": ""})
    assert response.status_code == (202 if valid else 400)


def test_the_id_pattern_refuses_every_format_character_of_the_basic_multilingual_plane(harness):
    pattern = re.compile(served_spec(harness)["components"]["schemas"]["EnqueueRequest"]["properties"]["id"]["pattern"])
    described = [code for code in range(0x10000) if not pattern.search(f"a{chr(code)}")]
    format_characters = [code for code in range(0x10000) if unicodedata.category(chr(code)) == "Cf"]
    assert set(format_characters) <= set(described)


def test_the_id_pattern_refuses_exactly_the_characters_of_the_basic_multilingual_plane_the_api_refuses(harness):
    pattern = re.compile(served_spec(harness)["components"]["schemas"]["EnqueueRequest"]["properties"]["id"]["pattern"])
    limits = TaskLimits(default_max_retries=0, max_retries_limit=0, max_payload_chars=10)
    for code in range(0x10000):
        if 0xD800 <= code <= 0xDFFF:
            continue  # a lone surrogate: refused, but not expressible in the pattern
        task_id = f"a{chr(code)}b"
        refused = isinstance(parse_task({"id": task_id, "payload": ""}, limits), list)
        assert (pattern.search(task_id) is None) == refused, f"U+{code:04X}"


def test_the_served_description_names_the_root_path_it_is_served_under():
    # It said "/" under SCRIPT_NAME=/wp: clients generated from it sent POST /enqueue, outside the service.
    harness = make_harness()
    try:
        assert harness.client.get("/openapi.json").get_json()["servers"][0]["url"] == "/"
        served = harness.client.get("/openapi.json", base_url="http://localhost/wp").get_json()
        assert served["servers"][0]["url"] == "/wp/"
    finally:
        harness.drain()


@pytest.mark.parametrize("root", ["", "/wp", "/a.b(c)+$"])
def test_the_served_locations_carry_the_root_path_the_server_answers_with(root):
    # Under SCRIPT_NAME=/wp the served patterns said ^/tasks/ while every Location was /wp/tasks/...
    harness = make_harness()
    try:
        base = "http://localhost" + root
        spec = harness.client.get("/openapi.json", base_url=base).get_json()
        enqueue = spec["paths"]["/enqueue"]["post"]["responses"]
        batch_result = spec["components"]["schemas"]["BatchResult"]["oneOf"]
        header_patterns = [enqueue[status]["headers"]["Location"]["schema"]["pattern"] for status in ("202", "409")]
        body_patterns = [branch["properties"]["location"]["pattern"] for branch in batch_result]
        accepted = harness.client.post("/enqueue", json={"id": "r1", "payload": 1}, base_url=base)
        again = harness.client.post("/enqueue", json={"id": "r1", "payload": 1}, base_url=base)
        assert (accepted.status_code, again.status_code) == (202, 409)
        for pattern, response in zip(header_patterns, (accepted, again), strict=True):
            assert re.search(pattern, response.headers["Location"]), (pattern, response.headers["Location"])
            assert not re.search(pattern, "/x" + response.headers["Location"])
        results = harness.client.post(
            "/enqueue/batch", json={"tasks": [{"id": "r2", "payload": 1}, {"id": "r1", "payload": 1}]}, base_url=base
        ).get_json()["results"]
        assert [result["status"] for result in results] == [202, 409]
        for pattern, result in zip(body_patterns, results, strict=True):
            assert re.search(pattern, result["location"]), (pattern, result["location"])
    finally:
        harness.drain()


def test_the_description_s_own_text_names_what_the_served_copy_varies():
    # It named four of the guarded operations (not POST /enqueue/batch) and five of the seven settings served.
    from config import _FIELDS
    from service.openapi import openapi_spec

    text = " ".join(_spec_file_text()["info"]["description"].split())
    guarded = re.search(r"requires `Authorization: Bearer <token>` on (.+?); the other endpoints", text).group(1)
    named = {operation.replace("{task_id}", "<id>") for operation in re.findall(r"`([A-Z]+ /[^`]*)`", guarded)}
    served = openapi_spec(dataclasses.replace(TEST_CONFIG, api_token="t0ken-0123456789abcdef"))
    bearer = {
        f"{method.upper()} {path}".replace("{task_id}", "<id>")
        for path, item in served["paths"].items()
        for method, operation in item.items()
        if operation.get("security")
    }
    assert named == bearer

    listed = set(re.findall(r"`([A-Z_]+)`", re.search(r"The limits taken from the configuration \((.+?)\)", text)[1]))
    varied = set()
    for name, (field, _) in _FIELDS.items():
        value = getattr(TEST_CONFIG, field)
        if name != "API_TOKEN" and type(value) is int:
            other = dataclasses.replace(TEST_CONFIG, **{field: value + 1})
            if openapi_spec(other) != openapi_spec(TEST_CONFIG):
                varied.add(name)
    assert listed == varied


def _spec_file_text() -> dict:
    return yaml.safe_load(SPEC_PATH.read_text(encoding="utf-8"))
