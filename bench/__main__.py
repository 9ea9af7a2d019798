"""`python -m bench [--quick] [--uvloop] [--no-nginx] [--profile DIR] [--markdown]`, `python -m bench soak ...`, or `python -m bench routing`."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
import time
from pathlib import Path

from . import cluster, profile, report, routing, soak
from .run import FULL, QUICK, run


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["soak"]:
        return soak.main(argv[1:])
    if argv[:1] == ["routing"]:
        return routing.main(argv[1:])
    if argv[:1] == ["cluster"]:
        return cluster.main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smoke run, under a minute")
    parser.add_argument("--uvloop", action="store_true", help="also measure the proxy on uvloop")
    parser.add_argument("--no-nginx", action="store_true", help="skip the nginx comparison")
    parser.add_argument("--profile", type=Path, metavar="DIR", help="py-spy the proxy; stacks go to DIR")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args(argv)
    settings = dataclasses.replace(
        QUICK if args.quick else FULL, nginx=not args.no_nginx, uvloop=args.uvloop, profile=args.profile
    )
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    def say(text: str) -> None:
        print(f"[{time.monotonic() - started:5.1f}s] {text}", file=sys.stderr, flush=True)

    results = asyncio.run(run(settings, say))
    print(
        f"machine: {os.cpu_count()} cores shared by client, simulator, nginx and proxy; Python {sys.version.split()[0]}"
    )
    print(report.table(results, markdown=args.markdown))
    print()
    for note in results.notes:
        print(f"  {note}")
    for name, path in sorted(results.profiles.items()):
        print(f"\nprofile {name} ({path}):")
        print(profile.summary(path))
    print(f"\ntotal {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
