#!/usr/bin/env python3
"""Compare two Autobahn runs: the echo server directly vs through the proxy.

Usage:
    compare.py [--strict] DIRECT.json PROXIED.json

Each file is the --out of run_autobahn.py (case id -> {behavior, behaviorClose,
remoteCloseCode, ...}); kosoku's/Autobahn's own report index.json
({agent: {case id: {...}}}) is accepted too.

A case is *identical* when behavior, behaviorClose and remoteCloseCode are all
equal (durations are ignored). A case is *tolerated* when the only difference
is OK <-> NON-STRICT in behavior: several cases (3.2-3.4, 4.1.3-4.1.5,
4.2.3-4.2.5, ...) give OK or NON-STRICT depending on whether the server
happened to read the bad frame in the same chunk as the good message before it,
which TCP timing decides, proxy or not; both verdicts are conformant. --strict
(or AUTOBAHN_STRICT=1) counts those as differences too.

Every other difference fails the comparison, and so does a case that is
FAILED, UNIMPLEMENTED or ERROR through the proxy when it was not directly, or
a case present in one run only.

Output: one line per differing case, then the summary line
    autobahn: 517 cases, 514 identical, 3 tolerated, 0 differing; direct: 499 OK, ...; proxied: ...
Exit status: 0 same, 1 differences, 2 unreadable input.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

FIELDS = ("behavior", "behaviorClose", "remoteCloseCode")
BAD = {"FAILED", "UNIMPLEMENTED", "ERROR"}
TOLERATED = {"OK", "NON-STRICT"}
ORDER = ["OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED", "ERROR"]


def case_key(case_id: str) -> list[int]:
    try:
        return [int(p) for p in case_id.split(".")]
    except ValueError:
        return [1 << 30]


def load(path: str) -> dict[str, dict]:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        print(f"compare: cannot read {path}: {exc}", file=sys.stderr)
        sys.exit(2)
    if not isinstance(data, dict) or not data:
        print(f"compare: {path}: no cases", file=sys.stderr)
        sys.exit(2)
    first = next(iter(data.values()))
    if isinstance(first, dict) and "behavior" not in first:
        # Autobahn index.json: {agent: {case: {...}}}; one agent expected.
        if len(data) != 1:
            print(f"compare: {path}: {len(data)} agents in one report", file=sys.stderr)
            sys.exit(2)
        data = first
    return data


def verdict(case: dict | None) -> str:
    if case is None:
        return "(missing)"
    return "/".join(str(case.get(f)) for f in FIELDS)


def summary(cases: dict[str, dict]) -> str:
    counts = collections.Counter(c.get("behavior") for c in cases.values())
    order = ORDER + sorted(set(counts) - set(ORDER), key=str)
    return ", ".join(f"{counts[b]} {b}" for b in order if counts[b])


def main() -> None:
    parser = argparse.ArgumentParser(description="Compare direct and proxied Autobahn runs")
    parser.add_argument("direct")
    parser.add_argument("proxied")
    parser.add_argument(
        "--strict",
        action="store_true",
        default=os.environ.get("AUTOBAHN_STRICT", "") not in ("", "0"),
        help="an OK <-> NON-STRICT difference fails too",
    )
    args = parser.parse_args()
    direct, proxied = load(args.direct), load(args.proxied)

    identical, tolerated, differing = [], [], []
    for cid in sorted(set(direct) | set(proxied), key=case_key):
        d, p = direct.get(cid), proxied.get(cid)
        if d is not None and p is not None and all(d.get(f) == p.get(f) for f in FIELDS):
            identical.append(cid)
            continue
        line = f"{cid}: direct {verdict(d)}, proxied {verdict(p)}"
        if (
            not args.strict
            and d is not None
            and p is not None
            and {d.get("behavior"), p.get("behavior")} <= TOLERATED
            and all(d.get(f) == p.get(f) for f in FIELDS[1:])
        ):
            tolerated.append(line)
            continue
        if p is not None and p.get("behavior") in BAD and (d is None or d.get("behavior") not in BAD):
            line += f"  <- {p.get('behavior')} only through the proxy"
        differing.append(line)

    for line in tolerated:
        print(f"tolerated  {line}")
    for line in differing:
        print(f"DIFFERENT  {line}")
    total = len(set(direct) | set(proxied))
    print(
        f"autobahn: {total} cases, {len(identical)} identical, {len(tolerated)} tolerated, "
        f"{len(differing)} differing; direct: {summary(direct)}; proxied: {summary(proxied)}"
    )
    sys.exit(1 if differing else 0)


if __name__ == "__main__":
    main()
