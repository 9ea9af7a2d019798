"""Tests for proxy.config: the YAML contract, its error lines and the summary."""

import dataclasses
import math
from pathlib import Path

import pytest
import yaml

from proxy.config import Config, ConfigError, LimitsConfig, config_from_dict, load_config, summary
from proxy.units import parse_duration, parse_size

REPO_CONFIG = Path(__file__).resolve().parents[3] / "config.yaml"


def problems_of(data: object) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        config_from_dict(data)
    return caught.value.problems


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


# --- defaults ---------------------------------------------------------------


def test_repo_config_yaml_is_exactly_the_defaults() -> None:
    assert load_config(REPO_CONFIG) == Config()


def test_repo_config_yaml_names_every_key() -> None:
    data = yaml.safe_load(REPO_CONFIG.read_text(encoding="utf-8"))
    for section in dataclasses.fields(Config):
        assert section.name in data
        if dataclasses.is_dataclass(section.default_factory):
            derived = {"profiles"}  # access.profiles is read from the long form of access.keys
            fields = {f.name for f in dataclasses.fields(section.default_factory)} - derived
            assert set(data[section.name]) == fields


def test_default_values_match_the_contract() -> None:
    config = Config()
    assert (config.listen.host, config.listen.port) == ("127.0.0.1", 11435)
    assert (config.admin.host, config.admin.port) == ("127.0.0.1", 11436)
    assert config.upstream.url == "http://127.0.0.1:11434"
    assert config.limits == LimitsConfig(max_concurrent=3, max_queue=100, queue_timeout=600.0)
    assert dict(config.limits.models) == {}
    assert (config.timeouts.connect, config.timeouts.read) == (10.0, 300.0)
    assert config.timeouts.generation == 1800.0
    assert (config.heartbeat.interval, config.heartbeat.non_streaming) == (15.0, True)
    assert config.request.max_body == 64 * 1024 * 1024
    assert config.metrics.path == "/metrics"
    assert config.shutdown_grace == 30.0


@pytest.mark.parametrize("text", ["", "# only a comment\n\n# and another\n", "---\n"])
def test_empty_file_means_all_defaults(tmp_path: Path, text: str) -> None:
    assert load_config(write(tmp_path, text)) == Config()


def test_empty_section_means_its_defaults() -> None:
    assert config_from_dict({"limits": None, "listen": {}}) == Config()


def test_config_is_frozen() -> None:
    config = config_from_dict({"limits": {"models": {"a": 1}}})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.limits = LimitsConfig()  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.limits.models["a"] = 2  # type: ignore[index]


# --- durations and sizes ----------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (30, 30.0),
        (1.5, 1.5),
        (0, 0.0),
        ("30", 30.0),
        ("250ms", 0.25),
        ("30s", 30.0),
        ("1.5s", 1.5),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("10 m", 600.0),
        (" 2H ", 7200.0),
    ],
)
def test_parse_duration_accepts_seconds_and_units(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    "value",
    [True, None, [], "", "abc", "5 minutes", "5d", "-5s", -1, "1h30m", math.inf, math.nan, 10**400],
)
def test_parse_duration_rejects_bad_values(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (1024, 1024),
        ("1024", 1024),
        ("100B", 100),
        ("512KiB", 512 * 1024),
        ("64MiB", 64 * 1024**2),
        ("1GiB", 1024**3),
        ("1 KB", 1000),
        ("2MB", 2_000_000),
        ("1gb", 10**9),
        ("64mib", 64 * 1024**2),
        ("1.5KiB", 1536),
    ],
)
def test_parse_size_accepts_bytes_and_units(value: object, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize("value", [True, 1.5, None, "", "64 megs", "64TiB", "-1KiB", -1, "MiB"])
def test_parse_size_rejects_bad_values(value: object) -> None:
    with pytest.raises(ValueError):
        parse_size(value)


def test_durations_and_sizes_are_parsed_in_the_config() -> None:
    config = config_from_dict(
        {
            "limits": {"queue_timeout": "90s"},
            "timeouts": {"connect": "250ms", "read": 60, "generation": "1h"},
            "heartbeat": {"interval": "1m"},
            "request": {"max_body": "1MiB"},
            "shutdown_grace": 0,
        }
    )
    assert config.limits.queue_timeout == 90.0
    assert (config.timeouts.connect, config.timeouts.read, config.timeouts.generation) == (0.25, 60.0, 3600.0)
    assert config.heartbeat.interval == 60.0
    assert config.request.max_body == 1024**2
    assert config.shutdown_grace == 0.0


# --- problem lines ----------------------------------------------------------


def test_contract_example_line_is_exact() -> None:
    assert problems_of({"limits": {"max_concurrent": 0}}) == [
        "limits.max_concurrent: must be an integer >= 1 (got 0)"
    ]


def test_unknown_key_suggests_the_close_match() -> None:
    assert problems_of({"limits": {"max_concurent": 3}}) == [
        "limits.max_concurent: unknown key (did you mean max_concurrent?)"
    ]


def test_unknown_key_without_close_match_lists_valid_keys() -> None:
    assert problems_of({"heartbeat": {"zzz": 1}}) == [
        "heartbeat.zzz: unknown key (valid keys: interval, non_streaming)"
    ]


def test_unknown_top_level_key_suggests_section() -> None:
    assert problems_of({"limit": {}}) == ["limit: unknown key (did you mean limits?)"]


@pytest.mark.parametrize(
    ("data", "line"),
    [
        ({"limits": {"max_concurrent": True}}, "limits.max_concurrent: must be an integer >= 1 (got true)"),
        ({"limits": {"max_concurrent": "3"}}, 'limits.max_concurrent: must be an integer >= 1 (got "3")'),
        ({"limits": {"max_queue": -1}}, "limits.max_queue: must be an integer >= 0 (got -1)"),
        ({"limits": [1, 2]}, "limits: must be a mapping (got list)"),
        ({"listen": {"port": 70000}}, "listen.port: must be an integer from 0 to 65535 (got 70000)"),
        ({"admin": {"host": ""}}, 'admin.host: must be a non-empty string (got "")'),
        (
            {"limits": {"queue_timeout": 0}},
            "limits.queue_timeout: must be a duration > 0, such as 250ms, 30s, 5m or 1h (got 0)",
        ),
        (
            {"timeouts": {"read": "5 minutes"}},
            'timeouts.read: must be a duration > 0, such as 250ms, 30s, 5m or 1h (got "5 minutes")',
        ),
        (
            {"timeouts": {"generation": 0}},
            "timeouts.generation: must be a duration > 0, such as 250ms, 30s, 5m or 1h (got 0)",
        ),
        (
            {"shutdown_grace": "-1s"},
            'shutdown_grace: must be a duration >= 0, such as 0, 30s or 2m (got "-1s")',
        ),
        (
            {"heartbeat": {"non_streaming": "maybe"}},
            'heartbeat.non_streaming: must be true or false (got "maybe")',
        ),
        (
            {"request": {"max_body": 0}},
            "request.max_body: must be a size >= 1 byte, such as 1048576, 512KiB or 64MiB (got 0)",
        ),
        (
            {"upstream": {"url": "ftp://host"}},
            'upstream.url: must be an http:// or https:// URL with a host, such as http://127.0.0.1:11434 (got "ftp://host")',
        ),
        (
            {"upstream": {"url": "http://"}},
            'upstream.url: must be an http:// or https:// URL with a host, such as http://127.0.0.1:11434 (got "http://")',
        ),
        (
            {"upstream": {"url": "http://h/x?a=1"}},
            'upstream.url: must not have a query or fragment (got "http://h/x?a=1")',
        ),
        ({"metrics": {"path": "metrics"}}, 'metrics.path: must be a path starting with "/" (got "metrics")'),
        (
            {"metrics": {"path": "/-/metrics"}},
            'metrics.path: must not be under "/-/", which holds the proxy\'s own endpoints (got "/-/metrics")',
        ),
        (
            {"listen": {"port": 9000}, "admin": {"port": 9000}},
            "admin.port: must differ from listen.port on the same host (got 9000)",
        ),
        (
            {"listen": {"host": "0.0.0.0", "port": 9000}, "admin": {"port": 9000}},
            "admin.port: must differ from listen.port on the same host (got 9000)",
        ),
    ],
)
def test_each_problem_names_path_requirement_and_value(data: object, line: str) -> None:
    assert problems_of(data) == [line]


def test_port_zero_may_repeat_because_the_os_picks() -> None:
    config = config_from_dict({"listen": {"port": 0}, "admin": {"port": 0}})
    assert (config.listen.port, config.admin.port) == (0, 0)


def test_same_port_on_different_hosts_is_allowed() -> None:
    config = config_from_dict(
        {"listen": {"host": "127.0.0.1", "port": 9000}, "admin": {"host": "10.0.0.5", "port": 9000}}
    )
    assert config.admin.host == "10.0.0.5"


@pytest.mark.parametrize(
    ("url", "stored"),
    [
        ("http://127.0.0.1:11434/", "http://127.0.0.1:11434"),
        ("https://gpu.example:8443/ollama/", "https://gpu.example:8443/ollama"),
        ("http://[::1]:11434", "http://[::1]:11434"),
    ],
)
def test_upstream_url_keeps_path_prefix_and_drops_one_trailing_slash(url: str, stored: str) -> None:
    assert config_from_dict({"upstream": {"url": url}}).upstream.url == stored


def test_top_level_that_is_not_a_mapping_is_one_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, "- listen\n- limits\n"))
    assert caught.value.problems == [f"{tmp_path / 'config.yaml'}: must be a mapping (got list)"]


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "limits:\n  max_concurrent: 0\n  max_queue: many\nheartbeat:\n  intervall: 15s\n",
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == [
        "limits.max_concurrent: must be an integer >= 1 (got 0)",
        'limits.max_queue: must be an integer >= 0 (got "many")',
        "heartbeat.intervall: unknown key (did you mean interval?)",
    ]
    assert str(caught.value) == "\n".join(caught.value.problems)


# --- models -----------------------------------------------------------------


def test_models_map_names_to_caps_in_file_order(tmp_path: Path) -> None:
    path = write(tmp_path, 'limits:\n  models:\n    "gpt-oss:120b": 1\n    llama3.1:8b: 2\n')
    models = load_config(path).limits.models
    assert list(models.items()) == [("gpt-oss:120b", 1), ("llama3.1:8b", 2)]


def test_each_bad_model_cap_is_named_by_model() -> None:
    assert problems_of({"limits": {"models": {"gpt-oss:120b": 0, "ok": 1, "qwen3:32b": "two"}}}) == [
        "limits.models.gpt-oss:120b: must be an integer >= 1 (got 0)",
        'limits.models.qwen3:32b: must be an integer >= 1 (got "two")',
    ]


@pytest.mark.parametrize(
    ("models", "line"),
    [
        ({"": 1}, 'limits.models: model names must be non-empty strings (got "")'),
        ({7: 1}, "limits.models: model names must be non-empty strings (got 7)"),
        (["gpt-oss:120b"], "limits.models: must be a mapping of model name to cap (got list)"),
    ],
)
def test_models_must_be_a_mapping_of_names(models: object, line: str) -> None:
    assert problems_of({"limits": {"models": models}}) == [line]


# --- reading the file -------------------------------------------------------


def test_missing_file_is_one_clean_line(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == [f"{path}: no such file; create it or pass --config PATH"]
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_directory_is_one_clean_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path)
    assert caught.value.problems == [f"{tmp_path}: is a directory, not a config file"]


def test_bad_yaml_is_one_line_with_position(tmp_path: Path) -> None:
    path = write(tmp_path, "limits:\n  max_concurrent: 3\n   max_queue: 5\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == [
        f"{path}: invalid YAML at line 3, column 13: mapping values are not allowed here"
    ]


def test_yaml_value_that_cannot_be_constructed_is_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, "shutdown_grace: 2024-13-45\n")  # YAML reads this as a date
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == [f"{path}: invalid YAML: month must be in 1..12"]


def test_duplicate_key_is_an_error_not_a_silent_override(tmp_path: Path) -> None:
    path = write(tmp_path, "limits:\n  max_queue: 5\nlimits:\n  max_queue: 7\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == [
        f'{path}: invalid YAML at line 3, column 1: duplicate key "limits" (first at line 1)'
    ]


def test_yaml_merge_keys_may_override(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "listen: &net {host: 10.0.0.1, port: 9000}\nadmin:\n  <<: *net\n  port: 9001\n",
    )
    assert load_config(path).admin.port == 9001


def test_non_utf8_file_is_one_clean_line(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"limits:\n  max_queue: \xff\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == [f"{path}: not UTF-8 text (bad byte on line 2)"]


# --- summary ----------------------------------------------------------------


def test_summary_of_defaults_shows_the_key_figures() -> None:
    text = summary(Config())
    for figure in [
        "127.0.0.1:11435",
        "127.0.0.1:11436",
        "http://127.0.0.1:11434",
        "limits.max_concurrent    3",
        "limits.max_queue         100",
        "limits.queue_timeout     10m",
        "timeouts.connect         10s",
        "timeouts.read            5m",
        "timeouts.generation      30m per non-streaming answer",
        "heartbeat.interval       15s",
        "heartbeat.non_streaming  true",
        "request.max_body         64 MiB",
        "127.0.0.1:11436  (/metrics and /-/*)",
        "shutdown_grace           30s",
    ]:
        assert figure in text
    assert len(text.splitlines()) <= 24


def test_summary_shows_model_caps_and_small_units() -> None:
    config = config_from_dict(
        {
            "listen": {"port": 0},
            "limits": {"max_queue": 0, "models": {"gpt-oss:120b": 1}},
            "heartbeat": {"interval": "250ms"},
            "request": {"max_body": "512KiB"},
            "shutdown_grace": 0,
        }
    )
    lines = summary(config).splitlines()
    assert any(line.startswith("limits.models.gpt-oss:120b") and line.endswith("1 at once") for line in lines)
    assert any(line.startswith("listen") and "any free port" in line for line in lines)
    assert any(line.startswith("limits.max_queue") and "503" in line for line in lines)
    assert any(line.startswith("heartbeat.interval") and line.endswith(" 250ms") for line in lines)
    assert any(line.startswith("request.max_body") and line.endswith(" 512 KiB") for line in lines)
    assert any(line.startswith("shutdown_grace") and line.endswith(" 0s") for line in lines)


# --- access, log and the hostile-client bounds ------------------------------


def test_keys_inline_list_env_and_file_merge_under_their_names(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PROXY_TEST_KEY", "from-env-0123")
    (tmp_path / "keys.txt").write_text("# team keys\nalice alice-key-1\n\nbare-key-2  # no name\n")
    path = write(
        tmp_path,
        "access:\n  keys: {ci: '${PROXY_TEST_KEY}', bob: bob-key}\n  keys_file: keys.txt\n",
    )
    keys = dict(load_config(path).access.keys)
    assert keys == {
        "ci": "from-env-0123",
        "bob": "bob-key",
        "alice": "alice-key-1",
        "keys.txt:4": "bare-key-2",
    }
    listed = config_from_dict({"access": {"keys": ["k-one", "k-two"]}}).access.keys
    assert dict(listed) == {"keys[0]": "k-one", "keys[1]": "k-two"}


def test_keys_never_appear_in_repr_or_problems(tmp_path: Path) -> None:
    config = config_from_dict({"access": {"keys": {"alice": "sekrit-value"}}})
    assert "sekrit" not in repr(config)
    with pytest.raises(ConfigError) as err:
        config_from_dict({"access": {"keys": {"alice": "has space sekrit", "bob": "${NOT_SET_ANYWHERE_X}"}}})
    text = "\n".join(err.value.problems)
    assert "sekrit" not in text
    assert "access.keys.alice: a key may hold only" in text
    assert "access.keys.bob: environment variable NOT_SET_ANYWHERE_X is not set or empty" in text


def test_keys_file_problems_name_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "keys.txt").write_text("a b c\nsame k1\nother k1\n")
    path = write(tmp_path, "access:\n  keys_file: keys.txt\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = "\n".join(err.value.problems)
    assert "keys.txt line 1: expected KEY or NAME KEY" in text
    assert "two names share one key" in text
    missing = write(tmp_path, "access:\n  keys_file: nowhere.txt\n")
    with pytest.raises(ConfigError, match=r"access.keys_file: cannot read .*nowhere.txt"):
        load_config(missing)


@pytest.mark.parametrize(
    ("data", "line"),
    [
        ({"log": {"format": "xml"}}, 'log.format: must be one of text, json (got "xml")'),
        ({"log": {"level": "loud"}}, 'log.level: must be one of debug, info, warning, error (got "loud")'),
        (
            {"access": {"admin_endpoints": True}},
            "access.admin_endpoints: must be one of deny, allow (got true)",
        ),
        (
            {"access": {"max_queued_per_key": -1}},
            "access.max_queued_per_key: must be an integer >= 0 (got -1)",
        ),
        ({"listen": {"max_connections": 0}}, "listen.max_connections: must be an integer >= 1 (got 0)"),
        ({"listen": {"trusted_proxies": ["nope"]}}, "listen.trusted_proxies: must be a list of IP addresses"),
        ({"request": {"body_timeout": 0}}, "request.body_timeout: must be a duration > 0"),
    ],
)
def test_new_keys_are_validated(data: dict, line: str) -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    assert any(problem.startswith(line) for problem in err.value.problems), err.value.problems


def test_trusted_proxies_accept_addresses_and_networks() -> None:
    config = config_from_dict({"listen": {"trusted_proxies": ["10.0.0.0/8", "192.168.1.7", "fd00::/8"]}})
    assert [str(n) for n in config.listen.trusted_proxies] == ["10.0.0.0/8", "192.168.1.7/32", "fd00::/8"]


# --- who goes first: scheduling and the long form of access.keys ------------------------------


def test_long_form_keys_and_scheduling_are_read_and_summarised() -> None:
    from proxy.config import KeyProfile, SchedulingConfig, summary

    config = config_from_dict(
        {
            "access": {
                "keys": {
                    "alice": "sk-alice-0123456789",
                    "batch": {"key": "sk-batch-0123456789", "priority": "low", "weight": 2, "max_running": 2},
                }
            },
            "scheduling": {"fairness": "header:X-User-Id", "cost": "requests", "priority_header": ""},
        }
    )
    assert dict(config.access.keys) == {"alice": "sk-alice-0123456789", "batch": "sk-batch-0123456789"}
    assert dict(config.access.profiles) == {"batch": KeyProfile(priority="low", weight=2.0, max_running=2)}
    assert config.scheduling == SchedulingConfig("header:X-User-Id", "requests", "")
    [row] = [line for line in summary(config).splitlines() if line.startswith("access.keys")]
    assert row.endswith(
        "2 (alice, batch); fairness header:X-User-Id, cost requests, no priority header; batch: low x2 running<=2"
    )
    assert Config().scheduling == SchedulingConfig("key", "tokens", "X-Priority")


def test_scheduling_problems_are_named_by_their_yaml_path() -> None:
    with pytest.raises(ConfigError) as raised:
        config_from_dict(
            {
                "access": {
                    "keys": {
                        "b": {"key": "sk-b-0123456789", "priority": "urgent", "weight": 0, "max_queud": 1},
                        "c": {"priority": "low"},
                        "d": {"key": "sk-d-0123456789", "max_running": -1},
                    }
                },
                "scheduling": {"fairness": "who", "cost": "gpu", "priority_header": "X Priority", "nope": 1},
            }
        )
    assert raised.value.problems == [
        "scheduling.fairness: must be one of key, ip, none, or header:NAME such as header:X-User-Id (got 'who')",
        "scheduling.cost: must be one of tokens, requests (got 'gpu')",
        "scheduling.priority_header: must be a header name such as X-Priority, or \"\" (got 'X Priority')",
        "scheduling.nope: unknown key (valid keys: fairness, cost, priority_header)",
        "access.keys.b.priority: must be one of high, normal, low (got 'urgent')",
        "access.keys.b.weight: must be a number above 0, such as 1 or 2.5 (got 0)",
        "access.keys.b.max_queud: unknown key (valid keys: key, priority, weight, max_queued, max_running)",
        "access.keys.c.key: missing; a long-form entry needs its key (key: sk-...)",
        "access.keys.d.max_running: must be a whole number, 0 or more (got -1)",
    ]
