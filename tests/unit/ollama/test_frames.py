"""Frame bytes, exactly, and where a frame may go."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest

from proxy.errors import QueueTimeout, UpstreamReset
from proxy.ollama import frames
from proxy.ollama.frames import Wire

NOW = datetime(2026, 11, 24, 7, 8, 9, 123456, tzinfo=UTC)


def test_generate_frame_bytes():
    assert frames.keepalive(Wire.GENERATE, "llama3.2", "ignored", NOW) == (
        b'{"model":"llama3.2","created_at":"2026-11-24T07:08:09.123456Z","response":"","done":false}\n'
    )


def test_chat_frame_bytes():
    assert frames.keepalive(Wire.CHAT, "llama3.2", "ignored", NOW) == (
        b'{"model":"llama3.2","created_at":"2026-11-24T07:08:09.123456Z",'
        b'"message":{"role":"assistant","content":""},"done":false}\n'
    )


def test_sse_frame_is_a_comment_that_cannot_end_the_event_early():
    assert frames.keepalive(Wire.SSE, "m", "queued, position 3 of 7") == b": queued, position 3 of 7\n\n"
    assert frames.keepalive(Wire.SSE, "m", "a\nb\rc") == b": a b c\n\n"


def test_json_frame_is_one_newline():
    assert frames.keepalive(Wire.JSON, "m", "x") == b"\n"


def test_frames_are_ascii_whatever_the_model_name():
    frame = frames.keepalive(Wire.GENERATE, 'mödel"\u2028', "", NOW)
    assert frame.isascii()
    assert json.loads(frame)["model"] == 'mödel"\u2028'


def test_created_at_is_utc_rfc3339_from_any_zone():
    local = NOW.astimezone(timezone(timedelta(hours=5, minutes=30)))
    assert frames.rfc3339(local) == "2026-11-24T07:08:09.123456Z"


@pytest.mark.parametrize(
    "wire, openai, expected",
    [
        (Wire.GENERATE, False, b'{"error":"gone"}\n'),
        (Wire.CHAT, False, b'{"error":"gone"}\n'),
        (Wire.JSON, False, b'{"error":"gone"}'),
        (Wire.JSON, True, b'{"error":{"message":"gone","type":"server_error","code":"upstream_error"}}'),
        (
            Wire.SSE,
            True,
            b'data: {"error":{"message":"gone","type":"server_error","code":"upstream_error"}}\n\n',
        ),
    ],
)
def test_inband_errors(wire, openai, expected):
    assert frames.inband_error(wire, UpstreamReset("gone"), openai=openai) == expected


def test_inband_error_names_the_reason():
    frame = frames.inband_error(Wire.SSE, QueueTimeout("slow"), openai=True)
    assert json.loads(frame.removeprefix(b"data: "))["error"]["code"] == "queue_timeout"


@pytest.mark.parametrize(
    "wire, tail, ok",
    [
        (Wire.GENERATE, b"", True),
        (Wire.GENERATE, b"e}\n", True),
        (Wire.GENERATE, b'"resp', False),
        (Wire.SSE, b"", True),
        (Wire.SSE, b"}\n\n", True),
        (Wire.SSE, b"\r\n\r\n", True),
        (Wire.SSE, b"\r\r", True),
        (Wire.SSE, b"}\n", False),  # a data line, but the event has not ended
        (Wire.JSON, b"", True),
        (Wire.JSON, b"}\n", False),  # the body has begun: nothing may be added
    ],
)
def test_boundaries(wire, tail, ok):
    assert frames.at_boundary(wire, tail) is ok


def test_content_types_match_what_ollama_sends():
    assert frames.content_type(Wire.GENERATE, openai=False) == "application/x-ndjson"
    assert frames.content_type(Wire.SSE, openai=True) == "text/event-stream"
    assert frames.content_type(Wire.JSON, openai=False) == "application/json; charset=utf-8"
    assert frames.content_type(Wire.JSON, openai=True) == "application/json"
