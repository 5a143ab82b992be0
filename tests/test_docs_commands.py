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
