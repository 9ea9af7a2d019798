"""The fleet's config: `backends`, `health.unhealthy_after`, the one-backend form and the summary row."""

from __future__ import annotations

import pytest

from proxy.config import DEFAULT_BACKEND, ConfigError, config_from_dict, summary

TWO = {
    "gpu-a": {"url": "http://10.0.0.5:11434/", "max_concurrent": 4, "models": {"gpt-oss:120b": 1}},
    "gpu-b": {"url": "http://10.0.0.6:11434", "max_concurrent": 2},
}


def problems(data: object) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        config_from_dict(data)
    return caught.value.problems


def test_backends_are_read_in_order_and_the_global_limit_defaults_to_their_sum() -> None:
    config = config_from_dict({"backends": TWO})
    assert list(config.fleet) == ["gpu-a", "gpu-b"]
    assert config.fleet["gpu-a"].url == "http://10.0.0.5:11434"  # trailing slash dropped
    assert dict(config.fleet["gpu-a"].models) == {"gpt-oss:120b": 1}
    assert config.limits.max_concurrent == 6
    assert config.health.unhealthy_after == 2


def test_an_explicit_global_limit_stands() -> None:
    config = config_from_dict({"backends": TWO, "limits": {"max_concurrent": 3}})
    assert config.limits.max_concurrent == 3


def test_upstream_url_alone_is_one_backend_named_default() -> None:
    config = config_from_dict({"upstream": {"url": "http://127.0.0.1:9"}, "limits": {"max_concurrent": 5}})
    assert list(config.fleet) == [DEFAULT_BACKEND]
    assert config.fleet[DEFAULT_BACKEND].url == "http://127.0.0.1:9"
    assert config.fleet[DEFAULT_BACKEND].max_concurrent == 5


def test_problems_are_named_by_yaml_path() -> None:
    found = problems(
        {
            "upstream": {"url": "http://127.0.0.1:9"},
            "backends": {
                "a": {"url": "ftp://x", "max_concurrent": 0},
                "b": {"max_concurrent": 1, "model": {}},
                "c": {"url": "http://h:1"},
                "d": {"url": "http://h:1", "max_concurrent": 1},
            },
            "health": {"unhealthy_after": 0},
        }
    )
    text = "\n".join(found)
    assert "backends.a.url: must be an http:// or https:// URL" in text
    assert "backends.a.max_concurrent: must be an integer >= 1 (got 0)" in text
    assert "backends.b.url: required" in text
    assert "backends.b.model: unknown key (did you mean models?)" in text
    assert "backends.c.max_concurrent: required" in text
    assert "backends.d.url: the same host as backends.c" in text
    assert "upstream.url: give either upstream.url (one Ollama) or backends (several), not both" in text
    assert "health.unhealthy_after: must be an integer >= 1 (got 0)" in text


def test_a_malformed_backends_section_is_refused_and_an_empty_one_means_upstream_url() -> None:
    assert list(config_from_dict({"backends": {}}).fleet) == [DEFAULT_BACKEND]
    assert problems({"backends": []})[0].startswith("backends: must be a mapping of backend name")
    assert problems({"backends": {"a": 3}})[0] == "backends.a: must be a mapping (got 3)"


def test_the_summary_shows_the_fleet_on_one_row_within_one_screen() -> None:
    text = summary(config_from_dict({"backends": TWO}))
    rows = [line for line in text.splitlines() if line.startswith("backends")]
    assert len(rows) == 1
    assert "gpu-a http://10.0.0.5:11434 (4, gpt-oss:120b 1)" in rows[0]
    assert "gpu-b http://10.0.0.6:11434 (2)" in rows[0]
    assert "upstream.url" not in text
    assert len(text.splitlines()) + 1 <= 24
