"""Instructions per task of the engine, counted by callgrind: repeatable on a loaded machine, unlike tasks/s.

``python -m bench.engine_instructions [--tasks N] [--small M] [NAME ...]`` runs each driver (the names of
``DRIVERS``) in a fresh interpreter under ``valgrind --tool=callgrind`` twice, with ``N`` and with ``M``
tasks, and prints the difference of the two totals divided by ``N - M``: what one more task costs, start-up,
imports and the pool's threads starting and stopping left out. Every thread of the process is counted.
``pool`` is figure 3 as run (``bench/engine.py:pool_throughput``: 4 worker threads); how often its workers
find the queue empty and wait depends on how valgrind schedules the threads, so its count moves by 1-2 %
between runs. ``serial`` (``serial_steps``, one thread) and ``submit`` (submissions alone) repeat to 0.1 %.
Not part of ``make bench``: a tool to compare versions of the engine (a run takes minutes).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from .server import ROOT

DRIVERS = {
    "pool": "from bench.engine import pool_throughput\npool_throughput({n})",
    "serial": "from bench.engine import serial_steps\nserial_steps({n})",
    "submit": (
        "import gc\nfrom bench.engine import noop\nfrom workerpool import WorkerPool\n"
        "pool = WorkerPool(noop, workers=1, queue_size={n}, state_max_tasks={n}, threads=False)\n"
        "ids = [f'task-{{i}}' for i in range({n})]\ngc.collect()\nfor task_id in ids:\n    pool.submit(task_id)"
    ),
}
_TOTALS = re.compile(r"^(?:summary|totals): (\d+)", re.MULTILINE)


def instructions(name: str, tasks: int) -> int:
    """Callgrind's total for the whole process running driver ``name`` over ``tasks`` tasks."""
    with tempfile.TemporaryDirectory(prefix="bench-engine-instructions-") as tmp:
        out = Path(tmp) / "callgrind.out"
        subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, "-c",
             DRIVERS[name].format(n=tasks)],
            cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        match = _TOTALS.search(out.read_text(errors="replace"))
        if match is None:
            raise RuntimeError(f"callgrind wrote no total for {name}")
        return int(match.group(1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=list(DRIVERS), help=f"drivers to count ({', '.join(DRIVERS)})")
    parser.add_argument("--tasks", type=int, default=20_000, help="tasks of the longer run")
    parser.add_argument("--small", type=int, default=2_000, help="tasks of the shorter run")
    parser.add_argument("--rounds", type=int, default=1)
    options = parser.parse_args(argv)
    if not 0 < options.small < options.tasks:
        parser.error("need 0 < --small < --tasks")
    for round_no in range(options.rounds):
        for name in options.names:
            extra = instructions(name, options.tasks) - instructions(name, options.small)
            print(
                f"round {round_no + 1} {name:6} {extra / (options.tasks - options.small):10,.0f} instructions/task",
                flush=True,
            )


if __name__ == "__main__":
    main()
