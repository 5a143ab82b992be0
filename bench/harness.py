"""What every figure shares: the run's settings, progress on stderr, the commands it ran, wrk."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .server import ROOT

LUA = "bench/enqueue.lua"
LUA_RETRY = "bench/enqueue_retry.lua"  # the same batches from a producer that honours Retry-After


@dataclass
class Run:
    """Settings of one bench run and what it collected for the report."""

    rounds: int = 5
    wrk_seconds: int = 10  # 5 s runs swung the enqueue ratios by +-10 % between rounds
    wrk_threads: int = 2
    wrk_connections: int = 16
    quick: bool = False
    commands: list[str] = field(default_factory=list)
    sections: dict[str, str] = field(default_factory=dict)  # figure title -> markdown
    summary: list[tuple[str, str, str, str]] = field(default_factory=list)  # figure, value, target, verdict
    started: float = field(default_factory=time.monotonic)

    def progress(self, message: str) -> None:
        print(f"[bench {time.monotonic() - self.started:6.1f}s] {message}", file=sys.stderr, flush=True)

    def record(self, command: str) -> None:
        if command not in self.commands:
            self.commands.append(command)

    def order(self, round_no: int, a: str, b: str) -> tuple[str, str]:
        """A B, then B A: alternating rounds cancel a linear drift of the machine."""
        return (a, b) if round_no % 2 == 0 else (b, a)

    def wrk(
        self,
        url: str,
        path: str,
        *,
        seconds: int | None = None,
        payload_bytes: int = 64,
        batch: int = 0,
        honour_retry: bool = False,
    ) -> dict:
        """One wrk run posting unique task ids to ``path`` (``batch`` tasks per request if given); returns the
        script's JSON summary. ``honour_retry``: each connection pauses for a batch answer's ``retry_after``."""
        seconds = seconds or self.wrk_seconds
        args = [
            "wrk",
            f"-t{self.wrk_threads}",
            f"-c{self.wrk_connections}",
            f"-d{seconds}s",
            "--timeout",
            "10s",
            "-s",
            LUA_RETRY if honour_retry else LUA,
            url,
            "--",
            path,
        ]
        template = " ".join(args).replace(url, "http://127.0.0.1:$PORT") + " <run-id>"
        extra = [str(payload_bytes), str(batch)] if batch else [str(payload_bytes)]
        if honour_retry:
            extra.append(str(self.wrk_connections // self.wrk_threads))
        self.record(template + (f" {' '.join(extra)}" if batch or payload_bytes != 64 else ""))
        run_id = uuid.uuid4().hex[:12]
        out = subprocess.run([*args, run_id, *extra], cwd=ROOT, capture_output=True, text=True, timeout=seconds + 60)
        for line in out.stdout.splitlines():
            if line.startswith("WRK_JSON "):
                return json.loads(line.removeprefix("WRK_JSON "))
        raise RuntimeError(f"wrk printed no summary (exit {out.returncode}):\n{out.stdout}\n{out.stderr}")

    def wrk_together(self, urls: list[str], path: str) -> dict:
        """One wrk run per url at once, the threads and connections shared out among them; their sums
        (``requests``, ``rps``, ``non_2xx_3xx``) and the worst ``p99_us``. One url: ``wrk`` as it is."""
        if len(urls) == 1:
            return self.wrk(urls[0], path)
        threads, connections = self.wrk_threads, self.wrk_connections
        self.wrk_threads, self.wrk_connections = max(1, threads // len(urls)), max(1, connections // len(urls))
        results: list[dict] = []
        try:
            runs = [threading.Thread(target=lambda url=url: results.append(self.wrk(url, path))) for url in urls]
            for run in runs:
                run.start()
            for run in runs:
                run.join()
        finally:
            self.wrk_threads, self.wrk_connections = threads, connections
        if len(results) < len(urls):
            raise RuntimeError("a wrk run of the group failed (see above)")
        return {
            "requests": sum(r["requests"] for r in results),
            "rps": sum(r["rps"] for r in results),
            "non_2xx_3xx": sum(r["non_2xx_3xx"] for r in results),
            "p99_us": max(r["p99_us"] for r in results),
        }


# -- profiles --------------------------------------------------------------------------------


def collapsed_self_time(path: Path, *, top: int = 12) -> list[tuple[str, float]]:
    """Share of samples per innermost function from py-spy's raw (collapsed) output."""
    counts: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():  # py-spy sometimes reads a torn frame name spanning lines
            continue
        frame = stack.rsplit(";", 1)[-1]
        counts[_short(frame)] += int(n)
        total += int(n)
    return [(name, n / total) for name, n in counts.most_common(top)] if total else []


def collapsed_inclusive(path: Path, names: dict[str, str]) -> list[tuple[str, float]]:
    """Share of samples whose stack contains each function; ``names`` maps label -> substring.

    A substring starting with ``leaf:`` is looked for in the innermost frame only: the function's
    own time, without what it calls (for middleware, which has the whole app under it).
    """
    hits: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():  # py-spy sometimes reads a torn frame name spanning lines
            continue
        total += int(n)
        leaf = stack.rsplit(";", 1)[-1]
        for label, needle in names.items():
            if needle.startswith("leaf:") and needle[5:] in leaf or needle in stack:
                hits[label] += int(n)
    return [(label, hits[label] / total if total else 0.0) for label in names]


def _short(frame: str) -> str:
    # "Thread.run (threading.py:982)" or "f (/abs/path/mod.py:12)" -> "f (mod.py:12)"
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    file, _, line = where.rpartition(":")
    parts = Path(file).parts
    short = "/".join(parts[-2:]) if len(parts) > 1 else file
    return f"{name} ({short}:{line})" if file else name


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def pickup_latencies(submitter, worker: subprocess.Popen, tasks: int, gap: float) -> tuple[float, float, float]:
    """Admit ``tasks`` one at a time, ``gap`` s apart, through ``submitter`` (a store without workers) while
    ``worker`` (another process on the same store) runs them; stop the worker; the median, 95th percentile and
    worst milliseconds from just before each admission to the handler's first line (its result)."""
    from workerpool import FINAL_STATES, Task

    latencies = []
    try:
        pause = threading.Event()
        for n in range(tasks):
            pause.wait(gap)  # the other process's workers are idle between tasks
            created = time.time()
            submitter.admit([Task(f"t{n}", "", 0, created_at=created)])
            while (task := submitter.get(f"t{n}")) is None or task.state not in FINAL_STATES:
                pause.wait(0.001)
            latencies.append(task.result - created)
    finally:
        if worker.stdin is not None:
            worker.stdin.close()
        worker.wait(timeout=30)
        if worker.stdout is not None:
            worker.stdout.close()
    ms = sorted(1000 * s for s in latencies)
    return ms[len(ms) // 2], ms[int(len(ms) * 0.95)], ms[-1]
