"""The OpenAPI 3.1 description of the API, with the limits of one instance filled in."""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from config import Config

SPEC_PATH = Path(__file__).resolve().parent.parent / "openapi.yaml"


@cache
def _spec_file() -> dict[str, Any]:
    """``openapi.yaml`` as written: the description of an instance with the default configuration."""
    return yaml.safe_load(SPEC_PATH.read_text(encoding="utf-8"))


def openapi_spec(config: Config) -> dict[str, Any]:
    """``openapi.yaml`` with the configured limits in place of the defaults it was written with.

    Only values that vary between instances are replaced, so the served
    document is true for the instance that serves it.
    """
    spec = copy.deepcopy(_spec_file())
    spec["paths"]["/enqueue"]["post"]["requestBody"]["x-max-body-bytes"] = config.max_body_bytes
    fields = spec["components"]["schemas"]["EnqueueRequest"]["properties"]
    fields["payload"]["maxLength"] = config.max_payload_chars
    fields["max_retries"]["maximum"] = config.max_retries_limit
    fields["max_retries"]["default"] = config.default_max_retries
    return spec
