"""Who may use the listen port, and for what: pure checks, no I/O.

Three things a public tunnel needs and a loopback Ollama never had:

* one canonical request path, so what the proxy classifies (queue or not,
  model management or not) is exactly what upstream runs: an encoded or dotted
  variant can neither skip the queue nor reach a model-management endpoint;
* Ollama's model-management endpoints (pull, push, create, delete, copy, blobs)
  closed unless the operator opens them (`access.admin_endpoints`, a name kept
  for existing configs: they have nothing to do with the proxy's admin port),
  since one `DELETE /api/delete` from the internet removes a model;
* bearer keys, compared in constant time, so a key's name (never the key)
  can label logs and per-key limits.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from urllib.parse import quote, unquote_to_bytes

from multidict import MultiMapping

from proxy.config import PRIORITIES, AccessConfig
from proxy.errors import BadRequest, Forbidden, Unauthorized
from proxy.observe.logs import clip

#: RFC 3986 pchar less "%": every other byte is escaped, so upstream decodes
#: exactly the path classified here and nothing it could read two ways.
_SAFE = "/:@!$&'()*+,;=-._~"
#: ASCII controls, NUL included; a backslash is a separator to some servers.
_REFUSED = frozenset(range(0x20)) | {0x7F}
_BACKSLASH = 0x5C

#: Ollama's endpoints that change what is installed; `blobs` also covers `/api/blobs/<digest>`.
MODEL_MANAGEMENT_ENDPOINTS = frozenset({"/api/pull", "/api/push", "/api/create", "/api/delete", "/api/copy"})
_BLOBS = "/api/blobs"

#: Request headers that are the proxy's credential, never upstream's.
CREDENTIAL_HEADERS = frozenset({"authorization"})
_MISSING = "missing or invalid API key: send Authorization: Bearer <key>"


def canonical_path(raw_path: str) -> str:
    """The one path the proxy classifies and forwards, from the request target as sent.

    Decoded once, dot segments resolved (never above root), repeated slashes
    collapsed, a trailing slash kept, then re-escaped. Anything still
    ambiguous after one decoding is refused rather than guessed at: a
    leftover `%` (double encoding), a backslash, a control character.
    The query (after the first `?`) is not part of the result.
    """
    raw = raw_path.partition("?")[0]
    if not raw.startswith("/"):
        raise BadRequest("request path must start with '/' (absolute and '*' targets are not served)")
    if not raw.isascii():
        raise BadRequest("request path must be ASCII: percent-encode any other byte")
    decoded = unquote_to_bytes(raw)
    if b"%" in decoded:
        raise BadRequest("request path is double percent-encoded: it still holds '%' once decoded")
    if _BACKSLASH in decoded:
        raise BadRequest("request path must not contain a backslash")
    if not _REFUSED.isdisjoint(decoded):
        raise BadRequest("request path must not contain control characters")
    segments = decoded.split(b"/")[1:]
    kept: list[bytes] = []
    for segment in segments:
        if segment == b"..":
            if kept:
                kept.pop()
        elif segment not in (b"", b"."):
            kept.append(segment)
    # "/a/b/" and "/a/b/." both name a directory; RFC 3986 5.2.4 keeps the slash for "." and "..".
    trailing = bool(kept) and segments[-1] in (b"", b".", b"..")
    path = b"/" + b"/".join(kept) + (b"/" if trailing else b"")
    return quote(path, safe=_SAFE)


def is_model_management(path: str) -> bool:
    """Whether a canonical path is one of Ollama's model-management endpoints, in any letter case.

    Ollama's router matches case-sensitively, so `/API/DELETE` is a 404 there
    today; refusing it anyway costs nothing and survives a router that
    redirects to the fixed-case path.
    """
    folded = path.lower()
    if folded.endswith("/") and folded != "/":
        folded = folded[:-1]
    return folded in MODEL_MANAGEMENT_ENDPOINTS or folded == _BLOBS or folded.startswith(_BLOBS + "/")


def check_model_management(path: str, access: AccessConfig) -> None:
    """Refuse a model-management endpoint unless `access.admin_endpoints` is `allow`
    (the message keeps the config key's word, "admin", so it names what to set)."""
    if access.admin_endpoints != "allow" and is_model_management(path):
        raise Forbidden(
            f"{path} is an admin endpoint, closed on this proxy; "
            "set access.admin_endpoints: allow in config.yaml to open it"
        )


class Keys:
    """Configured keys, hashed once, matched in time independent of which key (if any) matches.

    Comparing SHA-256 digests rather than the keys keeps `compare_digest`'s
    inputs one length, so not even a key's length leaks through timing.
    """

    def __init__(self, keys: Mapping[str, str]) -> None:
        self._digests = tuple((name, _digest(key.encode())) for name, key in keys.items())

    def __bool__(self) -> bool:
        return bool(self._digests)

    def match(self, token: bytes) -> str | None:
        """The name of the key equal to `token`; every key is compared, whatever the outcome."""
        presented = _digest(token)
        found: str | None = None
        for name, digest in self._digests:
            if hmac.compare_digest(presented, digest):
                found = name
        return found


class KeysByConfig:
    """`Keys` for a config's mapping, hashed once per config rather than per request.

    Owned by the server (one per listen app) and passed in, so two proxies in one
    process never share it. Keyed by identity: a config holds its mapping for its
    whole life and this holds it too, so an id is never reused while kept.
    """

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last: tuple[Mapping[str, str], Keys] | None = None

    def of(self, keys: Mapping[str, str]) -> Keys:
        last = self._last
        if last is not None and last[0] is keys:
            return last[1]
        built = Keys(keys)
        self._last = (keys, built)
        return built


def authenticate(authorization: str | None, table: Keys) -> str:
    """The name of the client's key; "" when no keys are configured (auth off).

    Raises `Unauthorized` otherwise; its message never repeats what was sent.
    """
    if not table:
        return ""
    scheme, _, token = (authorization or "").strip().partition(" ")
    token = token.strip()
    if scheme.lower() == "bearer" and token:
        name = table.match(token.encode("utf-8", "surrogatepass"))
        if name is not None:
            return name
    raise Unauthorized(_MISSING)


def priority_of(requested: str | None, base: str, header: str) -> int:
    """The request's priority (0 high .. 2 low): its key's `base`, lowered (never raised) by
    the `header` value `requested`; an unknown value is a `BadRequest` naming the allowed ones."""
    rank = PRIORITIES.index(base)
    if requested is None or not header:
        return rank
    wanted = requested.strip().lower()
    if wanted not in PRIORITIES:
        raise BadRequest(
            f"{header}: unknown priority {clip(requested)!r}; use one of {', '.join(PRIORITIES)} "
            "(a request may only lower its priority)"
        )
    return max(rank, PRIORITIES.index(wanted))


#: A party named by a header is the app's own string: bounded so a client cannot grow the counters.
_MAX_PARTY = 128


def party_of(fairness: str, key_name: str, address: str, headers: MultiMapping[str]) -> str:
    """Who the request shares the slots fairly as, per `scheduling.fairness`."""
    if fairness == "key":
        return key_name
    if fairness == "ip":
        return address
    if fairness.startswith("header:"):
        return headers.get(fairness[7:], "")[:_MAX_PARTY]
    return ""


def private_headers(access: AccessConfig) -> frozenset[str]:
    """Request headers not to forward: the key is the proxy's credential when keys are on,
    and an ordinary end-to-end header (Ollama's own, behind some other gateway) when off."""
    return CREDENTIAL_HEADERS if access.keys else frozenset()


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


# --- Browser apps (CORS) ----------------------------------------------------------------
#
# As Ollama answers them: gin-contrib/cors (v1.7.2) configured by ollama's server/routes.go
# (`AllowWildcard`, `AllowBrowserExtensions`, its own `AllowHeaders`, the defaults' methods
# and max-age) with envconfig.AllowedOrigins(). A cross-origin request whose origin is not
# allowed is refused, as Ollama refuses it: a browser would not let the page read the answer,
# and a "simple" request (no preflight) would otherwise still cost a generation.

#: Ollama's own list, `envconfig.AllowedOrigins()` with OLLAMA_ORIGINS unset.
OLLAMA_ORIGINS = tuple(
    f"{scheme}://{host}{port}"
    for host in ("localhost", "127.0.0.1", "0.0.0.0")
    for port in ("", ":*")
    for scheme in ("http", "https")
) + ("app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*")
#: What `access.cors_origins` may name besides origins.
DEFAULT_ORIGINS, ANY_ORIGIN = "default", "*"

#: A preflight's headers as gin-contrib/cors writes them with Ollama's config
#: (header names canonicalised as Go's http.CanonicalHeaderKey does).
_PREFLIGHT = (
    ("Access-Control-Allow-Methods", "GET,POST,PUT,PATCH,DELETE,HEAD,OPTIONS"),
    (
        "Access-Control-Allow-Headers",
        "Authorization,Content-Type,User-Agent,Accept,X-Requested-With,Openai-Beta,X-Stainless-Arch,"
        "X-Stainless-Async,X-Stainless-Custom-Poll-Interval,X-Stainless-Helper-Method,X-Stainless-Lang,"
        "X-Stainless-Os,X-Stainless-Package-Version,X-Stainless-Poll-Helper,X-Stainless-Retry-Count,"
        "X-Stainless-Runtime,X-Stainless-Runtime-Version,X-Stainless-Timeout",
    ),
    ("Access-Control-Max-Age", "43200"),  # 12 h, gin-contrib/cors's default
)
_PREFLIGHT_VARY = tuple(
    ("Vary", v) for v in ("Origin", "Access-Control-Request-Method", "Access-Control-Request-Headers")
)

#: Header pairs, in order; a list of pairs since a preflight repeats `Vary`.
CorsHeaders = tuple[tuple[str, str], ...]


def origin_allowed(origin: str, allowed: tuple[str, ...]) -> bool:
    """Whether `origin` is in `access.cors_origins`: exactly, or by its one `*` (any run of characters)."""
    for entry in allowed:
        if entry == ANY_ORIGIN:
            return True
        for pattern in OLLAMA_ORIGINS if entry == DEFAULT_ORIGINS else (entry,):
            prefix, star, suffix = pattern.partition("*")
            if not star:
                if origin == pattern:
                    return True
            elif (
                len(origin) >= len(prefix) + len(suffix)
                and origin.startswith(prefix)
                and origin.endswith(suffix)
            ):
                return True
    return False


def cors_headers(
    origin: str | None, host: str | None, allowed: tuple[str, ...], *, preflight: bool
) -> CorsHeaders:
    """The CORS headers Ollama would send this request; none if it is not cross-origin.

    Raises `Forbidden` for an origin that `allowed` does not list (Ollama's 403).
    """
    if not origin or (host and origin in (f"http://{host}", f"https://{host}")):
        return ()  # not a browser's cross-origin request (gin-contrib/cors lets it through untouched)
    if not origin_allowed(origin, allowed):
        raise Forbidden(
            f"origin {_quoted(origin)} may not call this proxy from a browser; "
            "add it to access.cors_origins in config.yaml"
        )
    if ANY_ORIGIN in allowed:
        common: CorsHeaders = (("Access-Control-Allow-Origin", "*"),)
    else:
        vary = _PREFLIGHT_VARY if preflight else _PREFLIGHT_VARY[:1]
        common = (*vary, ("Access-Control-Allow-Origin", origin))
    return (*_PREFLIGHT, *common) if preflight else common


def _quoted(text: str, limit: int = 200) -> str:
    """Client-sent text for a message: escaped onto one line, bounded."""
    shown = text if len(text) <= limit else text[: limit - 3] + "..."
    return repr(shown)
