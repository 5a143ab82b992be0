"""The ``make`` commands the README and docs/ show run as shown."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# `make run`, `PORT=9000 make run`, `GUNICORN_CMD_ARGS="--keep-alive 75" make run`, `make test`: a command in
# backticks whose words include `make`, after variables whose values may be quoted.
_COMMAND = re.compile(r"""`((?:[A-Z_]+=(?:"[^"`]*"|'[^'`]*'|[^\s`]+) )*make(?: [^`]*)?)`""")


def commands_in(text: str) -> list[str]:
    """The ``make`` commands shown in backticks in ``text``."""
    return _COMMAND.findall(text)


def _targets() -> set[str]:
    return set(re.findall(r"^([a-z][\w.-]*):", (ROOT / "Makefile").read_text(), re.MULTILINE))


def test_every_make_command_shown_names_a_target_and_passes_no_flags_to_make():
    targets = _targets()
    shown = [(doc.name, match) for doc in DOCS for match in commands_in(doc.read_text())]
    assert shown
    for doc, command in shown:
        words = shlex.split(command)
        after = words[words.index("make") + 1 :]
        if not after:  # make itself, named in prose
            continue
        assert after[0] in targets, f"{doc}: `{command}` names no Makefile target"
        # make takes what follows the target as more targets or its own options (`--` included):
        # gunicorn's flags cannot be passed that way.
        assert all("=" in word for word in after[1:]), f"{doc}: `{command}` passes {after[1:]} to make"


def test_a_command_after_a_variable_with_a_quoted_value_is_read_too():
    # docs/deployment.md shows `GUNICORN_CMD_ARGS="--keep-alive 75" make run`: the space in its value hid it.
    text = "Set `GUNICORN_CMD_ARGS=\"--keep-alive 75\" make run -- -x`, or `A='b c' make test`, `PORT=1 make run`."
    assert commands_in(text) == [
        'GUNICORN_CMD_ARGS="--keep-alive 75" make run -- -x',
        "A='b c' make test",
        "PORT=1 make run",
    ]
    assert commands_in("`cmake run`, `.venv/bin/python run_gunicorn.py --keep-alive 75`") == []


def _packages_installed_by(target: str) -> set[str]:
    """The Debian packages ``make target`` installs with apt-get (through its prerequisites' rules)."""
    text = (ROOT / "Makefile").read_text()
    variables = dict(re.findall(r"^([A-Z_]+) :?= (\S+)$", text, re.MULTILINE))
    rules = {}
    for match in re.finditer(r"^(\S+):(?!=)([^\n]*)\n((?:\t[^\n]*\n)*)", text, re.MULTILINE):
        name = re.sub(r"\$\((\w+)\)", lambda m: variables.get(m[1], m[0]), match[1])
        rules[name] = match[3]
    (prerequisites,) = re.findall(rf"^{target}:([^\n]*)", text, re.MULTILINE)
    packages = set()
    for prerequisite in prerequisites.split():
        recipe = rules.get(re.sub(r"\$\((\w+)\)", lambda m: variables.get(m[1], m[0]), prerequisite), "")
        for line in re.findall(r"apt-get install ([^)\n]*)", recipe):
            packages.update(word for word in line.split() if not word.startswith("-"))
    return packages


def test_the_quick_start_says_how_to_run_the_tests_and_what_make_test_installs_with_sudo():
    # The first screen showed `make run` only: `make test` then asked for sudo and installed packages unannounced.
    readme = (ROOT / "README.md").read_text()
    quick_start = readme[readme.index("## Quick start") : readme.index("## Contents")]
    packages = _packages_installed_by("test")
    assert packages >= {"chromium", "redis-server", "nginx", "npm"}, packages
    assert "`make test`" in quick_start and "minutes" in quick_start and "`sudo`" in quick_start
    assert all(f"`{package}`" in quick_start for package in packages), packages
