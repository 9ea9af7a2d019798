"""Reading a config file: bytes, UTF-8, strict YAML, then `validate`.

Every failure, including a missing or unreadable file, becomes a `ConfigError`
with a line the CLI can print as is. The file's stat is taken from the very
file that is read, before reading it, so that `--watch` compares later stats
against what was actually loaded: a change made just after the load is a change.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import yaml

from proxy.config.schema import Config, ConfigError
from proxy.config.validate import config_from_dict, show


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys: plain YAML keeps the last one
    silently, so a second `limits:` block would quietly discard the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` may legitimately repeat keys it overrides
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark)
            except TypeError:
                continue  # unhashable key: SafeLoader reports it below
            if first is not key_node.start_mark:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {show(key)} (first at line {first.line + 1})",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(err: Exception) -> str:
    """One line for a YAML failure: PyYAML's own message spans several lines
    and quotes the source, which would break the one-line-per-problem output."""
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        if mark is not None:
            reason = err.problem or err.context
            return f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {reason}"
    return "invalid YAML: " + " ".join(str(err).split())


class FileStamp(NamedTuple):
    """A file's identity and version as its stat shows them: an editor's write-and-rename
    changes the inode, an in-place write the mtime or the size."""

    mtime_ns: int
    size: int
    inode: int

    @classmethod
    def of(cls, stat: os.stat_result) -> FileStamp:
        return cls(stat.st_mtime_ns, stat.st_size, stat.st_ino)


def stamp(path: str | os.PathLike[str]) -> FileStamp | None:
    """The file's stamp now; None while it is missing (an editor replacing it)."""
    try:
        return FileStamp.of(os.stat(path))
    except OSError:
        return None


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a config file. Every failure, including a missing or
    unreadable file, is a `ConfigError` with a line the CLI can print as is, so
    an operator never sees a traceback for a config mistake."""
    return read_config(path)[0]


def read_config(path: str | os.PathLike[str]) -> tuple[Config, FileStamp]:
    """`load_config`, and the stamp of the file that was read, taken from the open file
    before reading it: a change written at any moment after this read shows as a
    different stamp (a change between the stamp and the read only costs a second
    reload of the same text)."""
    name = os.fspath(path)
    try:
        with open(path, "rb") as file:
            read_at = FileStamp.of(os.fstat(file.fileno()))
            raw = file.read()
    except FileNotFoundError:
        raise ConfigError([f"{name}: no such file; create it or pass --config PATH"]) from None
    except IsADirectoryError:
        raise ConfigError([f"{name}: is a directory, not a config file"]) from None
    except OSError as err:
        raise ConfigError([f"{name}: cannot read: {err.strerror or err}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ConfigError([f"{name}: not UTF-8 text (bad byte on line {line})"]) from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 -- a SafeLoader subclass
    except (yaml.YAMLError, ValueError) as err:  # ValueError: e.g. a date like 2024-13-45
        raise ConfigError([f"{name}: {_yaml_problem(err)}"]) from None
    config = config_from_dict(data, source=name, base=os.path.dirname(os.path.abspath(name)))
    return config, read_at
