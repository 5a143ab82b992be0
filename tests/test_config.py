"""Settings from the environment and .env: every variable, every kind of bad value."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from dataclasses import FrozenInstanceError, fields
from urllib.parse import quote

import pytest
from dotenv import dotenv_values
from http_fixtures import PROJECT_ROOT, clean_environment

import config
from config import DOTENV_PATH, VARIABLES, Config, ConfigError, StoreSetting, from_env


@pytest.fixture(autouse=True)
def no_service_variables(monkeypatch):
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_defaults():
    assert from_env({}) == Config()
    assert Config() == Config(
        workers=4,
        queue_size=64,
        host="127.0.0.1",
        port=8080,
        work_min_ms=100,
        work_max_ms=500,
        failure_rate=0.2,
        backoff_base_ms=100,
        backoff_cap_ms=10_000,
        default_max_retries=3,
        max_retries_limit=20,
        max_body_bytes=65_536,
        max_payload_chars=32_768,
        max_batch_tasks=1000,
        max_batch_body_bytes=4 * 1024 * 1024,
        max_delay_ms=3_600_000,
        max_result_bytes=65_536,
        attempt_timeout_s=300.0,
        lease_s=30.0,
        state_ttl_s=3600.0,
        state_max_tasks=100_000,
        shutdown_timeout_s=20.0,
        request_timeout_s=10.0,
        log_level="INFO",
        api_token="",
    )


def test_config_is_frozen():
    with pytest.raises(FrozenInstanceError):
        Config().workers = 2  # type: ignore[misc]


def test_every_field_has_a_variable():
    assert {name.lower() for name in VARIABLES} == {f.name for f in fields(Config)}


@pytest.mark.parametrize(
    ("variable", "text", "field", "value"),
    [
        ("WORKERS", "1", "workers", 1),
        ("WORKERS", "256", "workers", 256),
        ("WORKERS", " 8 ", "workers", 8),
        ("QUEUE_SIZE", "1", "queue_size", 1),
        ("QUEUE_SIZE", "1000000", "queue_size", 1_000_000),
        ("HOST", "0.0.0.0", "host", "0.0.0.0"),
        ("HOST", "::1", "host", "::1"),
        ("HOST", "localhost", "host", "localhost"),
        ("PORT", "0", "port", 0),
        ("PORT", "65535", "port", 65_535),
        ("WORK_MIN_MS", "0", "work_min_ms", 0),
        ("WORK_MAX_MS", "100", "work_max_ms", 100),  # equal to the default minimum
        ("WORK_MAX_MS", "86400000", "work_max_ms", 86_400_000),
        ("FAILURE_RATE", "0", "failure_rate", 0.0),
        ("FAILURE_RATE", "1", "failure_rate", 1.0),
        ("FAILURE_RATE", "0.35", "failure_rate", 0.35),
        ("BACKOFF_BASE_MS", "0", "backoff_base_ms", 0),
        ("BACKOFF_CAP_MS", "100", "backoff_cap_ms", 100),
        ("DEFAULT_MAX_RETRIES", "0", "default_max_retries", 0),
        ("DEFAULT_MAX_RETRIES", "20", "default_max_retries", 20),
        ("MAX_RETRIES_LIMIT", "1000", "max_retries_limit", 1000),
        ("MAX_BODY_BYTES", "32768", "max_body_bytes", 32_768),  # equal to the default payload limit
        ("MAX_BODY_BYTES", "16777216", "max_body_bytes", 16_777_216),
        ("MAX_PAYLOAD_CHARS", "0", "max_payload_chars", 0),
        ("MAX_PAYLOAD_CHARS", "65536", "max_payload_chars", 65_536),  # equal to the default body limit
        ("MAX_BATCH_TASKS", "1", "max_batch_tasks", 1),
        ("MAX_BATCH_TASKS", "100000", "max_batch_tasks", 100_000),
        ("MAX_BATCH_BODY_BYTES", "64", "max_batch_body_bytes", 64),  # below MAX_BODY_BYTES: allowed
        ("MAX_BATCH_BODY_BYTES", "268435456", "max_batch_body_bytes", 268_435_456),
        ("MAX_DELAY_MS", "0", "max_delay_ms", 0),
        ("MAX_DELAY_MS", "2592000000", "max_delay_ms", 2_592_000_000),  # 30 days
        ("MAX_RESULT_BYTES", "0", "max_result_bytes", 0),
        ("MAX_RESULT_BYTES", "16777216", "max_result_bytes", 16_777_216),
        ("ATTEMPT_TIMEOUT_S", "0", "attempt_timeout_s", 0.0),  # off
        ("ATTEMPT_TIMEOUT_S", "0.25", "attempt_timeout_s", 0.25),
        ("ATTEMPT_TIMEOUT_S", "86400", "attempt_timeout_s", 86_400.0),
        ("LEASE_S", "1", "lease_s", 1.0),
        ("LEASE_S", "2.5", "lease_s", 2.5),
        ("LEASE_S", "3600", "lease_s", 3600.0),
        ("STATE_TTL_S", "0.5", "state_ttl_s", 0.5),
        ("STATE_TTL_S", "86400", "state_ttl_s", 86_400.0),
        ("STATE_MAX_TASKS", "1", "state_max_tasks", 1),
        ("SHUTDOWN_TIMEOUT_S", "0", "shutdown_timeout_s", 0.0),
        ("SHUTDOWN_TIMEOUT_S", "2.5", "shutdown_timeout_s", 2.5),
        ("REQUEST_TIMEOUT_S", "1", "request_timeout_s", 1.0),
        ("REQUEST_TIMEOUT_S", "2.5", "request_timeout_s", 2.5),
        ("LOG_LEVEL", "debug", "log_level", "DEBUG"),
        ("LOG_LEVEL", "WARNING", "log_level", "WARNING"),
        ("LOG_LEVEL", "Critical", "log_level", "CRITICAL"),
        ("LOG_FORMAT", "JSON", "log_format", "json"),
        ("LOG_FORMAT", "text", "log_format", "text"),
        ("ACCESS_LOG", "off", "access_log", False),
        ("ACCESS_LOG", "On", "access_log", True),
        ("ACCESS_LOG", "false", "access_log", False),
        ("ACCESS_LOG", "1", "access_log", True),
        ("TASK_HANDLER", "", "task_handler", ""),
        ("TASK_HANDLER", "my_tasks.jobs:run", "task_handler", "my_tasks.jobs:run"),
        ("TASK_HANDLER", "tasks:Runner.run", "task_handler", "tasks:Runner.run"),
        ("API_TOKEN", "", "api_token", ""),
        ("API_TOKEN", "0123456789abcdef", "api_token", "0123456789abcdef"),
        ("API_TOKEN", " Zm9vYmFy-._~+/Zm9vYmFy== ", "api_token", "Zm9vYmFy-._~+/Zm9vYmFy=="),
        ("STORE", "memory", "store", StoreSetting()),
        ("STORE", "sqlite:///var/lib/tasks.db", "store", StoreSetting("sqlite", "/var/lib/tasks.db")),
        ("STORE", "sqlite:///t.db?synchronous=full", "store", StoreSetting("sqlite", "/t.db", "FULL")),
        ("STORE", "sqlite:///t.db?synchronous=NORMAL", "store", StoreSetting("sqlite", "/t.db", "NORMAL")),
        ("STORE", "redis://127.0.0.1:6379/0", "store", StoreSetting("redis", url="redis://127.0.0.1:6379/0")),
        ("STORE", "rediss://:pw@cache.internal", "store", StoreSetting("redis", url="rediss://:pw@cache.internal")),
        (
            "STORE",
            "redis://c/0?socket_timeout=1&socket_connect_timeout=0.5",
            "store",
            StoreSetting("redis", url="redis://c/0?socket_timeout=1&socket_connect_timeout=0.5"),
        ),
        ("STORE_PREFIX", "jobs:eu-1", "store_prefix", "jobs:eu-1"),
        ("REDIS_PASSWORD", "hunter2", "redis_password", "hunter2"),
        ("METRICS_DIR", "/run/workerpool-metrics", "metrics_dir", "/run/workerpool-metrics"),
        ("METRICS_DIR", "", "metrics_dir", ""),
    ],
)
def test_each_variable_is_read(variable, text, field, value):
    assert getattr(from_env({variable: text}), field) == value


INTEGER = "must be an integer from"
TOKEN_RULE = "must be empty (no token) or at least 16 visible ASCII characters, without spaces"
STORE_RULE = (
    "must be memory, sqlite:///path/to/tasks.db (optionally ?synchronous=normal or full) "
    "or redis://host:port/db (rediss:// for TLS)"
)
BAD_REDIS_OPTION = "is not a Redis URL: invalid value for '{}' in connection URL"
MAX_CONNECTIONS_REFUSED = (
    "max_connections cannot be set: every thread keeps a connection of its own (WORKERS, the HTTP threads and "
    "a few more), and a pool at its cap refuses the next thread's commands (Too many connections) instead of waiting"
)
BAD_TIMEOUT = "is not a Redis URL: {} must be a number of seconds above 0"
SHORT_TIMEOUT = (
    "is not a Redis URL: {} must be a number of seconds, at least 1: each step that changes tasks must reach Redis"
    " within half of it"
)
BAD_VALUES = [
    ("WORKERS", "0", f"{INTEGER} 1 to 256"),
    ("WORKERS", "-1", f"{INTEGER} 1 to 256"),
    ("WORKERS", "257", f"{INTEGER} 1 to 256"),
    ("WORKERS", "four", f"{INTEGER} 1 to 256"),
    ("WORKERS", "4.0", f"{INTEGER} 1 to 256"),
    ("WORKERS", "1e3", f"{INTEGER} 1 to 256"),
    ("WORKERS", "", f"{INTEGER} 1 to 256"),
    ("WORKERS", "1_0", f"{INTEGER} 1 to 256"),
    ("QUEUE_SIZE", "0", f"{INTEGER} 1 to 1000000"),
    ("QUEUE_SIZE", "-5", f"{INTEGER} 1 to 1000000"),
    ("QUEUE_SIZE", "big", f"{INTEGER} 1 to 1000000"),
    ("HOST", "", "must be a host name or IP address"),
    ("HOST", "local host", "must be a host name or IP address"),
    ("HOST", "[::1]", "must be an IPv6 address without brackets: ::1"),
    ("HOST", "0", "must be an IPv4 address written in full: 0 stands for 0.0.0.0"),
    ("HOST", "127.1", "must be an IPv4 address written in full: 127.1 stands for 127.0.0.1"),
    ("PORT", "65536", f"{INTEGER} 0 to 65535"),
    ("PORT", "-1", f"{INTEGER} 0 to 65535"),
    ("PORT", "http", f"{INTEGER} 0 to 65535"),
    ("WORK_MIN_MS", "-1", f"{INTEGER} 0 to 86400000"),
    ("WORK_MIN_MS", "0.5", f"{INTEGER} 0 to 86400000"),
    ("WORK_MAX_MS", "-1", f"{INTEGER} 0 to 86400000"),
    ("WORK_MAX_MS", "ten", f"{INTEGER} 0 to 86400000"),
    ("FAILURE_RATE", "1.5", "must be a number at least 0 and at most 1"),
    ("FAILURE_RATE", "-0.1", "must be a number at least 0 and at most 1"),
    ("FAILURE_RATE", "20%", "must be a number at least 0 and at most 1"),
    ("FAILURE_RATE", "nan", "must be a number at least 0 and at most 1"),
    ("FAILURE_RATE", "", "must be a number at least 0 and at most 1"),
    ("BACKOFF_BASE_MS", "-1", f"{INTEGER} 0 to 86400000"),
    ("BACKOFF_BASE_MS", "0.1", f"{INTEGER} 0 to 86400000"),
    ("BACKOFF_CAP_MS", "-1", f"{INTEGER} 0 to 86400000"),
    ("BACKOFF_CAP_MS", "10s", f"{INTEGER} 0 to 86400000"),
    ("DEFAULT_MAX_RETRIES", "-1", f"{INTEGER} 0 to 1000"),
    ("DEFAULT_MAX_RETRIES", "three", f"{INTEGER} 0 to 1000"),
    ("MAX_RETRIES_LIMIT", "-1", f"{INTEGER} 0 to 1000"),
    ("MAX_RETRIES_LIMIT", "1001", f"{INTEGER} 0 to 1000"),
    ("MAX_BODY_BYTES", "0", f"{INTEGER} 64 to 16777216"),
    ("MAX_BODY_BYTES", "63", f"{INTEGER} 64 to 16777216"),
    ("MAX_BODY_BYTES", "64k", f"{INTEGER} 64 to 16777216"),
    ("MAX_BODY_BYTES", "16777217", f"{INTEGER} 64 to 16777216"),
    ("MAX_PAYLOAD_CHARS", "-1", f"{INTEGER} 0 to 16777216"),
    ("MAX_BATCH_TASKS", "0", f"{INTEGER} 1 to 100000"),
    ("MAX_BATCH_TASKS", "100001", f"{INTEGER} 1 to 100000"),
    ("MAX_BATCH_BODY_BYTES", "63", f"{INTEGER} 64 to 268435456"),
    ("MAX_BATCH_BODY_BYTES", "4M", f"{INTEGER} 64 to 268435456"),
    ("MAX_PAYLOAD_CHARS", "32k", f"{INTEGER} 0 to 16777216"),
    ("MAX_PAYLOAD_CHARS", "16777217", f"{INTEGER} 0 to 16777216"),
    ("MAX_DELAY_MS", "-1", f"{INTEGER} 0 to 2592000000"),
    ("MAX_DELAY_MS", "2592000001", f"{INTEGER} 0 to 2592000000"),
    ("MAX_DELAY_MS", "1h", f"{INTEGER} 0 to 2592000000"),
    ("MAX_RESULT_BYTES", "-1", f"{INTEGER} 0 to 16777216"),
    ("MAX_RESULT_BYTES", "64k", f"{INTEGER} 0 to 16777216"),
    ("ATTEMPT_TIMEOUT_S", "-1", "must be a number at least 0 and at most 86400"),
    ("ATTEMPT_TIMEOUT_S", "inf", "must be a number at least 0 and at most 86400"),
    ("ATTEMPT_TIMEOUT_S", "5m", "must be a number at least 0 and at most 86400"),
    ("LEASE_S", "0.5", "must be a number at least 1 and at most 3600"),
    ("LEASE_S", "inf", "must be a number at least 1 and at most 3600"),
    ("STATE_TTL_S", "0", "must be a number greater than 0 and at most 31536000"),  # as the README writes it
    ("STATE_TTL_S", "-1", "must be a number greater than 0 and at most 31536000"),
    ("STATE_TTL_S", "inf", "must be a number greater than 0 and at most 31536000"),
    ("STATE_TTL_S", "1h", "must be a number greater than 0 and at most 31536000"),
    ("STATE_MAX_TASKS", "0", f"{INTEGER} 1 to 100000000"),
    ("STATE_MAX_TASKS", "lots", f"{INTEGER} 1 to 100000000"),
    ("SHUTDOWN_TIMEOUT_S", "-1", "must be a number at least 0 and at most 86400"),
    ("SHUTDOWN_TIMEOUT_S", "forever", "must be a number at least 0 and at most 86400"),
    ("REQUEST_TIMEOUT_S", "0", "must be a number at least 1 and at most 3600"),
    ("REQUEST_TIMEOUT_S", "0.000001", "must be a number at least 1 and at most 3600"),  # no client could make it
    ("REQUEST_TIMEOUT_S", "0.5", "must be a number at least 1 and at most 3600"),
    ("LOG_LEVEL", "VERBOSE", "must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    ("LOG_LEVEL", "", "must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    ("LOG_FORMAT", "logfmt", "must be one of text, json"),
    ("ACCESS_LOG", "disabled", "must be on or off (also true/false, 1/0, yes/no)"),
    ("ACCESS_LOG", "", "must be on or off (also true/false, 1/0, yes/no)"),
    ("TASK_HANDLER", "tasks.run", "must be empty or module:callable, e.g. mytasks:run"),
    ("TASK_HANDLER", "tasks:run()", "must be empty or module:callable, e.g. mytasks:run"),
    ("API_TOKEN", "0123456789abcde", TOKEN_RULE),
    ("API_TOKEN", "0123456789 abcdef", TOKEN_RULE),
    ("API_TOKEN", "0123456789\tabcdef", TOKEN_RULE),
    ("API_TOKEN", "0123456789abcdef\u00e9", TOKEN_RULE),
    ("API_TOKEN", "   ", TOKEN_RULE),  # set but blank: not "no token"
    ("API_TOKEN", "\t", TOKEN_RULE),
    ("STORE", "redis", STORE_RULE),
    ("STORE", "sqlite:/t.db", STORE_RULE),
    ("STORE", "sqlite://", f"{STORE_RULE}: the file name is missing"),
    ("STORE", "sqlite:///var/lib/", f"{STORE_RULE}: the file name is missing"),
    ("STORE", "sqlite://tasks.db", f"{STORE_RULE}: the path must be absolute (three slashes), not 'tasks.db'"),
    ("STORE", "sqlite://host/t.db", f"{STORE_RULE}: the path must be absolute (three slashes), not 'host/t.db'"),
    ("STORE", "sqlite:///:memory:", f"{STORE_RULE}: an in-memory SQLite database cannot be shared; use STORE=memory"),
    ("STORE", "sqlite:///t.db?synchronous=off", f"{STORE_RULE}: unknown option 'synchronous=off'"),
    ("STORE", "sqlite:///t.db?mode=ro", f"{STORE_RULE}: unknown option 'mode=ro'"),
    ("STORE", "redis:///0", "is not a Redis URL: the host is missing"),
    ("STORE", "redis://cache/zero", "is not a Redis URL: the database must be a number, not 'zero'"),
    ("STORE", "redis://c/0?db=x", BAD_REDIS_OPTION.format("db")),
    ("STORE", "redis://c/0?socket_timeout=x", BAD_REDIS_OPTION.format("socket_timeout")),
    # 0: every step's deadline passed before it reached Redis, and under a second steps were refused as late at
    # random; nan, inf and below 0 ended in a traceback.
    ("STORE", "redis://c/0?socket_timeout=0", SHORT_TIMEOUT.format("socket_timeout=0.0")),
    ("STORE", "redis://c/0?socket_timeout=0.1", SHORT_TIMEOUT.format("socket_timeout=0.1")),
    ("STORE", "redis://c/0?socket_timeout=0.999", SHORT_TIMEOUT.format("socket_timeout=0.999")),
    ("STORE", "redis://c/0?socket_timeout=nan", SHORT_TIMEOUT.format("socket_timeout=nan")),
    ("STORE", "redis://c/0?socket_timeout=inf", SHORT_TIMEOUT.format("socket_timeout=inf")),
    ("STORE", "redis://c/0?socket_connect_timeout=-1", BAD_TIMEOUT.format("socket_connect_timeout=-1.0")),
    ("STORE", "redis://cache/0?timeout=5", "is not a Redis URL: unknown option timeout"),
    (
        "STORE",
        "redis://cache/0?ssl_ca_certs=/ca.crt",
        "is not a Redis URL: unknown option ssl_ca_certs (TLS options need rediss://)",
    ),
    # Scripts loaded under another encoding had other digests: every step failed with NOSCRIPT.
    (
        "STORE",
        "redis://cache/0?encoding=utf-16",
        "is not a Redis URL: encoding is not supported: the store talks to Redis in UTF-8",
    ),
    (
        "STORE",
        "redis://cache/0?encoding_errors=ignore",
        "is not a Redis URL: encoding_errors is not supported: the store talks to Redis in UTF-8",
    ),
    # redis-py took the option over the path that was checked.
    (
        "STORE",
        "redis://cache/2?db=3",
        "is not a Redis URL: the database is given twice (the path and ?db=): keep the path's",
    ),
    (
        "STORE",
        "unix:///run/redis.sock?db=0",
        f"{STORE_RULE}: a Redis on a unix socket (unix://) is not supported: reach it over TCP",
    ),
    (
        "STORE",
        "redis://cache/0?ssl_cert_reqs=none",
        "is not a Redis URL: unknown option ssl_cert_reqs (TLS options need rediss://)",
    ),
    ("STORE", "redis://cache/0?protocol=7", "is not a Redis URL: protocol must be either 2 or 3"),
    ("STORE", "redis://cache/0?max_connections=8", MAX_CONNECTIONS_REFUSED),
    ("STORE", "rediss://cache/0?socket_timeout=2&max_connections=1000", MAX_CONNECTIONS_REFUSED),
    (
        "STORE",
        "rediss://cache/0?ssl_ca_certs=/no/ca.pem",
        "ssl_ca_certs='/no/ca.pem' cannot be read: No such file or directory",
    ),
    (
        "STORE",
        "rediss://cache/0?ssl_certfile=/no/c.pem",
        "ssl_certfile='/no/c.pem' cannot be read: No such file or directory",
    ),
    (
        "STORE",
        f"rediss://cache/0?ssl_certfile={__file__}&ssl_keyfile=/",
        "ssl_keyfile='/' cannot be read: Is a directory",
    ),
    ("STORE", "rediss://cache/0?ssl_ca_path=/no/certs", "ssl_ca_path='/no/certs' is not a directory"),
    ("STORE_PREFIX", "", "must be 1-64 letters, digits or _ . : -"),
    ("STORE_PREFIX", "{tag}", "must be 1-64 letters, digits or _ . : -"),
    ("REDIS_PASSWORD", "pass\x00word", "must not contain control characters"),
    ("METRICS_DIR", "metrics", "must be empty or an absolute directory path"),
]


@pytest.mark.parametrize(("variable", "text", "reason"), BAD_VALUES)
def test_a_bad_value_names_the_variable_and_the_value(variable, text, reason):
    with pytest.raises(ConfigError) as caught:
        from_env({variable: text})
    shown = f"<{len(text)} characters, not shown>" if variable in ("API_TOKEN", "REDIS_PASSWORD") else repr(text)
    assert str(caught.value) == f"{variable}={shown} is invalid: {reason}"


def test_the_token_never_shows():
    with pytest.raises(ConfigError) as caught:
        from_env({"API_TOKEN": "short secret"})
    assert "secret" not in str(caught.value)
    assert "s3cret-s3cret-s3cret" not in repr(from_env({"API_TOKEN": "s3cret-s3cret-s3cret"}))


def test_a_redis_password_never_shows():
    with pytest.raises(ConfigError) as caught:
        from_env({"STORE": "redis://user:hunter2@cache:6379/nope"})
    assert "hunter2" not in str(caught.value)
    assert "<credentials not shown>" in str(caught.value)
    assert "hunter2" not in repr(from_env({"STORE": "redis://:hunter2@cache", "REDIS_PASSWORD": "hunter2"}))
    with pytest.raises(ConfigError) as caught:
        from_env({"STORE": "rediss://:hunter2@cache/0?socket_timeout=abc"})
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize(
    "store",
    [
        "redis://:hunter/2pass@127.0.0.1:6380/0",  # a "/" in the password: the parser quoted "hunter" as the port
        "redis://127.0.0.1:abc/0?password=hunter2pass",
        "redis://cache/0?Password=hunter2pass&socket_timeout=abc",
        "redis:/:hunter2pass@127.0.0.1/0",
        "redis://user:hunter@2pass/w0rd@cache:6379/nope",
        "redis://127.0.0.1:6390/0?password=hunter2pass&foo=1",
        "redis://:hunter#2pass@127.0.0.1:6390/0",
        "redis://:hunter?2pass@127.0.0.1:6390/0",
        "redis://:hunter+2pass/w0rd@127.0.0.1:6390/0",  # base64
    ],
)
def test_a_redis_password_never_shows_in_a_malformed_url(store):
    # Each was printed whole, or its pieces quoted by the parser's reason.
    with pytest.raises(ConfigError) as caught:
        from_env({"STORE": store})
    message = str(caught.value)
    assert message.startswith("STORE=")
    for piece in ("hunter", "2pass", "w0rd"):
        assert piece not in message


@pytest.mark.parametrize("password", ["Redis", "cast", "abc", "URL"])
def test_a_redis_url_s_error_is_the_same_whatever_its_password(password):
    # The password was hidden wherever it was a word of the reason: "is not a <not shown> URL" told it.
    with pytest.raises(ConfigError) as caught:
        from_env({"STORE": f"redis://u:{password}@127.0.0.1:abc/0"})
    assert str(caught.value) == (
        "STORE='redis://<credentials not shown>@127.0.0.1:abc/0' is invalid: is not a Redis URL: Port could not be"
        " cast to integer value as 'abc'"
    )


@pytest.mark.parametrize("password", ["sec/ret", "sec#ret", "sec?ret", "sec@ret/x"])
def test_a_redis_password_with_a_delimiter_unencoded_is_told_to_be_percent_encoded(password):
    with pytest.raises(ConfigError) as caught:
        from_env({"STORE": f"redis://u1:{password}@127.0.0.1:6390/0"})
    message = str(caught.value)
    assert message.endswith(f"is invalid: {config.ENCODE_CREDENTIALS}")
    assert "ret" not in message
    # Percent-encoded, it is taken (and decoded by redis-py).
    encoded = f"redis://u1:{quote(password, safe='')}@127.0.0.1:6390/0"
    assert from_env({"STORE": encoded}).store.url == encoded


# redis-py keeps the text of the value: "no" (or "false") decoded too.
@pytest.mark.parametrize(
    "option",
    ["decode_responses=true", "decode_responses=1&socket_timeout=2", "decode_responses=no"],
)
def test_a_redis_url_asking_for_decoded_answers_is_refused(option):
    # It passed: tasks were accepted and never ran (each claim failed decoding), and reads of a task answered 500.
    with pytest.raises(ConfigError) as caught:
        from_env({"STORE": f"redis://cache:6379/0?{option}"})
    assert str(caught.value) == (
        f"STORE='redis://cache:6379/0?{option}' is invalid: is not a Redis URL: decode_responses is not supported: "
        "the store reads Redis' answers as bytes"
    )


def test_every_variable_has_a_bad_value_case():
    assert {variable for variable, _, _ in BAD_VALUES} == set(VARIABLES)


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"WORK_MIN_MS": "600"}, "WORK_MIN_MS=600 is invalid: must not exceed WORK_MAX_MS=500"),
        ({"WORK_MIN_MS": "50", "WORK_MAX_MS": "40"}, "WORK_MIN_MS=50 is invalid: must not exceed WORK_MAX_MS=40"),
        ({"BACKOFF_BASE_MS": "20000"}, "BACKOFF_BASE_MS=20000 is invalid: must not exceed BACKOFF_CAP_MS=10000"),
        ({"BACKOFF_CAP_MS": "50"}, "BACKOFF_BASE_MS=100 is invalid: must not exceed BACKOFF_CAP_MS=50"),
        ({"DEFAULT_MAX_RETRIES": "21"}, "DEFAULT_MAX_RETRIES=21 is invalid: must not exceed MAX_RETRIES_LIMIT=20"),
        ({"MAX_RETRIES_LIMIT": "2"}, "DEFAULT_MAX_RETRIES=3 is invalid: must not exceed MAX_RETRIES_LIMIT=2"),
    ],
)
def test_settings_that_contradict_each_other_are_refused(environ, message):
    with pytest.raises(ConfigError, match=f"^{message}$"):
        from_env(environ)


def test_the_body_limit_may_be_lowered_alone():
    # The payload limit above it is harmless: a body that long is refused with 413 first.
    config = from_env({"MAX_BODY_BYTES": "1024"})
    assert (config.max_body_bytes, config.max_payload_chars) == (1024, 32_768)


def test_a_sqlite_path_is_kept_as_written():
    assert from_env({"STORE": "sqlite:///srv/../srv/tasks.db"}).store.path == "/srv/../srv/tasks.db"


def test_only_a_store_other_processes_can_reach_is_shared():
    assert not Config().store.shared
    assert from_env({"STORE": "sqlite:///t.db"}).store.shared


def test_unrelated_variables_are_ignored():
    assert from_env({"PATH": "/bin", "workers": "0", "WORKERS_X": "zero"}) == Config()


# -- .env and the real environment ---------------------------------------------


def test_the_example_env_file_documents_every_variable_at_its_default():
    values = dotenv_values(PROJECT_ROOT / ".env.example")
    assert set(values) == set(VARIABLES)
    assert from_env(values) == Config()


def test_dotenv_fills_in_and_the_real_environment_wins(tmp_path, monkeypatch):
    dotenv = tmp_path / ".env"
    dotenv.write_text("WORKERS=7\nQUEUE_SIZE=9\n# a comment\nLOG_LEVEL=debug\n")
    monkeypatch.setenv("QUEUE_SIZE", "11")
    loaded = config.load(dotenv)
    assert (loaded.workers, loaded.queue_size, loaded.log_level) == (7, 11, "DEBUG")


@pytest.mark.parametrize(
    ("line", "token"),
    [
        ("API_TOKEN=abcdefgh${HOME}ijkl\n", "abcdefgh${HOME}ijkl"),
        ("API_TOKEN='abcdefghijklmnop${UNSET_NAME}yz'\n", "abcdefghijklmnop${UNSET_NAME}yz"),
        ('API_TOKEN="abcdefghijklmnop${HOME}yz"\n', "abcdefghijklmnop${HOME}yz"),
    ],
)
def test_a_dotenv_value_is_taken_as_written_without_expanding_names(tmp_path, monkeypatch, line, token):
    # ${NAME} was replaced by the environment's value (or nothing): the service ran with another token.
    monkeypatch.setenv("HOME", "/root")
    monkeypatch.delenv("UNSET_NAME", raising=False)
    dotenv = tmp_path / ".env"
    dotenv.write_text(line)
    assert config.load(dotenv).api_token == token


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("WORKERS=2\nWORKERS 5\n", 2),
        ("# settings\n\n\nQUEUE_SIZE: 9\nWORKERS=2\n", 4),
        ("API_TOKEN secret-value\n", 1),
        # A bare name, which python-dotenv reads as a variable without a value: its setting would be lost.
        ("WORKERS\n", 1),
        ("QUEUE_SIZE=9\n\n# workers\nexport WORKERS\n", 4),
        ("WORKERS # eight\n", 1),
    ],
)
def test_a_malformed_dotenv_line_stops_start_up_naming_the_line(tmp_path, capsys, text, line):
    dotenv = tmp_path / ".env"
    dotenv.write_text(text)
    with pytest.raises(SystemExit) as caught:
        config.load(dotenv)
    assert caught.value.code == 2
    assert capsys.readouterr().err == f"configuration error: {dotenv} line {line} is not VARIABLE=value\n"


@pytest.mark.parametrize(
    ("text", "line", "refused"),
    [
        ("WORKERS=2\nWORKER=16\n", 2, "'WORKER' is not a setting (did you mean WORKERS?)"),
        ("# sizes\n\nQUEUE_SZE=5000\n", 3, "'QUEUE_SZE' is not a setting (did you mean QUEUE_SIZE?)"),
        ("shutdown_timeout_s=60\n", 1, "'shutdown_timeout_s' is not a setting (did you mean SHUTDOWN_TIMEOUT_S?)"),
        ("GREETING=hello\n", 1, "'GREETING' is not a setting"),
    ],
)
def test_a_dotenv_name_that_is_no_setting_stops_start_up_naming_the_line(tmp_path, capsys, text, line, refused):
    # It was dropped, and the service ran on the default without a word.
    dotenv = tmp_path / ".env"
    dotenv.write_text(text)
    with pytest.raises(SystemExit) as caught:
        config.load(dotenv)
    assert caught.value.code == 2
    assert capsys.readouterr().err == (
        f"configuration error: {dotenv} line {line}: {refused}: .env.example lists every variable\n"
    )


@pytest.mark.parametrize(
    ("text", "variable", "first", "again"),
    [
        # An appended blank token would otherwise have won and opened the task endpoints.
        ("PORT=18099\nAPI_TOKEN=abcdefghijklmnopqrstuv\nAPI_TOKEN=\n", "API_TOKEN", 2, 3),
        ("WORKERS=5\n# more\n\nexport WORKERS=7\n", "WORKERS", 1, 4),
        ("QUEUE_SIZE=9\nQUEUE_SIZE=9\n", "QUEUE_SIZE", 1, 2),
    ],
)
def test_a_dotenv_variable_set_twice_stops_start_up_naming_both_lines(tmp_path, capsys, text, variable, first, again):
    dotenv = tmp_path / ".env"
    dotenv.write_text(text)
    with pytest.raises(SystemExit) as caught:
        config.load(dotenv)
    assert caught.value.code == 2
    assert capsys.readouterr().err == (
        f"configuration error: {dotenv} line {again} sets {variable} again (first set on line {first}): "
        "only one would count; keep the line meant\n"
    )


def test_a_dotenv_may_hold_the_variables_docker_compose_reads_from_it(tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("COMPOSE_PROJECT_NAME=workerpool\nWORKERS=3\n")
    assert config.load(dotenv).workers == 3


def test_a_dotenv_file_that_is_not_utf8_stops_start_up_naming_the_line(tmp_path, capsys):
    dotenv = tmp_path / ".env"
    dotenv.write_bytes(b"WORKERS=2\n# caf\xe9 (latin-1)\nQUEUE_SIZE=9\n")
    with pytest.raises(SystemExit) as caught:
        config.load(dotenv)
    assert caught.value.code == 2
    assert capsys.readouterr().err == f"configuration error: {dotenv} line 2 is not UTF-8 text\n"


@pytest.mark.parametrize("kind", ["directory", "dangling-link"])
def test_a_dotenv_that_is_not_a_file_stops_start_up_naming_it(tmp_path, capsys, kind):
    # It was taken for no .env: the settings meant for it (API_TOKEN, STORE...) silently left at their defaults.
    dotenv = tmp_path / ".env"
    if kind == "directory":
        dotenv.mkdir()  # what a bind mount of a missing file makes
        why = "is a directory"
    else:
        dotenv.symlink_to(tmp_path / "secrets" / ".env")
        why = f"is a link to {tmp_path / 'secrets' / '.env'}, which does not exist"
    with pytest.raises(SystemExit) as caught:
        config.load(dotenv)
    assert caught.value.code == 2
    assert capsys.readouterr().err == (
        f"configuration error: {dotenv} {why}: the settings in it cannot be read (remove it, or make it a file)\n"
    )


def test_a_missing_dotenv_file_means_defaults(tmp_path):
    assert config.load(tmp_path / "absent.env") == Config()


def test_load_reads_the_project_env_file_by_default():
    assert DOTENV_PATH == PROJECT_ROOT / ".env"
    assert inspect.signature(config.load).parameters["dotenv_path"].default == DOTENV_PATH


def test_git_ignores_the_env_file_and_keeps_the_example():
    ignored = (PROJECT_ROOT / ".gitignore").read_text().splitlines()
    assert ".env" in ignored and ".env.example" not in ignored


def test_load_exits_2_with_one_line(monkeypatch, capsys):
    monkeypatch.setenv("WORKERS", "-1")
    with pytest.raises(SystemExit) as caught:
        config.load(None)
    assert caught.value.code == 2
    assert capsys.readouterr().err == "configuration error: WORKERS='-1' is invalid: must be an integer from 1 to 256\n"


@pytest.mark.parametrize(
    ("variable", "text"),
    [("WORKERS", "0"), ("QUEUE_SIZE", "0"), ("FAILURE_RATE", "1.5"), ("PORT", "eighty")],
)
def test_a_bad_value_stops_a_process_at_start_up(tmp_path, variable, text):
    result = subprocess.run(
        [sys.executable, "-c", "import config; config.load(); print('started')"],
        cwd=tmp_path,  # the project .env is found from config.py, not from the working directory
        env=clean_environment(**{variable: text}, PYTHONPATH=str(PROJECT_ROOT)),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"configuration error: {variable}={text!r} is invalid: ")


@pytest.mark.parametrize("token", ["   ", "short-secret"])
def test_a_blank_or_short_token_stops_a_process_at_start_up_without_showing_it(tmp_path, token):
    result = subprocess.run(
        [sys.executable, "-c", "import config; config.load(); print('started')"],
        cwd=tmp_path,
        env=clean_environment(API_TOKEN=token, PYTHONPATH=str(PROJECT_ROOT)),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (result.returncode, result.stdout) == (2, "")
    shown = f"<{len(token)} characters, not shown>"
    assert result.stderr == f"configuration error: API_TOKEN={shown} is invalid: {TOKEN_RULE}\n"


def test_the_readme_documents_every_variable():
    readme = (PROJECT_ROOT / "README.md").read_text()
    for name in VARIABLES:
        assert f"| `{name}` |" in readme, name


# -- gunicorn's worker recycling (--max-requests) --------------------------------------

SHARED = Config(store=StoreSetting("sqlite", "/var/lib/tasks.db"))


def test_recycling_workers_that_forget_their_tasks_is_refused():
    with pytest.raises(ConfigError) as caught:
        config.check_worker_recycling(Config(), 50)
    assert str(caught.value).startswith("--max-requests 50 would restart the")
    assert "with STORE=memory each restart forgets every task it accepted" in str(caught.value)


def test_recycling_is_taken_with_a_shared_store_whose_replacement_serves_the_same_tasks():
    config.check_worker_recycling(SHARED, 50)  # with one process too: its replacement starts as it drains
    config.check_worker_recycling(Config(), 0)  # gunicorn.conf.py's own: no recycling


def test_a_start_up_line_takes_log_format_from_the_environment_over_dotenv(tmp_path, monkeypatch):
    dotenv = tmp_path / ".env"
    dotenv.write_text("LOG_FORMAT=json\n")
    monkeypatch.delenv("LOG_FORMAT", raising=False)
    line = json.loads(config.startup_line("configuration error: x", dotenv_path=dotenv))
    assert (line["level"], line["logger"], line["message"]) == ("ERROR", "config", "configuration error: x")
    monkeypatch.setenv("LOG_FORMAT", "TEXT")
    assert config.startup_line("configuration error: x", dotenv_path=dotenv) == "configuration error: x"


@pytest.mark.parametrize("dotenv_text", ["LOG_FORMAT=xml\n", "LOG_FORMAT=json\nWORKERS\n"], ids=["invalid", "bad-line"])
def test_a_start_up_line_is_text_when_log_format_cannot_be_read(tmp_path, monkeypatch, dotenv_text):
    """An invalid LOG_FORMAT means text; a .env that cannot be read leaves the environment's value alone."""
    dotenv = tmp_path / ".env"
    dotenv.write_text(dotenv_text)
    monkeypatch.delenv("LOG_FORMAT", raising=False)
    assert config.startup_line("configuration error: x", dotenv_path=dotenv) == "configuration error: x"
    monkeypatch.setenv("LOG_FORMAT", "json")
    assert json.loads(config.startup_line("configuration error: x", dotenv_path=dotenv))["message"] == (
        "configuration error: x"
    )


def test_a_json_start_up_line_keeps_line_separators_escaped(monkeypatch):
    monkeypatch.setenv("LOG_FORMAT", "json")
    line = config.startup_line("configuration error: HOST='a\u2028b\x85c'", dotenv_path=None)
    assert len(line.splitlines()) == 1
    assert json.loads(line)["message"] == "configuration error: HOST='a\u2028b\x85c'"


@pytest.mark.parametrize(
    ("environ", "expected"),
    [({}, None), ({"WEB_CONCURRENCY": " 3 "}, 3), ({"WEB_CONCURRENCY": "1"}, 1), ({"WEB_CONCURRENCY": "256"}, 256)],
)
def test_web_concurrency_is_a_count_of_processes_or_none(environ, expected):
    assert config.web_concurrency(environ) == expected


@pytest.mark.parametrize("variable", ["WORKERS", "PORT", "WEB_CONCURRENCY"])
def test_an_integer_of_thousands_of_digits_is_out_of_range_shown_by_its_beginning(variable):
    # int() refused more than 4300 digits with the interpreter's message: "use sys.set_int_max_str_digits()".
    parse = config.web_concurrency if variable == "WEB_CONCURRENCY" else from_env
    allowed = {"WORKERS": "1 to 256", "PORT": "0 to 65535", "WEB_CONCURRENCY": "1 to 256"}[variable]
    with pytest.raises(ConfigError) as raised:
        parse({variable: "1" * 5000})
    assert str(raised.value) == (
        f"{variable}='{'1' * config.SHOWN_CHARS}'... (5000 characters) is invalid: {INTEGER} {allowed}"
        + (" (or unset)" if variable == "WEB_CONCURRENCY" else "")
    )


@pytest.mark.parametrize(
    ("text", "port"), [("0" * 4301 + "8080", 8080), ("+" + "0" * 5000 + "8080", 8080), ("-" + "0" * 5000, 0)]
)
def test_an_integer_written_with_thousands_of_leading_zeros_is_its_value(text, port):
    assert from_env({"PORT": text}).port == port


@pytest.mark.parametrize(
    "environ",
    [
        {"WEB_CONCURRENCY": "257"},
        {"WEB_CONCURRENCY": "0"},  # gunicorn would listen with no process to answer
        {"WEB_CONCURRENCY": "2_0"},
        {"WEB_CONCURRENCY": "0x10"},
        {"LISTEN_FDS": ""},
        {"FORWARDED_ALLOW_IPS": "10.0.0.1/8"},
        # gunicorn compares SCRIPT_NAME with the raw request path: no path begins with these, every request failed.
        {"SCRIPT_NAME": "wp"},
        {"SCRIPT_NAME": "/w p"},
        {"SCRIPT_NAME": "/caf\u00e9"},
        {"SCRIPT_NAME": "/caf%C3%A9"},
        {"SCRIPT_NAME": "/wp?x"},
        {"SCRIPT_NAME": " /wp"},
    ],
)
def test_a_variable_gunicorn_would_fail_on_is_refused_naming_it(environ):
    with pytest.raises(ConfigError, match=f"^{next(iter(environ))}="):
        config.check_gunicorn_environment(environ)


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"LISTEN_FDS": "2", "LISTEN_PID": "1"},
        {"FORWARDED_ALLOW_IPS": "*"},
        {"FORWARDED_ALLOW_IPS": " "},
        {"FORWARDED_ALLOW_IPS": "127.0.0.1, ::1,10.0.0.0/8,"},
        {"SCRIPT_NAME": ""},
        {"SCRIPT_NAME": "/wp"},
        {"SCRIPT_NAME": "/wp/"},
        {"SCRIPT_NAME": "/a/b-c_d.e~f:g@h!$&'()*+,;="},
    ],
)
def test_values_gunicorn_takes_are_taken(environ):
    config.check_gunicorn_environment(environ)


@pytest.mark.parametrize(
    ("raw_env", "named"),
    [
        (["API_TOKEN=SeCrEtToKeN-abcdef-123456"], "-e API_TOKEN=... would not be taken"),
        (["WORKERS=3", "OTHER=1", "WORKERS=4", "STORE= sqlite:///x"], "-e WORKERS=..., -e STORE=... would not"),
        (["WEB_CONCURRENCY=4"], "-e WEB_CONCURRENCY=... would not"),  # gunicorn itself read it before
        ([" LOG_FORMAT =json"], "-e LOG_FORMAT=... would not"),
    ],
)
def test_a_setting_given_to_gunicorns_env_option_is_refused_naming_it_not_its_value(raw_env, named):
    with pytest.raises(ConfigError) as raised:
        config.check_env_options(raw_env)
    assert str(raised.value).startswith(named)
    assert "SeCrEt" not in str(raised.value) and "sqlite" not in str(raised.value)


@pytest.mark.parametrize("raw_env", [[], ["HANDLER_URL=http://x"], ["NO_EQUALS_SIGN"], ["workers=3"]])
def test_variables_of_others_given_to_gunicorns_env_option_are_taken(raw_env):
    config.check_env_options(raw_env)


@pytest.mark.parametrize(
    ("raw_env", "said"),
    [
        (["SCRIPT_NAME=wp"], "-e SCRIPT_NAME='wp' is invalid: must begin with /"),
        (["SCRIPT_NAME=/wp", "SCRIPT_NAME=/w p"], "-e SCRIPT_NAME='/w p' is invalid"),  # the last one wins, as gunicorn
        (["LISTEN_FDS=abc"], "-e LISTEN_FDS='abc' is invalid: must be an integer"),
        (["OTHER=1", "LISTEN_PID=x"], "-e LISTEN_PID='x' is invalid: must be an integer"),
    ],
)
def test_a_variable_gunicorn_reads_itself_given_to_its_env_option_is_checked_as_from_the_environment(raw_env, said):
    # gunicorn sets them after the start checks: SCRIPT_NAME=wp served an error for every request, LISTEN_FDS=abc
    # ended the start in a traceback, exit code 1.
    with pytest.raises(ConfigError) as raised:
        config.check_gunicorn_env_options(raw_env)
    assert str(raised.value).startswith(said)


@pytest.mark.parametrize(
    "raw_env", [[], ["SCRIPT_NAME=/wp"], ["SCRIPT_NAME=wp", "SCRIPT_NAME=/wp"], ["LISTEN_FDS=2", "NO_EQUALS_SIGN"]]
)
def test_good_values_of_variables_gunicorn_reads_itself_given_to_its_env_option_are_taken(raw_env):
    config.check_gunicorn_env_options(raw_env)


@pytest.mark.parametrize("text", ["2_0", "\u0661\u0660", "\uff12", "1e", ".", "0x10", "infinity", "1,5"])
@pytest.mark.parametrize("variable", ["SHUTDOWN_TIMEOUT_S", "LEASE_S", "FAILURE_RATE"])
def test_a_number_setting_takes_decimal_numbers_only(variable, text):
    """float() took 2_0 for 20 and other scripts' digits (١٠ for 10): a typo became another duration."""
    with pytest.raises(ConfigError, match=f"^{variable}="):
        from_env({variable: text})


@pytest.mark.parametrize(("text", "value"), [("20", 20.0), ("2.5", 2.5), (".5", 0.5), ("5.", 5.0), ("1e1", 10.0)])
def test_a_number_setting_takes_the_usual_decimal_spellings(text, value):
    assert from_env({"SHUTDOWN_TIMEOUT_S": text}).shutdown_timeout_s == value


@pytest.mark.parametrize("variable", ["API_TOKEN", "TASK_HANDLER", "REDIS_PASSWORD", "METRICS_DIR"])
@pytest.mark.parametrize("blank", ["", "  "])
def test_an_empty_variable_in_the_environment_does_not_silently_override_dotenv(tmp_path, monkeypatch, variable, blank):
    """API_TOKEN= in the environment dropped .env's token without a word: the task endpoints were open."""
    dotenv = tmp_path / ".env"
    dotenv.write_text(f"{variable}=abcdefghijklmnopqrstuv\n")
    monkeypatch.setenv(variable, blank)
    with pytest.raises(ConfigError) as caught:
        config.read_environment(dotenv)
    assert str(caught.value) == (
        f"{variable} is set but empty in the environment, which would override the value {dotenv} gives it: "
        "unset it there, or set it to the value meant"
    )
    assert "abcdefghijklmnopqrstuv" not in str(caught.value)


def test_an_empty_variable_in_the_environment_is_taken_where_dotenv_is_empty_or_silent(tmp_path, monkeypatch):
    dotenv = tmp_path / ".env"
    dotenv.write_text("API_TOKEN=\n")
    monkeypatch.setenv("API_TOKEN", "")
    monkeypatch.setenv("TASK_HANDLER", "")
    assert config.from_env(config.read_environment(dotenv)).api_token == ""
    monkeypatch.setenv("API_TOKEN", "abcdefghijklmnopqrstuv")  # a value, not a blank, wins as ever
    dotenv.write_text("API_TOKEN=zyxwvutsrqponmlkjihgf\n")
    assert config.from_env(config.read_environment(dotenv)).api_token == "abcdefghijklmnopqrstuv"
