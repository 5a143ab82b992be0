"""How deeply a result may nest, and what a stored result nested deeper reads as."""

from __future__ import annotations

import json
import re
from typing import Any

# Deepest nesting of lists and objects a result may have. Reading a task decodes (SQLite, Redis) and
# encodes its result on a request thread many frames deeper than the worker that checked it: a
# result just under what the worker could encode made every read of the task, and every listing
# holding it, fail. Half the interpreter's default recursion limit leaves that margin.
MAX_RESULT_DEPTH = 500

_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_INNERMOST = re.compile(r"[\[{][\]}]")  # an empty list or object, once all else is gone
# The shortest JSON text nested more than MAX_RESULT_DEPTH deep is that many brackets, each closed: a
# shorter one is known not to, without a call (most results and payloads are shorter).
SHORTEST_TOO_DEEP = 2 * (MAX_RESULT_DEPTH + 1)


def nested_deeper_than(text: str, limit: int) -> bool:
    """Whether the lists and objects of JSON ``text`` nest more than ``limit`` deep (strings' contents do not count)."""
    if text.count("[") + text.count("{") <= limit:  # fewer brackets (inside strings too) cannot nest deeper
        return False
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    # Each round takes away the innermost level: a result a few levels deep takes a few rounds.
    for _ in range(limit):
        if not brackets:
            return False
        brackets = _INNERMOST.sub("", brackets)
    return bool(brackets)


class UnreadableResult(dict):  # type: ignore[type-arg]
    """What a task's result reads as when its store holds one nested more than ``MAX_RESULT_DEPTH`` deep.

    Only a release older than that limit could store one: decoding it, or encoding it for a client,
    may exceed the interpreter's recursion limit on a request thread. A JSON object with one key,
    ``unreadable_result``, saying so; the pool logs it once per task (``WorkerPool.get``, ``list``).
    """

    def __init__(self) -> None:
        super().__init__(
            unreadable_result=f"the stored result is nested more than {MAX_RESULT_DEPTH} levels deep"
            " (kept by an older release): it is not served"
        )


def stored_result(text: str) -> Any:
    """A result as a store holds it (JSON text), decoded; an ``UnreadableResult`` if it nests too deeply."""
    if len(text) >= SHORTEST_TOO_DEEP and nested_deeper_than(text, MAX_RESULT_DEPTH):
        return UnreadableResult()
    return json.loads(text)
