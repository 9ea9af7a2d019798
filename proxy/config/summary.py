"""What `check-config` prints: the effective settings on one screen, labelled by YAML path,
and the warnings about valid settings that will not do what the operator meant."""

from __future__ import annotations

import os
import tempfile

from proxy.config.schema import (
    CLOUDFLARE_IDLE_TIMEOUT,
    CONNECTION_HEADROOM,
    AccessConfig,
    ClusterConfig,
    Config,
)
from proxy.units import format_duration, format_size


def _format_address(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"{shown}:{port}" if port else f"{shown}:0 (any free port)"


def _describe_max_connections(config: Config) -> str:
    if config.listen.max_connections is not None:
        return str(config.max_connections)
    return f"{config.max_connections} (limits.max_queue + limits.max_concurrent + {CONNECTION_HEADROOM})"


def describe_spool_dir(spool_dir: str, mounts: str = "/proc/mounts") -> str:
    """The directory, and a warning when it is in RAM: spooled bodies would then cost memory
    after all (a tmpfs /tmp is common; `TMPDIR=/var/tmp` or a spool_dir on disk avoids it)."""
    path = spool_dir or tempfile.gettempdir()
    shown = path if spool_dir else f"{path} (the system's)"
    try:
        with open(mounts, encoding="utf-8") as file:
            table = [line.split() for line in file]
    except OSError:
        return shown  # not Linux: no mount table to read
    real = os.path.realpath(path)
    points = [(row[1], row[2]) for row in table if len(row) > 2]
    inside = [
        (point, kind) for point, kind in points if real == point or real.startswith(point.rstrip("/") + "/")
    ]
    if inside and max(inside, key=lambda found: len(found[0]))[1] in ("tmpfs", "ramfs"):
        return f"{shown}; WARNING: a tmpfs, so spooled bodies stay in RAM: set request.spool_dir to a disk"
    return shown


def _describe_keys(access: AccessConfig) -> str:
    if not access.keys:
        return "none (no authentication on the listen port)"
    per_key = f", at most {access.max_queued_per_key} waiting per key" if access.max_queued_per_key else ""
    return f"{len(access.keys)} ({', '.join(access.keys)}){per_key}"


def _describe_scheduling(config: Config) -> str:
    """One row: who shares fairly, by what, the header, and the keys that differ from the defaults."""
    scheduling = config.scheduling
    header = f"{scheduling.priority_header} may lower" if scheduling.priority_header else "no priority header"
    shown = []
    for name, p in config.access.profiles.items():
        caps = (f" queued<={p.max_queued}" if p.max_queued is not None else "") + (
            f" running<={p.max_running}" if p.max_running else ""
        )
        shown.append(f"{name}: {p.priority} x{p.weight:g}{caps}")
    keys = f"; {', '.join(shown)}" if shown else ""
    return f"fairness {scheduling.fairness}, cost {scheduling.cost}, {header}{keys}"


def _describe_origins(origins: tuple[str, ...]) -> str:
    if not origins:
        return "none (every cross-origin browser request gets 403)"
    if "*" in origins:
        return "* (any origin)"
    ollamas = "default (Ollama's own: localhost, 127.0.0.1 and 0.0.0.0 on any port, app, file, tauri, vscode)"
    return ", ".join(ollamas if origin == "default" else origin for origin in origins)


def _describe_grace(grace: float) -> str:
    if not grace:
        return "0s (no waiting: 502 when upstream cannot be reached, 503 while it is down)"
    return f"{format_duration(grace)} (waiting requests wait for an unreachable upstream, then 503)"


def _describe_fleet(config: Config) -> tuple[str, str]:
    """One row for where generations run: `upstream.url`, or every backend with its limits."""
    if not config.backends:
        return ("upstream.url", config.upstream.url)
    hosts = []
    for name, backend in config.backends.items():
        caps = "".join(f", {model} {cap}" for model, cap in backend.models.items())
        hosts.append(f"{name} {backend.url} ({backend.max_concurrent}{caps})")
    after = config.health.unhealthy_after
    return ("backends", f"{len(hosts)}: {'; '.join(hosts)}; out after {after} failures in a row")


def _describe_cluster(cluster: ClusterConfig) -> str:
    """The `cluster` keys, on the limits' row they change: no row of their own, to keep one screen."""
    if not cluster.redis:
        return ""
    return (
        f", shared by every proxy on cluster.redis {cluster.redis} (prefix {cluster.prefix}, lease "
        f"{format_duration(cluster.lease)}, on_redis_down {cluster.on_redis_down})"
    )


def summary(config: Config) -> str:
    """The effective limits, one per line and labelled by YAML path, so what
    `check-config` prints can be matched against the file at a glance."""
    limits = config.limits
    queue = f"{limits.max_queue} waiting, then 503" if limits.max_queue else "0 (503 when all slots are busy)"
    non_streaming = "true" if config.heartbeat.non_streaming else "false (streaming requests only)"
    admin = _format_address(config.admin.host, config.admin.port)
    rows = [
        ("listen", _format_address(config.listen.host, config.listen.port)),
        ("listen.max_connections", _describe_max_connections(config)),
        ("admin", f"{admin}  ({config.metrics.path} and /-/*)"),
        _describe_fleet(config),
        (
            "limits.max_concurrent",
            f"{limits.max_concurrent} generation requests at once{_describe_cluster(config.cluster)}",
        ),
        ("limits.max_queue", queue),
        ("limits.queue_timeout", format_duration(limits.queue_timeout)),
    ]
    if limits.models:
        rows += [(f"limits.models.{name}", f"{cap} at once") for name, cap in limits.models.items()]
    else:
        rows.append(("limits.models", "none (only the global limit)"))
    rows += [
        ("timeouts.connect", format_duration(config.timeouts.connect)),
        ("timeouts.read", format_duration(config.timeouts.read)),
        ("timeouts.generation", f"{format_duration(config.timeouts.generation)} per non-streaming answer"),
        ("timeouts.write", format_duration(config.timeouts.write)),
        ("heartbeat.interval", format_duration(config.heartbeat.interval)),
        ("heartbeat.non_streaming", non_streaming),
        ("request.max_body", format_size(config.request.max_body)),
        ("request.body_timeout", format_duration(config.request.body_timeout)),
        (
            "request.spool_above",
            f"{format_size(config.request.spool_above)} (larger bodies wait in a file in "
            f"request.spool_dir {describe_spool_dir(config.request.spool_dir)})",
        ),
        ("log", f"{config.log.format}, level {config.log.level}"),
        ("access.admin_endpoints", config.access.admin_endpoints),
        # One row for both, so the summary stays one screen: the keys and how they share the slots.
        ("access.keys, scheduling", f"{_describe_keys(config.access)}; {_describe_scheduling(config)}"),
        ("access.cors_origins", _describe_origins(config.access.cors_origins)),
        ("shutdown_grace", format_duration(config.shutdown_grace)),
        (
            "health",
            f"probe every {format_duration(config.health.interval)} (timeout "
            f"{format_duration(config.health.timeout)}); outage_grace {_describe_grace(config.health.outage_grace)}",
        ),
    ]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def config_warnings(config: Config) -> list[str]:
    """Settings that are valid but will not do what the operator meant, one line each,
    naming the keys. `check-config` prints them (and still exits 0); the proxy logs
    them at start and on every reload."""
    warnings: list[str] = []
    limits, listen = config.limits, config.listen
    wanted = limits.max_queue + limits.max_concurrent
    if listen.max_connections is not None and listen.max_connections < wanted:
        warnings.append(
            f"listen.max_connections: {listen.max_connections} is below limits.max_queue + "
            f"limits.max_concurrent ({limits.max_queue} + {limits.max_concurrent} = {wanted}): "
            f"past {listen.max_connections} connections clients get 503 before they can queue; "
            f"raise it to at least {wanted} or remove it to follow the limits"
        )
    if config.heartbeat.interval >= CLOUDFLARE_IDLE_TIMEOUT:
        warnings.append(
            f"heartbeat.interval: {format_duration(config.heartbeat.interval)} is at or above "
            f"Cloudflare's {format_duration(CLOUDFLARE_IDLE_TIMEOUT)} idle timeout: behind a "
            "Cloudflare tunnel a waiting client is cut off with 524; use 15s to 90s"
        )
    return warnings
