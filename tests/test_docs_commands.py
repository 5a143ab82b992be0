"""The ``make`` commands the README and docs/ show run as shown."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# `make run`, `PORT=9000 make run`, `make test`: a command in backticks whose words include `make`.
_COMMAND = re.compile(r"`((?:[A-Z_]+=\S+ )*make(?: [^`]*)?)`")


def _targets() -> set[str]:
    return set(re.findall(r"^([a-z][\w.-]*):", (ROOT / "Makefile").read_text(), re.MULTILINE))


def test_every_make_command_shown_names_a_target_and_passes_no_flags_to_make():
    targets = _targets()
    shown = [(doc.name, match) for doc in DOCS for match in _COMMAND.findall(doc.read_text())]
    assert shown
    for doc, command in shown:
        words = command.split()
        after = words[words.index("make") + 1 :]
        if not after:  # make itself, named in prose
            continue
        assert after[0] in targets, f"{doc}: `{command}` names no Makefile target"
        # make takes what follows the target as more targets or its own options (`--` included):
        # gunicorn's flags cannot be passed that way.
        assert all("=" in word for word in after[1:]), f"{doc}: `{command}` passes {after[1:]} to make"
