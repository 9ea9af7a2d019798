"""Model names as Ollama reads them: the one spelling of every name that runs as one model.

Caps, queue keys, metric labels, the upstream model list and the simulator all
compare names; they all compare them here, so two spellings of one model can
never count as two.
"""

from __future__ import annotations

import re


def canonical_model(name: str) -> str:
    """The one spelling of every name Ollama runs as one model, for caps, queue keys and labels.

    Follows Ollama's `modelref.ParseRef` then `model.ParseName` (types/model/name.go):
    surrounding spaces are trimmed; a `:local` suffix is dropped and a `:cloud`
    one folded into the tag as Ollama pulls it (`m:cloud`, `m:7b-cloud`); the
    name splits into host/namespace/model:tag (a scheme such as `https://` is
    ignored), empty parts take the defaults registry.ollama.ai, library and
    latest, and parts compare case-insensitively. The result is the shortest
    spelling (Ollama's `DisplayShortest`), lowercased: `big`, `library/big`,
    `registry.ollama.ai/library/big:latest` and `Big:Latest` are all
    `big:latest`; `hf.co/org/repo:Q4` stays `hf.co/org/repo:q4`.

    A name Ollama would refuse as invalid (it answers 404) is only trimmed and
    lowercased: it still needs a stable key, and never matches a valid one.
    """
    raw = name.strip()
    base, cloud, explicit = _source_suffix(raw)
    if explicit and _source_suffix(base)[2]:
        return raw.lower()  # "m:cloud:local": Ollama refuses the conflict
    if cloud:
        base = base + ("-cloud" if _has_tag(base) else ":cloud")
    parts = _parse_name(base)
    if parts is None:
        return raw.lower()
    host, namespace, model, tag = (part.lower() for part in parts)
    if host != _DEFAULT_HOST:
        return f"{host}/{namespace}/{model}:{tag}"
    if namespace != _DEFAULT_NAMESPACE:
        return f"{namespace}/{model}:{tag}"
    return f"{model}:{tag}"


_DEFAULT_HOST = "registry.ollama.ai"
_DEFAULT_NAMESPACE = "library"
#: Each part's pattern and length, as Ollama's `isValidPart` checks them (ASCII only).
_HOST_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,349}")
_NAMESPACE_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,79}")
_MODEL_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}")


def _parse_name(name: str) -> tuple[str, str, str, str] | None:
    """Ollama's `ParseName` and `IsValid`: (host, namespace, model, tag) with defaults, or None."""
    rest, tag = name, "latest"
    if name.rfind(":") > name.rfind("/"):
        rest, _, tag = name.rpartition(":")
    parts = rest.split("/")
    if len(parts) > 3:
        # Ollama cuts at the last two slashes: what is left is the host, slashes and all
        # (so invalid), unless a scheme's "//" accounts for them.
        parts = ["/".join(parts[:-2]), parts[-2], parts[-1]]
    host, namespace, model = [_DEFAULT_HOST, _DEFAULT_NAMESPACE][: 3 - len(parts)] + parts
    host = host.partition("://")[2] or host
    checks = ((_HOST_PART, host), (_NAMESPACE_PART, namespace), (_MODEL_PART, model), (_MODEL_PART, tag))
    if not all(pattern.fullmatch(part) for pattern, part in checks):
        return None
    return host, namespace, model, tag


def _source_suffix(name: str) -> tuple[str, bool, bool]:
    """Ollama's `parseSourceSuffix`: (name without it, cloud?, had an explicit suffix?)."""
    base, colon, suffix = name.rpartition(":")
    if not colon:
        return name, False, False
    folded = suffix.strip().lower()
    if folded in ("cloud", "local"):
        return base, folded == "cloud", True
    if "/" not in suffix and folded.endswith("-cloud"):
        return f"{base}:{suffix.strip()[: -len('-cloud')]}", True, True
    return name, False, False


def _has_tag(name: str) -> bool:
    return name.rfind(":") > name.rfind("/")
