"""The commands: serve (the default), check-config and demo; signals live here too.

`main` turns argv into one of them and an exit code; nothing else in the
package reads argv, installs signal handlers or calls sys.exit.
"""

from __future__ import annotations

import argparse
import asyncio
import configparser
import gc
import logging
import signal
import sys
from importlib import metadata
from pathlib import Path

from proxy.config import Config, ConfigError, FileStamp, config_warnings, load_config, read_config, summary
from proxy.demo import run_demo
from proxy.demo_fleet import run_fleet_demo
from proxy.observe import logs
from proxy.server import Server

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
    parser.add_argument("--version", action="version", version=f"{PROG} {version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    check = commands.add_parser("check-config", help="validate a config file and summarise it")
    check.add_argument("path", metavar="PATH")
    demo = commands.add_parser("demo", help="run the proxy against a simulated Ollama and show it queue")
    demo.add_argument(
        "--fleet", action="store_true", help="two simulated hosts, one lost halfway: routing and failover"
    )
    args = parser.parse_args(argv)

    if args.command == "check-config":
        return check_config(args.path)
    if args.command == "demo":
        return run_fleet_demo() if args.fleet else run_demo()
    return serve(args.config, watch=args.watch)


def version() -> str:
    """The installed distribution's version; from a source tree that was never installed,
    the version setup.cfg declares, so `--version` always answers."""
    try:
        return metadata.version(PROG)
    except metadata.PackageNotFoundError:
        pass
    setup = configparser.ConfigParser()
    setup.read(Path(__file__).resolve().parent.parent / "setup.cfg", encoding="utf-8")
    return setup.get("metadata", "version", fallback="unknown")


def check_config(path: str) -> int:
    try:
        config = load_config(path)
    except ConfigError as err:
        for problem in err.problems:
            print(problem)
        return 1
    print(f"{path}: valid")
    for warning in config_warnings(config):
        print(f"warning: {warning}")
    print(summary(config))
    return 0


def serve(path: str, *, watch: bool = False) -> int:
    try:
        config, read_at = read_config(path)
    except ConfigError as err:
        for problem in err.problems:
            print(f"{PROG}: {problem}", file=sys.stderr)
        return 1
    logs.setup(config.log)
    try:
        return asyncio.run(_serve(config, Path(path), read_at, watch))
    except KeyboardInterrupt:  # a second Ctrl-C while draining: stop at once, quietly
        return 130


def _freeze_startup_objects() -> None:
    """Leave what start-up made (modules, the apps, the config) out of every later garbage
    collection: they live as long as the process, and scanning them made each full
    collection during a burst of connections take 0.3-0.8 s on 2 loaded cores, long
    enough to make waiting clients' heartbeats late (docs/operations.md)."""
    gc.collect()
    gc.freeze()


async def _serve(config: Config, path: Path, read_at: FileStamp, watch: bool) -> int:
    """Run until SIGTERM or SIGINT, reloading on SIGHUP (and file changes with --watch), then drain."""
    # `--watch` compares against the file as it was read: a change made any time after is seen.
    server = Server(config, path, read_at)
    watching = server.watch() if watch else None
    _freeze_startup_objects()
    try:
        await server.start()
    except OSError as exc:
        if watching is not None:
            watching.close()
        print(f"{PROG}: cannot start: {exc}; is another proxy running on that port?", file=sys.stderr)
        return 1
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload)
    watcher = asyncio.create_task(watching) if watching is not None else None
    try:
        await stop.wait()
    finally:
        if watcher is not None:
            watcher.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await server.stop()
    return 0
