"""How deeply a result may nest, and what a stored result nested deeper reads as."""

from __future__ import annotations

import json
import operator
import re
from itertools import accumulate, count
from typing import Any

# Deepest nesting of lists and objects a result may have. Reading a task decodes (SQLite, Redis) and
# encodes its result on a request thread many frames deeper than the worker that checked it: a
# result just under what the worker could encode made every read of the task, and every listing
# holding it, fail. Half the interpreter's default recursion limit leaves that margin.
MAX_RESULT_DEPTH = 500

_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
# Outside its strings JSON text is ASCII. Each opening bracket becomes 2, each closing one 0, all else goes:
# the sum of the first k steps, less k, is the depth after the k-th bracket.
_DEPTH_STEPS = bytes.maketrans(b"[{]}", b"\x02\x02\x00\x00")
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
# The shortest JSON text nested more than MAX_RESULT_DEPTH deep is that many brackets, each closed: a
# shorter one is known not to, without a call (most results and payloads are shorter).
SHORTEST_TOO_DEEP = 2 * (MAX_RESULT_DEPTH + 1)


def nested_deeper_than(text: str, limit: int) -> bool:
    """Whether the lists and objects of JSON ``text`` nest more than ``limit`` deep (strings' contents do not count)."""
    if text.count("[") + text.count("{") <= limit:  # fewer brackets (inside strings too) cannot nest deeper
        return False
    # One pass over the text, in C, whatever the depth: a payload of many chains nested just under the
    # limit is valid, and a pass per level would make each such task cost hundreds of passes.
    steps = _JSON_STRING.sub("", text).encode("utf-8", "surrogatepass").translate(_DEPTH_STEPS, _NOT_BRACKETS)
    return max(map(operator.sub, accumulate(steps), count(1)), default=0) > limit


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
