"""The OpenAPI file and both served variants pass openapi-spec-validator and Redocly's recommended rules."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess

import pytest
import yaml
from http_fixtures import PROJECT_ROOT, TEST_CONFIG
from openapi_spec_validator import validate

from service.openapi import SPEC_PATH, openapi_spec

REDOCLY = PROJECT_ROOT / "node_modules" / ".bin" / "redocly"
DOCUMENTS = {
    "file": lambda: yaml.safe_load(SPEC_PATH.read_text(encoding="utf-8")),
    "served without a token": lambda: openapi_spec(TEST_CONFIG),
    "served with a token": lambda: openapi_spec(dataclasses.replace(TEST_CONFIG, api_token="lint-token-0123456789")),
}


@pytest.mark.parametrize("document", DOCUMENTS.values(), ids=DOCUMENTS.keys())
def test_openapi_spec_validator_accepts_it(document):
    validate(document())


@pytest.mark.slow
def test_redocly_recommended_rules_find_no_error_and_no_unused_component(tmp_path):
    assert REDOCLY.exists(), "Redocly's CLI is missing: `make test` installs it with npm"
    paths = []
    for name, document in DOCUMENTS.items():
        path = tmp_path / (name.replace(" ", "-") + ".json")
        path.write_text(json.dumps(document()))
        paths.append(str(path))
    result = subprocess.run(
        [str(REDOCLY), "lint", "--format=summary", *paths],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "REDOCLY_TELEMETRY": "off", "REDOCLY_SUPPRESS_UPDATE_NOTICE": "true", "NO_COLOR": "1"},
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    assert "no-unused-components" not in report, report
