"""The operator kit in docs/: each file must work when copied as it is.

A dashboard panel or an alert that names a metric the proxy does not export
shows "No data" or never fires, silently; so every PromQL expression is checked
against what a running proxy actually serves, label names and values included.
"""

from __future__ import annotations

import configparser
import json
import re
import shutil
import subprocess
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import AdminConfig, Config, HeartbeatConfig, ListenConfig, RequestConfig
from proxy.units import parse_duration
from tests.support import REPO, eventually, scrape

DOCS = REPO / "docs"
DASHBOARD = DOCS / "grafana-dashboard.json"
ALERTS = DOCS / "alerts.yml"
UNIT = DOCS / "ollama-queue-proxy.service"
CLOUDFLARED = DOCS / "cloudflared.yml"
OPERATIONS = DOCS / "operations.md"

METRIC_NAME = re.compile(r"\bollama_proxy_[a-z0-9_]+")
SELECTOR = re.compile(r"\b(ollama_proxy_[a-z0-9_]+)\{([^}]*)\}")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
ALTERNATIVES = re.compile(r"[\w:-]+(\|[\w:-]+)*")  # a dot would be a pattern
#: Labels Prometheus attaches at scrape time; the proxy never exports them.
TARGET_LABELS = {"instance", "job"}
CLOUDFLARE_READ_TIMEOUT = 100.0  # seconds of origin silence before the edge answers 524
#: The yaml keys of cloudflared's OriginRequestConfig (cloudflared ingress/config.go).
CLOUDFLARED_ORIGIN_KEYS = {
    "connectTimeout", "tlsTimeout", "tcpKeepAlive", "noHappyEyeballs", "keepAliveTimeout",
    "keepAliveConnections", "httpHostHeader", "originServerName", "matchSNItoHost", "caPool",
    "noTLSVerify", "disableChunkedEncoding", "bastionMode", "proxyAddress", "proxyPort", "proxyType",
    "ipRules", "http2Origin", "access",
}  # fmt: skip
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not on PATH (Debian/Ubuntu: apt-get install prometheus)"
)


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def _walk(node: object) -> Iterator[tuple[str, object]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from _walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item)


def _expressions() -> list[str]:
    """Every PromQL expression in the kit: panel targets, annotations, variables, alerts."""
    dashboard = _dashboard()
    exprs = [value for key, value in _walk(dashboard) if key == "expr" and isinstance(value, str)]
    exprs += [var["definition"] for var in dashboard["templating"]["list"]]
    exprs += [rule["expr"] for rule in _alert_rules()]
    return exprs


def _panels() -> list[dict]:
    return [p for p in _dashboard()["panels"] if p["type"] != "row"]


# -- the dashboard -------------------------------------------------------------------------------


def test_dashboard_imports_with_a_datasource_input():
    dashboard = _dashboard()
    assert dashboard["uid"] == "ollama-queue-proxy" and dashboard["title"] == "ollama-queue-proxy"
    assert dashboard["id"] is None  # an id would clash with another dashboard on import
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert [(i["name"], i["type"], i["pluginId"]) for i in dashboard["__inputs"]] == [
        ("DS_PROMETHEUS", "datasource", "prometheus")
    ]
    variables = {var["name"]: var for var in dashboard["templating"]["list"]}
    assert set(variables) == {"instance", "model"}
    assert variables["model"]["definition"].startswith("label_values(ollama_proxy_in_flight")
    # Every datasource reference resolves through the input (or is Grafana's own annotations).
    uids = {
        value["uid"] for key, value in _walk(dashboard) if key == "datasource" and isinstance(value, dict)
    }
    assert uids == {"${DS_PROMETHEUS}", "-- Grafana --"}


def test_every_panel_queries_something_and_none_overlap():
    panels = _panels()
    assert len(panels) >= 15
    assert len({p["id"] for p in _dashboard()["panels"]}) == len(_dashboard()["panels"])
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        assert panel["targets"], panel["title"]
        assert all(t["expr"].strip() and t["refId"] for t in panel["targets"]), panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), panel["title"]
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


# -- every expression against a running proxy ----------------------------------------------------


async def _exported(sim, make_proxy, http) -> dict[str, dict[str, set[str]]]:
    """Sample name -> label name -> values, after a streaming chat and a non-streaming generate."""
    sim.load_delay, sim.token_delay = 0.01, 0.001  # so load time and generation speed are reported
    proxy = await make_proxy(limits={"models": {"llama3.2": 1}})
    chat = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}
    async with http.post(proxy.listen_url + "/api/chat", json=chat) as resp:
        assert resp.status == 200
        await resp.read()
    generate = {"model": "llama3.2", "prompt": "hi", "stream": False}
    async with http.post(proxy.listen_url + "/api/generate", json=generate) as resp:
        assert resp.status == 200
        await resp.read()

    async def both_recorded() -> bool:
        metrics = await scrape(http, proxy)
        counts = [
            v for (name, _), v in metrics.items() if name == "ollama_proxy_request_duration_seconds_count"
        ]
        return sum(counts) == 2

    await eventually(both_recorded)  # histograms are observed as the response ends, not before
    async with http.get(proxy.admin_url + "/metrics") as resp:
        text = await resp.text()
    labels: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            series = labels[s.name]  # created even for a sample without labels
            for key, value in s.labels.items():
                series[key].add(value)
    return labels


async def test_every_metric_in_the_kit_is_exported(sim, make_proxy, http):
    exported = await _exported(sim, make_proxy, http)
    used = {name for expr in _expressions() for name in METRIC_NAME.findall(expr)}
    assert len(used) >= 15
    missing = sorted(used - exported.keys())
    assert not missing, f"named in docs/ but not exported by the proxy: {missing}"


def _literal_values(op: str, value: str) -> set[str]:
    """The label values a matcher names outright: `="a"` and `=~"a|b"`, not templates or patterns."""
    if "$" in value:
        return set()
    if op == "=":
        return {value}
    if op == "=~" and ALTERNATIVES.fullmatch(value):
        return set(value.split("|"))
    return set()


async def test_every_label_in_the_kit_is_exported(sim, make_proxy, http):
    exported = await _exported(sim, make_proxy, http)
    problems = []
    for expr in _expressions():
        names = set(METRIC_NAME.findall(expr))
        if not names <= exported.keys():
            continue  # reported by the test above
        for name, matchers in SELECTOR.findall(expr):
            for label, op, value in MATCHER.findall(matchers):
                if label in TARGET_LABELS:
                    continue
                if label not in exported[name]:
                    problems.append(f"{name} has no label {label!r}: {expr}")
                    continue
                unknown = _literal_values(op, value) - exported[name][label]
                if unknown:
                    problems.append(f"{name}{{{label}}} never has {sorted(unknown)}: {expr}")
        available = set().union(*(exported[n].keys() for n in names)) if names else set()
        for group in GROUPING.findall(expr):
            for label in {g.strip() for g in group.split(",")} - TARGET_LABELS - {""}:
                if label not in available:
                    problems.append(f"groups by {label!r}, which none of {sorted(names)} has: {expr}")
    assert not problems, "\n".join(problems)


# -- alert rules ---------------------------------------------------------------------------------


def test_alerts_tell_the_operator_what_to_do():
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    assert [g["name"] for g in groups] == ["ollama-queue-proxy"]
    rules = _alert_rules()
    assert {r["alert"] for r in rules} >= {
        "OllamaProxyDown", "OllamaProxyUpstreamDown", "OllamaProxyRejections",
        "OllamaProxyQueueSaturated", "OllamaProxyLongWaits", "OllamaProxyBackendDown",
    }  # fmt: skip
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"] and len(rule["annotations"]["description"]) > 80, rule["alert"]


@needs_promtool
def test_promtool_accepts_the_alert_rules():
    assert PROMTOOL is not None
    done = subprocess.run(
        [PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(_alert_rules())} rules found" in done.stdout


def _series(instance: str, name: str, values: str, **labels: str) -> dict:
    selector = ", ".join(
        f'{k}="{v}"' for k, v in {"job": "ollama-queue-proxy", "instance": instance, **labels}.items()
    )
    return {"series": f"{name}{{{selector}}}", "values": values}


@needs_promtool
def test_each_alert_fires_on_its_trouble_and_only_there(tmp_path: Path):
    """Two proxies side by side for 20 minutes: "bad" has every trouble, "good" is busy but
    healthy (including a few upstream errors among successes). Only "bad" may alert.
    promtool compares annotations too, so the rules run without them: their templates
    are checked by `promtool check rules` above."""
    assert PROMTOOL is not None
    rules = yaml.safe_load(ALERTS.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations")
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    bad, good = "bad:11436", "good:11436"
    series = [
        _series(bad, "up", "0x20"),
        _series(good, "up", "1x20"),
        _series(bad, "ollama_proxy_upstream_errors_total", "0+1x20", kind="connect"),
        _series(good, "ollama_proxy_upstream_errors_total", "0+1x20", kind="connect"),
        _series(good, "ollama_proxy_requests_total", "0+10x20", endpoint="/api/chat", model="m", code="200"),
        _series(bad, "ollama_proxy_rejected_total", "0+2x20", reason="queue_full"),
        _series(bad, "ollama_proxy_rejected_total", "0x20", reason="bad_request"),
        _series(good, "ollama_proxy_rejected_total", "0x20", reason="queue_full"),
        _series(good, "ollama_proxy_rejected_total", "0+5x20", reason="bad_request"),
        _series(bad, "ollama_proxy_queue_depth", "90x20", model="m"),
        _series(good, "ollama_proxy_queue_depth", "40x20", model="m"),
        _series(bad, "ollama_proxy_max_queue", "100x20"),
        _series(good, "ollama_proxy_max_queue", "100x20"),
        _series(bad, "ollama_proxy_oldest_wait_seconds", "0+60x20"),
        _series(good, "ollama_proxy_oldest_wait_seconds", "120x20"),
        _series(bad, "ollama_proxy_config_reloads_total", "0x9 1x11", result="failure"),
        _series(good, "ollama_proxy_config_reloads_total", "0x20", result="failure"),
        _series(bad, "ollama_proxy_backend_up", "0x20", backend="gpu-a"),
        _series(bad, "ollama_proxy_backend_up", "1x20", backend="gpu-b"),
        _series(good, "ollama_proxy_backend_up", "1x3 0x1 1x16", backend="gpu-a"),  # a blip: no alert
    ]

    def fired(alert: str, severity: str, **extra: str) -> dict:
        labels = {"job": "ollama-queue-proxy", "instance": bad, "severity": severity, **extra}
        return {"eval_time": "15m", "alertname": alert, "exp_alerts": [{"exp_labels": labels}]}

    cases = [
        fired("OllamaProxyDown", "critical"),
        fired("OllamaProxyUpstreamDown", "critical"),
        fired("OllamaProxyRejections", "warning", reason="queue_full"),
        fired("OllamaProxyQueueSaturated", "warning"),
        fired("OllamaProxyLongWaits", "warning"),
        fired("OllamaProxyConfigReloadFailed", "warning"),
        fired("OllamaProxyBackendDown", "warning", backend="gpu-a"),
        # `for:` holds an alert back: down since 0, but not yet for 2 minutes.
        {"eval_time": "1m", "alertname": "OllamaProxyDown", "exp_alerts": []},
    ]
    # A target that vanished from service discovery is down too.
    vanished = {
        "interval": "1m",
        "input_series": [_series(good, "ollama_proxy_queue_depth", "0x10", model="m")],
        "alert_rule_test": [
            {
                "eval_time": "5m",
                "alertname": "OllamaProxyDown",
                "exp_alerts": [{"exp_labels": {"job": "ollama-queue-proxy", "severity": "critical"}}],
            }
        ],
    }
    tests = {
        "rule_files": [str(tmp_path / "rules.yml")],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series, "alert_rule_test": cases}, vanished],
    }
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(tests))
    done = subprocess.run(
        [PROMTOOL, "test", "rules", str(tmp_path / "tests.yml")], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stdout + done.stderr


# -- the systemd unit ----------------------------------------------------------------------------


def _timespan(text: str) -> float:
    """A systemd time span ("45", "45s", "1min 30s") in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text)
    assert parts and "".join(f"{n}{u}" for n, u in parts) == text.replace(" ", ""), text
    return sum(float(n) * units[u] for n, u in parts)


def test_systemd_unit_reloads_with_hup_and_drains_on_term():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    unit.read_string(UNIT.read_text())
    service = unit["Service"]
    binary, *args = service["ExecStart"].split()
    assert binary.startswith("/") and binary.endswith("/ollama-queue-proxy")
    assert args == ["--config", "/etc/ollama-queue-proxy/config.yaml"]
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["KillSignal"] == "SIGTERM" and service["KillMode"] in ("mixed", "process")
    # systemd must not SIGKILL the drain: its stop timeout outlasts shutdown_grace.
    assert _timespan(service["TimeoutStopSec"]) > Config().shutdown_grace
    assert service["Restart"] == "on-failure"
    assert int(service["LimitNOFILE"]) >= 4 * Config().max_connections
    for key in ("DynamicUser", "NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert service[key] == "yes", key
    assert service["ProtectSystem"] == "strict"
    assert "network-online.target" in unit["Unit"]["After"].split()
    assert "network-online.target" in unit["Unit"]["Wants"].split()  # After= alone does not pull it in
    assert unit["Install"]["WantedBy"] == "multi-user.target"


# -- cloudflared ---------------------------------------------------------------------------------


def test_cloudflared_points_at_the_listen_port_and_ends_with_a_catch_all():
    config = yaml.safe_load(CLOUDFLARED.read_text())
    *rules, last = config["ingress"]
    assert set(last) == {"service"} and last["service"].startswith("http_status:")
    assert rules
    for rule in rules:
        assert rule["hostname"]
        service = urlsplit(rule["service"])
        assert (service.scheme, service.hostname, service.port) == ("http", "127.0.0.1", ListenConfig().port)
        assert service.port != AdminConfig().port
        origin = rule.get("originRequest", {})
        assert set(origin) <= CLOUDFLARED_ORIGIN_KEYS, set(origin) - CLOUDFLARED_ORIGIN_KEYS
        assert origin.get("disableChunkedEncoding", False) is False  # streams travel as chunks
        # cloudflared must drop an idle connection before the proxy does (else a POST races the close).
        assert parse_duration(origin["keepAliveTimeout"]) < RequestConfig().header_timeout
    # The premise of the whole file: a waiting client hears from the proxy well within the edge's limit.
    assert HeartbeatConfig().interval <= CLOUDFLARE_READ_TIMEOUT / 3


def test_operations_guide_covers_every_file_of_the_kit():
    guide = OPERATIONS.read_text()
    for path in DOCS.iterdir():
        if path != OPERATIONS:
            assert f"docs/{path.name}" in guide, path.name
