"""Run the benchmarks and write bench/RESULTS.md: ``python -m bench.run [--quick] [--only 1,3] [--out PATH]``.

Every figure is compared with a reference measured in the same run, in alternating rounds.
``--quick`` shrinks every figure to a few seconds to check the harness itself, not the service.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from . import batch, dashboard, durable, efficiency, engine, http_figures, redis_figures, reference
from .harness import Run, table
from .server import ROOT

RESULTS = ROOT / "bench" / "RESULTS.md"


def figures(run: Run) -> dict[str, Callable[[], None]]:
    quick = run.quick
    return {
        "0": lambda: reference.bare_flask_reference(run),
        "3": lambda: engine.engine_throughput(run, n=5_000 if quick else 100_000),
        "4a": lambda: engine.retained_task_memory(run, sizes=(2_000,) if quick else (10_000, 100_000)),
        "1": lambda: http_figures.enqueue_overhead(run),
        "2": lambda: efficiency.pool_efficiency(run, efficiency.Batch(tasks=20, backoff_base_ms=20) if quick else None),
        "4b": lambda: (
            http_figures.rss_growth(run, total=3_000, retained=500) if quick else http_figures.rss_growth(run)
        ),
        "5": lambda: http_figures.lifecycle(run),
        "6": lambda: batch.batch_throughput(run, sizes=(10, 100) if quick else batch.BATCH_SIZES),
        "6b": lambda: batch.batch_on_stores(run, size=10 if quick else batch.BATCH_SIZES[0]),
        "7": lambda: dashboard.dashboard_cost(run, engine_tasks=5_000 if quick else 50_000),
        "8a": lambda: durable.http_stores(run),
        "8b": lambda: durable.engine_vs_huey(run, n=500 if quick else 5_000),
        "8c": lambda: durable.pickup_latency(run, tasks=10 if quick else 50),
        "8d": lambda: durable.restart_recovery(run, tasks=1_000 if quick else 10_000),
        "9a": lambda: redis_figures.http_enqueue(run),
        "9b": lambda: redis_figures.engine_throughput(run, n=300 if quick else 2_000, forking_n=30 if quick else 200),
        "9c": lambda: redis_figures.pickup_latency(run, tasks=10 if quick else 50),
        "9d": lambda: redis_figures.retained_memory(
            run, tasks=1_000 if quick else 20_000, bound=200 if quick else 5_000
        ),
    }


def _output(*args: str) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unavailable"


def machine() -> list[list[str]]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    versions = ", ".join(
        f"{name} {metadata.version(name)}" for name in ("flask", "werkzeug", "gunicorn", "prometheus-client")
    )
    tools = []
    for name in ("py-spy", "pyinstrument"):
        try:
            tools.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            tools.append(f"{name} not installed")
    wrk = _output("wrk", "-v").splitlines()[0] if shutil.which("wrk") else "not installed"
    commit = _output("git", "-C", str(ROOT), "rev-parse", "--short", "HEAD")
    dirty = (
        " (with uncommitted changes)"
        if _output(
            "git",
            "-C",
            str(ROOT),
            "status",
            "--porcelain",
            "--",
            "app.py",
            "config.py",
            "gunicorn.conf.py",
            "service",
            "workerpool",
        )
        else ""
    )
    return [
        ["date", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")],
        ["machine", f"{cpu}; {_output('nproc')} cores; {platform.system()} {platform.release()}"],
        ["python", f"{platform.python_implementation()} {platform.python_version()}"],
        ["packages", versions],
        ["tools", f"{wrk}; {', '.join(tools)}"],
        ["code", f"commit {commit}{dirty}"],
    ]


def render(run: Run, meta: list[list[str]], argv: list[str]) -> str:
    parts = [
        "# Benchmark results",
        "",
        "Written by `make bench` (`python -m bench.run`). These machines are shared and noisy: absolute numbers "
        "drift by tens of percent between periods, so each figure is set against a reference measured in the same "
        "run, in alternating rounds (A B, then B A), and reported as median (min-max).",
        "",
        table(["", ""], meta),
        "",
        "## Summary",
        "",
        table(["figure", "measured (median)", "target", "verdict"], [list(row) for row in run.summary]),
    ]
    for title, text in run.sections.items():
        parts += ["", f"## {title}", "", text]
    parts += [
        "",
        "## Commands",
        "",
        "Run from the project root with `.venv/bin` first on PATH; `$PORT` is the port gunicorn reports for "
        "`PORT=0`, `<run-id>` a fresh random id per wrk run. Logs of every server are in `bench/out/`.",
        "",
        "```",
        f"python -m bench.run {' '.join(argv)}".rstrip(),
        *run.commands,
        "```",
        "",
    ]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check the harness, not the service")
    parser.add_argument(
        "--only",
        help="comma-separated figures to run (0, 1, 2, 3, 4a, 4b, 5, 6, 6b, 7, 8a, 8b, 8c, 8d, 9a, 9b, 9c, 9d)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="A/B rounds per figure (default 5)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"where to write the report (default {RESULTS})")
    args = parser.parse_args(argv)
    run = Run(rounds=args.rounds, quick=args.quick)
    if args.quick:
        run.wrk_seconds = 1
    table_ = figures(run)
    chosen = args.only.split(",") if args.only else list(table_)
    unknown = [f for f in chosen if f not in table_]
    if unknown:
        parser.error(f"unknown figure(s) {', '.join(unknown)}; choose from {', '.join(table_)}")
    needs_wrk = {"0", "1", "4b", "6", "6b", "7", "8a", "9a"} & set(chosen)
    if needs_wrk and not shutil.which("wrk"):
        parser.error("wrk is not installed (apt-get install -y wrk); `make bench` installs it")
    meta = machine()
    for name in chosen:
        run.progress(f"figure {name}")
        table_[name]()
    args.out.write_text(render(run, meta, argv))
    run.progress(f"wrote {args.out}")
    print(table(["figure", "measured (median)", "target", "verdict"], [list(row) for row in run.summary]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
