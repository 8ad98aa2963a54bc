#!/usr/bin/env python3
"""Run the Autobahn WebSocket cases (kosoku's fuzzing client) against one URL.

Usage:
    run_autobahn.py --url ws://127.0.0.1:PORT[/path] --out FILE
                    [--parallelism N] [-i|--case GLOB ...] [-x|--exclude GLOB ...]
                    [--report-dir DIR] [--timeout SECONDS]

kosoku plays Autobahn's "fuzzingclient": it opens one WebSocket connection per
case to the server under test (an echo server, directly or through a proxy)
and judges the server's answers. By default every case of the suite runs,
1.x to 13.x including the permessage-deflate cases 12.x/13.x (517 cases with
kosoku 0.1.0).

--out FILE gets a JSON object mapping each case id, in suite order, to
    {"behavior": "OK"|"NON-STRICT"|"INFORMATIONAL"|"FAILED"|"UNIMPLEMENTED"|"ERROR",
     "behaviorClose": "OK"|"INFORMATIONAL"|"FAILED"|"FAILED BY CLIENT"|"UNCLEAN"|"WRONG CODE",
     "remoteCloseCode": int | null,
     "duration": milliseconds}
(the fields of Autobahn's index.json; `duration` is informational only).

--report-dir DIR also writes kosoku's Autobahn-style report there (index.json,
index.html and one JSON + HTML file per case with the wire log), which is what
to read when a case differs.

Prints one summary line on stdout. Exit status: 0 when the run completed (even
if some cases did not pass: the verdicts are in the file), 2 when it could not
run (server unreachable, kosoku error, nothing ran), 3 on --timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import socket
import sys
import time
from importlib.metadata import version
from urllib.parse import urlsplit

BEHAVIORS = ["OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED", "ERROR"]


def case_key(case_id: str) -> list[int]:
    return [int(p) for p in case_id.split(".")]


def summarize(cases: dict[str, dict]) -> str:
    """`499 OK, 14 NON-STRICT, 3 INFORMATIONAL, 1 FAILED` (behaviours)."""
    counts = collections.Counter(c["behavior"] for c in cases.values())
    order = BEHAVIORS + sorted(set(counts) - set(BEHAVIORS))
    return ", ".join(f"{counts[b]} {b}" for b in order if counts[b]) or "0 cases"


def check_reachable(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        sys.exit(f"run_autobahn: --url must look like ws://HOST:PORT[/path], got {url!r}")
    port = parts.port or (443 if parts.scheme == "wss" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=5).close()
    except OSError as exc:
        print(f"run_autobahn: cannot connect to {parts.hostname}:{port}: {exc}", file=sys.stderr)
        sys.exit(2)


async def heartbeat(started: float, url: str) -> None:
    # kosoku reports nothing until the whole run is over; say we are alive.
    while True:
        await asyncio.sleep(30)
        print(
            f"run_autobahn: {url}: still running ({time.monotonic() - started:.0f} s)",
            file=sys.stderr,
            flush=True,
        )


async def run(args: argparse.Namespace) -> list:
    from kosoku import FailureError, run_fuzzingclient

    started = time.monotonic()
    beat = asyncio.create_task(heartbeat(started, args.url))
    try:
        return await run_fuzzingclient(
            args.url, args.case, args.exclude, concurrency=args.parallelism
        )
    except FailureError as failure:
        # Raised when any case did not pass; it carries every result.
        return list(failure.results)
    finally:
        beat.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="ws://HOST:PORT[/path] of the server under test")
    parser.add_argument("--out", required=True, help="JSON file for the per-case results")
    parser.add_argument(
        "--parallelism",
        type=int,
        default=int(os.environ.get("AUTOBAHN_PARALLELISM", "4")),
        help="cases run at once (default: $AUTOBAHN_PARALLELISM or 4)",
    )
    parser.add_argument(
        "-i", "--case", "--include", dest="case", action="append", metavar="GLOB", help="case id or `*` glob to run (repeatable; default: all)"
    )
    parser.add_argument(
        "-x", "--exclude", dest="exclude", action="append", metavar="GLOB", help="case id or `*` glob to leave out (repeatable)"
    )
    parser.add_argument("--report-dir", help="also write kosoku's Autobahn-style report here")
    parser.add_argument(
        "--timeout", type=float, default=1800, help="give up after this many seconds (default 1800)"
    )
    args = parser.parse_args()

    check_reachable(args.url)
    started = time.monotonic()
    try:
        results = asyncio.run(asyncio.wait_for(run(args), timeout=args.timeout))
    except asyncio.TimeoutError:
        print(f"run_autobahn: {args.url}: no result within {args.timeout:.0f} s", file=sys.stderr)
        sys.stderr.flush()
        os._exit(3)
    except Exception as exc:  # kosoku raised something other than FailureError
        print(f"run_autobahn: {args.url}: kosoku failed: {exc!r}", file=sys.stderr)
        sys.exit(2)
    elapsed = time.monotonic() - started

    if not results:
        print(f"run_autobahn: {args.url}: no case ran (check --case/--exclude)", file=sys.stderr)
        sys.exit(2)

    cases: dict[str, dict] = {}
    for r in sorted(results, key=lambda r: case_key(r.case_id)):
        cases[r.case_id] = {
            "behavior": r.behavior.value,
            "behaviorClose": r.behavior_close.value,
            "remoteCloseCode": r.remote_close_code,
            "duration": r.duration,
        }
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(cases, f, indent=1)
        f.write("\n")
    os.replace(tmp, args.out)

    if args.report_dir:
        try:
            from kosoku._report import write_reports  # private, but what the CLI uses

            write_reports(results, args.report_dir)
        except Exception as exc:
            print(f"run_autobahn: could not write the report: {exc!r}", file=sys.stderr)

    agent = results[0].agent or "?"
    print(
        f"autobahn run: {args.url} ({agent}), kosoku {version('kosoku')}, "
        f"parallelism {args.parallelism}: {len(cases)} cases in {elapsed:.1f} s: "
        f"{summarize(cases)} -> {args.out}",
        flush=True,
    )


if __name__ == "__main__":
    main()
