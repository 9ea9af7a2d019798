"""The commands: serve (the default), check-config and demo; signals live here too.

`main` turns argv into one of them and an exit code; nothing else in the
package reads argv, installs signal handlers or calls sys.exit.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from . import logs
from .app import Server
from .config import Config, ConfigError, load_config, summary
from .demo import run_demo

PROG = "ollama-queue-proxy"
log = logging.getLogger("proxy")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="A queueing reverse proxy for Ollama: admission limits, keep-alive "
        "frames for waiting clients, and prompt cancellation.",
    )
    parser.add_argument(
        "--config", default="config.yaml", metavar="PATH",
        help="the config file to serve with (default: ./config.yaml)",
    )  # fmt: skip
    parser.add_argument(
        "--watch", action="store_true",
        help="reload the config file whenever it changes on disk (polls its stat every second)",
    )  # fmt: skip
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    check = commands.add_parser("check-config", help="validate a config file and summarise it")
    check.add_argument("path", metavar="PATH")
    commands.add_parser("demo", help="run the proxy against a simulated Ollama and show it queue")
    args = parser.parse_args(argv)

    if args.command == "check-config":
        return check_config(args.path)
    if args.command == "demo":
        return run_demo()
    return serve(args.config, watch=args.watch)


def check_config(path: str) -> int:
    try:
        config = load_config(path)
    except ConfigError as err:
        for problem in err.problems:
            print(problem)
        return 1
    print(f"{path}: valid")
    print(summary(config))
    return 0


def serve(path: str, *, watch: bool = False) -> int:
    try:
        config = load_config(path)
    except ConfigError as err:
        for problem in err.problems:
            print(f"{PROG}: {problem}", file=sys.stderr)
        return 1
    logs.setup(config.log)
    try:
        return asyncio.run(_serve(config, Path(path), watch))
    except KeyboardInterrupt:  # a second Ctrl-C while draining: stop at once, quietly
        return 130


async def _serve(config: Config, path: Path, watch: bool) -> int:
    """Run until SIGTERM or SIGINT, reloading on SIGHUP (and file changes with --watch), then drain."""
    server = Server(config, path)
    try:
        await server.start()
    except OSError as exc:
        print(f"{PROG}: cannot start: {exc}; is another proxy running on that port?", file=sys.stderr)
        return 1
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload)
    watcher = asyncio.create_task(server.watch()) if watch else None
    try:
        await stop.wait()
    finally:
        if watcher is not None:
            watcher.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await server.stop()
    return 0
