"""Where client keys come from: inline in the file, a keys file, or `${ENV}` references.

Kept apart from validation because it is the one part of a config that reads
the environment and another file, and because a key is a secret: no message
built here ever echoes one.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from types import MappingProxyType

from proxy.config.schema import AccessConfig
from proxy.units import kind_of

_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
#: What an `Authorization: Bearer` token may hold (RFC 6750's b64token).
_KEY_SHAPE = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


def resolve_key(value: object, path: str, problems: list[str]) -> str | None:
    """A key, with a whole-value `${VAR}` reference read from the environment,
    so secrets can stay out of the file."""
    if not isinstance(value, str) or not value:
        problems.append(f"{path}: must be a non-empty string (got {kind_of(value)})")
        return None
    reference = _ENV_REFERENCE.fullmatch(value)
    if reference:
        value = os.environ.get(reference.group(1), "")
        if not value:
            problems.append(f"{path}: environment variable {reference.group(1)} is not set or empty")
            return None
    if not _KEY_SHAPE.fullmatch(value):
        # Never echo the key itself: the message ends up in logs.
        problems.append(f"{path}: a key may hold only letters, digits and -._~+/ (and trailing =)")
        return None
    return value


def read_keys_file(path: str, problems: list[str]) -> dict[str, str]:
    """One key per line, optionally preceded by its name (`alice KEY`); `#` starts a comment."""
    where = "access.keys_file"
    try:
        with open(path, encoding="utf-8") as file:
            lines = file.read().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        problems.append(f"{where}: cannot read {path}: {reason}")
        return {}
    keys: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) > 2:
            problems.append(f"{where}: {path} line {number}: expected KEY or NAME KEY")
            continue
        name = fields[0] if len(fields) == 2 else f"{os.path.basename(path)}:{number}"
        resolved = resolve_key(fields[-1], f"{where}: {path} line {number}", problems)
        if resolved is not None:
            keys[name] = resolved
    return keys


def merge_keys(access: AccessConfig, base: str, problems: list[str]) -> AccessConfig:
    """Add the keys file to the inline keys; a name or key given twice is a mistake."""
    keys = dict(access.keys)
    if access.keys_file:
        for name, key in read_keys_file(os.path.join(base, access.keys_file), problems).items():
            if name in keys:
                problems.append(f"access.keys_file: the name {name!r} is also used in access.keys")
            keys[name] = key
    if len(set(keys.values())) != len(keys):
        problems.append("access.keys: two names share one key; give every client its own key")
    return replace(access, keys=MappingProxyType(keys))
