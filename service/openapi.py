"""The OpenAPI 3.1 description of the API, with the limits and the security of one instance filled in."""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from werkzeug.urls import iri_to_uri

from config import Config

SPEC_PATH = Path(__file__).resolve().parent.parent / "openapi.yaml"
BEARER_SCHEME = "bearerAuth"  # in components.securitySchemes


@cache
def _spec_file() -> dict[str, Any]:
    """``openapi.yaml`` as written: the description of an instance with the default configuration."""
    return yaml.safe_load(SPEC_PATH.read_text(encoding="utf-8"))


def openapi_spec(config: Config, root_path: str = "") -> dict[str, Any]:
    """``openapi.yaml`` with the configured limits and security in place of what it was written with.

    Only values that vary between instances are replaced, so the served
    document is true for the instance that serves it: its server URL is the
    root path it is served under (``SCRIPT_NAME``), ``/`` without one.
    """
    spec = copy.deepcopy(_spec_file())
    spec["servers"][0]["url"] = root_path.rstrip("/") + "/"
    _locations_under(spec, root_path.rstrip("/"))
    spec["paths"]["/enqueue"]["post"]["requestBody"]["x-max-body-bytes"] = config.max_body_bytes
    spec["paths"]["/enqueue/batch"]["post"]["requestBody"]["x-max-body-bytes"] = config.max_batch_body_bytes
    spec["components"]["schemas"]["EnqueueBatchRequest"]["properties"]["tasks"]["maxItems"] = config.max_batch_tasks
    fields = spec["components"]["schemas"]["EnqueueRequest"]["properties"]
    fields["payload"]["x-max-chars"] = config.max_payload_chars
    fields["payload"]["anyOf"][0]["maxLength"] = config.max_payload_chars
    fields["max_retries"]["maximum"] = config.max_retries_limit
    fields["max_retries"]["default"] = config.default_max_retries
    fields["delay_ms"]["maximum"] = config.max_delay_ms
    _keep_the_security_that_holds(spec, token_set=bool(config.api_token))
    return spec


def _locations_under(spec: dict[str, Any], root: str) -> None:
    """Make the patterns of task URLs (``^/tasks/``) begin with the root path, as every ``Location`` does.

    The header is percent-encoded, the batch's ``location`` is not (a root
    path from a proxy's ``SCRIPT_NAME`` header may hold characters to encode).
    """
    if not root:
        return
    header, body = _starts_with(iri_to_uri(root) + "/tasks/"), _starts_with(root + "/tasks/")
    for status in ("202", "409"):
        spec["paths"]["/enqueue"]["post"]["responses"][status]["headers"]["Location"]["schema"]["pattern"] = header
    for branch in spec["components"]["schemas"]["BatchResult"]["oneOf"]:
        branch["properties"]["location"]["pattern"] = body


def _starts_with(prefix: str) -> str:
    """A pattern (ECMA-262, as JSON Schema's) of the strings that begin with ``prefix``.

    ``re.escape`` also escapes characters such as ``-`` and ``~``, which an
    ECMA-262 pattern in Unicode mode refuses: only the syntax characters are.
    """
    return "^" + "".join("\\" + char if char in _SYNTAX_CHARACTERS else char for char in prefix)


_SYNTAX_CHARACTERS = frozenset("^$\\.*+?()[]{}|")


def _keep_the_security_that_holds(spec: dict[str, Any], *, token_set: bool) -> None:
    """Narrow each guarded operation's "no token, or bearerAuth" to the one this instance applies.

    Offering both would let clients (and fuzzers) believe the token optional on an
    instance that requires it; a 401 is documented only where it can happen.
    """
    for item in spec["paths"].values():
        for operation in item.values():
            if not operation.get("security"):  # open on every instance: say so (linters ask)
                operation["security"] = []
                continue
            if token_set:
                operation["security"] = [{BEARER_SCHEME: []}]
            else:
                operation["security"] = []
                del operation["responses"]["401"]
    if not token_set:  # nothing refers to them any more (linters flag unused components)
        components = spec["components"]
        del components["securitySchemes"]
        del components["responses"]["Unauthorized"]
        if not components["responses"]:
            del components["responses"]
