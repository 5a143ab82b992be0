"""Figure 0: POST /enqueue as `make run` serves it, against a bare Flask app on the same gunicorn settings.

The bare app (``bench/bare_flask.py``) is what Flask and gunicorn cost alone for a request shaped like a
task submission: every microsecond the service spends beyond it is its own machinery (request ids,
validation, the pool, metrics, problem documents, the access line).
"""

from __future__ import annotations

import os

from .harness import Run, collapsed_inclusive, collapsed_self_time, table
from .http_figures import PYSPY, profile_during_wrk
from .server import OUT, Server
from .stats import ratios, spread, verdict

ON, OFF, BARE = "service, access log on", "service, access log off", "bare Flask"
# `make run`'s settings but a queue that accepts every POST; killed, not drained.
_SERVICE_ENV = {"QUEUE_SIZE": "1000000", "SHUTDOWN_TIMEOUT_S": "0"}
POOLS = {
    # Default work (100-500 ms): the pool falls behind at once and tasks wait in the queue.
    "idle pool": {},
    # 1 ms tasks, no failures: the pool keeps up, so every task also runs and finishes during the run.
    "busy pool (1 ms tasks)": {"WORK_MIN_MS": "1", "WORK_MAX_MS": "1", "FAILURE_RATE": "0"},
}
TARGETS = {ON: (0.85, 1.25), OFF: (0.95, None)}


def _servers(pool_env: dict[str, str], tag: str) -> dict[str, Server]:
    return {
        ON: Server(f"ref-{tag}-on", env={**_SERVICE_ENV, **pool_env}),
        OFF: Server(f"ref-{tag}-off", env={**_SERVICE_ENV, **pool_env, "ACCESS_LOG": "off"}),
        BARE: Server(
            f"ref-{tag}-bare",
            env={},
            app="bench.bare_flask:app",
            config="bench/hello.conf.py",
            ready=("/enqueue", 405),
        ),
    }


def _rotation(round_no: int, names: list[str]) -> list[str]:
    """Each round starts one later: every variant takes every position equally often."""
    k = round_no % len(names)
    return names[k:] + names[:k]


def bare_flask_reference(run: Run) -> None:
    """Figure 0: throughput and p99 of POST /enqueue with the access log on and off, per bare-Flask round."""
    sections = []
    for pool_label, pool_env in POOLS.items():
        results = _measure(run, pool_label, pool_env)
        sections.append(_report(run, pool_label, results))
    text = "\n\n".join(sections)
    text += (
        f"\n\nwrk -t{run.wrk_threads} -c{run.wrk_connections} -d{run.wrk_seconds}s posting unique ids "
        f"(`bench/enqueue.lua`); medians (min-max) of {run.rounds} rounds, the three servers in rotating order "
        "each round; ratios are per round (service / bare Flask, measured within the same round). The service "
        "is `make run`'s command (`gunicorn -c gunicorn.conf.py`, `.env` defaults) with `QUEUE_SIZE=1000000` so "
        "that every POST is accepted; the reference is `bench/bare_flask.py` (one route: `request.get_json()`, "
        "three fields checked, `jsonify` a 202) under `bench/hello.conf.py` (1 worker, gthread, 8 threads, "
        "no access log). Worker CPU is the worker process's user + system time (all its threads, `/proc`) during "
        "the round divided by the requests served: on a shared machine it moves far less than req/s does."
    )
    text += "\n\n" + _request_profile(run)
    run.sections["0. Enqueue against a bare Flask app"] = text


def _measure(run: Run, pool_label: str, pool_env: dict[str, str]) -> dict[str, list[dict]]:
    tag = "busy" if pool_env else "idle"
    servers = _servers(pool_env, tag)
    results: dict[str, list[dict]] = {name: [] for name in servers}
    try:
        for server in servers.values():
            server.wait_ready()
            run.record(server.command)
        for server in servers.values():
            run.wrk(server.url, "/enqueue", seconds=1)  # warm-up
        for round_no in range(run.rounds):
            for name in _rotation(round_no, list(servers)):
                before = servers[name].cpu_seconds()
                r = run.wrk(servers[name].url, "/enqueue")
                # CPU per request hardly depends on what else the machine runs, unlike req/s.
                r["cpu_us"] = (servers[name].cpu_seconds() - before) / max(1, r["requests"]) * 1e6
                if r["non_2xx_3xx"]:
                    raise RuntimeError(
                        f"{name}: {r['non_2xx_3xx']} responses were not 2xx; see {servers[name].log_path}"
                    )
                results[name].append(r)
                run.progress(
                    f"fig 0 {pool_label}: round {round_no + 1}/{run.rounds} {name:24} {r['rps']:8,.0f} req/s "
                    f"p99 {r['p99_us'] / 1000:6.1f} ms, worker CPU {r['cpu_us']:5.0f} µs/request"
                )
    finally:
        for server in servers.values():
            server.stop()
    return results


def _report(run: Run, pool_label: str, results: dict[str, list[dict]]) -> str:
    bare = results[BARE]
    rows, per_round = [], []
    for name in (ON, OFF, BARE):
        mine = results[name]
        rps = ratios([r["rps"] for r in mine], [r["rps"] for r in bare])
        p99 = ratios([r["p99_us"] for r in mine], [r["p99_us"] for r in bare])
        cpu = ratios([r["cpu_us"] for r in mine], [r["cpu_us"] for r in bare])
        rows.append(
            [
                name,
                spread([r["rps"] for r in mine]).fmt(),
                spread([r["p99_us"] / 1000 for r in mine]).fmt(".1f"),
                "1" if name == BARE else rps.fmt(".2f"),
                "1" if name == BARE else p99.fmt(".2f"),
                spread([r["cpu_us"] for r in mine]).fmt(),
                "1" if name == BARE else cpu.fmt(".2f"),
            ]
        )
        if name == BARE:
            continue
        each = ", ".join(f"{a['rps'] / b['rps']:.2f}" for a, b in zip(mine, bare, strict=True))
        each_p99 = ", ".join(f"{a['p99_us'] / b['p99_us']:.2f}" for a, b in zip(mine, bare, strict=True))
        each_cpu = ", ".join(f"{a['cpu_us'] / b['cpu_us']:.2f}" for a, b in zip(mine, bare, strict=True))
        per_round.append(
            f"- {name}, per round: throughput ratio {each}; p99 ratio {each_p99}; CPU per request ratio {each_cpu}"
        )
        if pool_label == "idle pool":
            low_rps, high_p99 = TARGETS[name]
            run.summary.append(
                (
                    f"0. enqueue throughput / bare Flask, {name.removeprefix('service, ')}",
                    f"{rps.median:.2f}",
                    f">= {low_rps}",
                    verdict(rps.median >= low_rps),
                )
            )
            run.summary.append(
                (
                    f"0. worker CPU per request / bare Flask, {name.removeprefix('service, ')}",
                    f"{cpu.median:.2f}",
                    "-",
                    "-",
                )
            )
            if high_p99 is not None:
                run.summary.append(
                    (
                        f"0. enqueue p99 / bare Flask, {name.removeprefix('service, ')}",
                        f"{p99.median:.2f}",
                        f"<= {high_p99}",
                        verdict(p99.median <= high_p99),
                    )
                )
        else:
            run.summary.append(
                (
                    f"0. enqueue throughput / bare Flask, {name.removeprefix('service, ')}, {pool_label}",
                    f"{rps.median:.2f}",
                    "-",
                    "-",
                )
            )
    header = ["server", "req/s", "p99 ms", "throughput / bare", "p99 / bare", "worker CPU µs/request", "CPU / bare"]
    return f"**{pool_label}**\n\n" + table(header, rows) + "\n\n" + "\n".join(per_round)


# -- where the time goes -----------------------------------------------------------------------

PROFILE_LABELS = {
    "gunicorn: reading and parsing the request": "Request.__init__ (gunicorn/http/message.py",
    "gunicorn: writing the response": "Response.write (gunicorn/http/wsgi.py",
    "access line (service/access_log.py)": "service/access_log.py",
    "gunicorn's own logging (glogging)": "gunicorn/glogging.py",
    "werkzeug/Flask request handling (wsgi_app)": "wsgi_app (",
    # The request id and Connection: close are WSGI middleware around the whole app: their own frames only.
    "  request id middleware, own time (service/request_id.py)": "leaf:with_request_id",
    "  Connection: close middleware, own time (service/connection.py)": "leaf:close_if_body_unread",
    "  whole enqueue view (service/api.py enqueue)": "enqueue (service/api.py",
    "    parse_enqueue (JSON + validation)": "parse_enqueue (",
    "    WorkerPool.submit (metrics hooks included)": "submit (workerpool/",
    "    task_to_json (the 202 body's fields)": "task_to_json (",
    "    accepted (the 202: orjson body, headers)": "accepted (service/api.py",
    "    task_url (Location header)": "task_url (",
    "  werkzeug's iri_to_uri of the Location header": "iri_to_uri (",
    "pool worker threads (_work)": "_work (",
    "garbage collection": "gc_collect",
}


def _request_profile(run: Run) -> str:
    """Where the worker holds the GIL while wrk posts to /enqueue on `make run`'s server (py-spy)."""
    if run.quick or not os.path.exists(PYSPY):
        return "(request-path profile skipped)"
    raw = OUT / "enqueue-profile.txt"
    with Server("enqueue-profile", env=_SERVICE_ENV) as server:
        server.wait_ready()
        run.wrk(server.url, "/enqueue", seconds=1)
        profile_during_wrk(run, server, raw, "/enqueue")
    if not raw.exists():
        return "(request-path profile: py-spy produced no output)"
    parts = collapsed_inclusive(raw, PROFILE_LABELS)
    return "\n".join(
        [
            "Where the worker process holds the GIL while wrk posts to /enqueue on `make run`'s server, access log "
            "on (py-spy, 250 Hz, `--gil`; share of samples whose stack contains the function):",
            "",
            table(["function", "share"], [[label, f"{share:.1%}"] for label, share in parts]),
            "",
            "Top self time:",
            "",
            table(["function", "share"], [[f"`{n}`", f"{s:.1%}"] for n, s in collapsed_self_time(raw, top=12)]),
        ]
    )
