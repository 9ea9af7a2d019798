"""Request bodies as the proxy holds them: small ones in memory, large ones spooled to a file.

A queued request holds its body until a slot frees, which can be minutes. Held
in memory, 100 waiting requests of 60 MiB each are 6 GiB of process memory that
anyone who can reach the port may claim. So a body larger than
`request.spool_above` goes, as it arrives, to a private temporary file in
`request.spool_dir`: created unlinked (O_TMPFILE where the OS has it, else
unlinked at once), mode 0600, so no other user can read it and nothing is left
behind if the process dies. Its pages are the kernel's page cache, which the
kernel may write out and drop under pressure, not the process's heap. What the
process itself holds per request is then at most `spool_above` (plus aiohttp's
read buffer), whatever the body size.

Small bodies, the common case (a chat prompt is a few KiB), never touch a file.

A `Body` is replayable: `payload()` may be called once per attempt, so a
request re-sent after a failed connect sends the same bytes again. It owns its
file and must be closed (`with body:`) on every path.

File I/O is done inline rather than in a thread: the writes land in the page
cache and the reads come back from it (the file was just written), each a
chunk of at most `CHUNK` bytes, and inline I/O cannot race a cancelled request
that closes its file while a worker thread still reads its descriptor.
"""

from __future__ import annotations

import logging
import os
import tempfile
from types import TracebackType
from typing import IO

from aiohttp import HttpVersion11, payload, web
from aiohttp.abc import AbstractStreamWriter

from proxy.config import RequestConfig
from proxy.errors import BadRequest, SpoolFailed, TooLarge
from proxy.units import format_size

log = logging.getLogger("proxy.body")

#: Bytes read from a spool file per write upstream.
CHUNK = 256 * 1024
#: Retry-After, in seconds, when a body cannot be spooled (disk full, directory gone).
SPOOL_RETRY_AFTER = 10


class Body:
    """A request body, in memory (`bytes`) or in a spooled file; replayable, closed by `close()`."""

    __slots__ = ("_data", "_file", "size")

    def __init__(self, data: bytes = b"", file: IO[bytes] | None = None, size: int | None = None) -> None:
        self._data = data
        self._file = file
        #: Bytes in the body, wherever they are held.
        self.size = len(data) if size is None else size

    def read(self) -> bytes:
        """The whole body as bytes, to parse it. For a spooled body this is a transient copy
        read back from the file: the caller should not keep it past the parse."""
        if self._file is None:
            return self._data
        return _pread(self._file, self.size, 0)

    def payload(self) -> bytes | payload.Payload | None:
        """What to send upstream (aiohttp's `data=`); a fresh one for every attempt."""
        if self._file is None:
            return self._data or None
        return _SpoolPayload(self._file, self.size)

    def close(self) -> None:
        """Release the file (the kernel frees its blocks: it has no name). Idempotent."""
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> Body:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


#: The body of a request that has none (most relayed-at-once requests).
EMPTY = Body()


def _pread(file: IO[bytes], size: int, offset: int) -> bytes:
    """`size` bytes at `offset`, whatever else moved the file position."""
    data = os.pread(file.fileno(), size, offset)
    if len(data) != size:
        raise OSError(
            f"spooled request body is shorter than written: {len(data)} of {size} bytes at {offset}"
        )
    return data


class _SpoolPayload(payload.Payload):
    """A spooled body as aiohttp's client sends it: a known size (so upstream gets a
    Content-Length, as the client sent), read at absolute offsets (so attempts never
    share a file position), and never closed by aiohttp (the `Body` owns the file)."""

    def __init__(self, file: IO[bytes], size: int) -> None:
        super().__init__(file)
        self._size = size

    @property
    def size(self) -> int:
        return self._size

    async def write(self, writer: AbstractStreamWriter) -> None:
        for offset in range(0, self._size, CHUNK):
            await writer.write(_pread(self._value, min(CHUNK, self._size - offset), offset))

    async def write_with_length(self, writer: AbstractStreamWriter, content_length: int | None) -> None:
        # aiohttp passes the Content-Length it sent, which is our own size.
        await self.write(writer)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        raise TypeError("a spooled request body is sent, never decoded")

    async def close(self) -> None:
        """Nothing to release: the file belongs to the `Body`, which may send it again."""


async def receive(request: web.Request, config: RequestConfig) -> Body:
    """The whole request body, refused as soon as it passes `request.max_body`.

    A client that sent `Expect: 100-continue` is told to go on only here, once
    every check before the body has passed: a body that is refused unread
    (too large by its Content-Length, a bad key) is never sent.
    """
    limit = config.max_body
    if request.content_length is not None and request.content_length > limit:
        raise too_large(limit)
    await _continue(request)
    spool = _Spool(config)
    try:
        async for chunk in request.content.iter_any():
            if spool.size + len(chunk) > limit:
                raise too_large(limit)
            spool.add(chunk)
    except web.RequestPayloadError as exc:
        spool.discard()
        raise BadRequest(f"could not read the request body: {exc}") from None
    except BaseException:
        spool.discard()
        raise
    return spool.body()


class _Spool:
    """A body being received: chunks in memory until they pass `spool_above`, then a file."""

    def __init__(self, config: RequestConfig) -> None:
        self._above = config.spool_above
        self._dir = config.spool_dir or None
        self._chunks: list[bytes] = []
        self._file: IO[bytes] | None = None
        self.size = 0

    def add(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self._file is None and self.size <= self._above:
            self._chunks.append(chunk)
            return
        try:
            if self._file is None:
                self._file = tempfile.TemporaryFile(buffering=0, dir=self._dir)
                self._chunks.append(chunk)
                for held in self._chunks:
                    self._write(self._file, held)
                self._chunks = []
            else:
                self._write(self._file, chunk)
        except OSError as exc:
            where = self._dir or tempfile.gettempdir()
            log.error(
                "spool failed: cannot write a request body to %s: %s; check request.spool_dir", where, exc
            )
            # Like every 503, with Retry-After; disk trouble rarely clears within a second.
            raise SpoolFailed(
                "the proxy cannot hold this request body now; retry later", retry_after=SPOOL_RETRY_AFTER
            ) from None

    @staticmethod
    def _write(file: IO[bytes], data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[file.write(view) :]

    def body(self) -> Body:
        if self._file is None:
            return Body(b"".join(self._chunks))
        return Body(file=self._file, size=self.size)

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
        self._chunks = []


async def _continue(request: web.Request) -> None:
    """Send `100 Continue` if the client waits for it (see `defer_expect`)."""
    if request.version >= HttpVersion11 and request.headers.get("Expect", "").lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        # As aiohttp's own expect handler does: the response proper has not begun.
        request.writer.output_size = 0


async def defer_expect(request: web.Request) -> None:
    """The listen route's `expect_handler`: `100 Continue` waits for `receive`, so that a
    request refused before its body (413 by Content-Length, 401, 403, draining) is
    answered at once and its body never sent. Any other expectation gets a 417, and
    HTTP/1.0 has none, as with aiohttp's own handler."""
    if request.version < HttpVersion11:
        return
    if request.headers.get("Expect", "").lower() != "100-continue":
        raise web.HTTPExpectationFailed(text=f"unknown Expect: {request.headers['Expect']}")


def too_large(limit: int) -> TooLarge:
    return TooLarge(
        f"request body is larger than request.max_body={format_size(limit)}; "
        "send a smaller body or raise request.max_body"
    )
