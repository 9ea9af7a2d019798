"""Tests for proxy.config.load: the stamp returned with a config is the file that was read."""

from __future__ import annotations

import os
from pathlib import Path

from proxy.config import read_config, stamp


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_the_stamp_of_an_unchanged_file_is_the_stamp_it_was_read_with(tmp_path) -> None:
    path = write(tmp_path / "config.yaml", "limits: {max_concurrent: 2}\n")
    config, read_at = read_config(path)
    assert config.limits.max_concurrent == 2
    assert stamp(path) == read_at


def test_a_file_replaced_after_the_read_has_another_stamp(tmp_path) -> None:
    """An editor's write-and-rename, the same size: a new inode, so a new stamp."""
    path = write(tmp_path / "config.yaml", "limits: {max_concurrent: 2}\n")
    _, read_at = read_config(path)
    os.replace(write(tmp_path / "config.yaml.new", "limits: {max_concurrent: 3}\n"), path)
    assert stamp(path) not in (None, read_at)


def test_a_missing_file_has_no_stamp(tmp_path) -> None:
    assert stamp(tmp_path / "absent.yaml") is None
