"""The access log line from a finished request, in both formats, and the event lines beside it."""

from __future__ import annotations

import json
import logging
import re
import sys

import pytest

from proxy.errors import QueueFull
from proxy.observe import accesslog, logs
from proxy.observe.exchange import Exchange, Outcome
from proxy.ollama.usage import Usage
from tests.support.exchanges import exchange


def access_record(ex: Exchange, caplog: pytest.LogCaptureFixture) -> logging.LogRecord:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="proxy.access"):
        accesslog.write(ex)
    [record] = caplog.records
    return record


def test_text_line_has_every_field(caplog) -> None:
    record = access_record(exchange(backend="gpu-a"), caplog)
    assert logs.TextFormatter().format(record) == (
        "2026-11-24T09:01:02.123Z client=203.0.113.7 method=POST path=/api/chat model=llama3:latest "
        "key=alice status=200 outcome=ok wait=12.345 duration=98.765 bytes=10342 tokens=26/301 backend=gpu-a "
        "fair_client=- priority=- cost=0.000"
    )
    assert (record.name, record.levelno, record.getMessage()) == (
        "proxy.access",
        logging.INFO,
        "POST /api/chat 200 ok",
    )


def test_text_line_marks_unknowns_and_quotes_what_could_break_it(caplog) -> None:
    ex = exchange(
        path='/a b/"q"\n=x/é',
        model="",
        client="",
        waited=None,
        usage=None,
        status=499,
        outcome=Outcome.CLIENT_GONE,
    )
    line = logs.TextFormatter().format(access_record(ex, caplog))
    assert line == (
        '2026-11-24T09:01:02.123Z client=203.0.113.7 method=POST path="/a b/\\"q\\"\\n=x/\\u00e9" model=- '
        "key=- status=499 outcome=client_gone wait=- duration=98.765 bytes=10342 tokens=- backend=- "
        "fair_client=- priority=- cost=0.000"
    )
    assert "\n" not in line
    partial = logs.TextFormatter().format(access_record(exchange(usage=Usage(completion_tokens=301)), caplog))
    assert " tokens=-/301 " in partial


def test_text_line_appends_the_scheduling_fields_after_the_old_ones(caplog) -> None:
    ex = exchange(party="10.0.0.9", priority="low", cost=327.0)
    line = logs.TextFormatter().format(access_record(ex, caplog))
    # The fields older consumers parse keep their bytes; the new ones come last.
    assert line.endswith(" tokens=26/301 backend=- fair_client=10.0.0.9 priority=low cost=327.000")


def test_json_line_has_the_same_fields_as_numbers_and_nulls(caplog) -> None:
    record = access_record(exchange(backend="gpu-a"), caplog)
    assert json.loads(logs.JsonFormatter().format(record)) == {
        "time": "2026-11-24T09:01:02.123Z",
        "level": "INFO",
        "logger": "proxy.access",
        "message": "POST /api/chat 200 ok",
        "client": "203.0.113.7",
        "method": "POST",
        "path": "/api/chat",
        "model": "llama3:latest",
        "key": "alice",
        "backend": "gpu-a",
        "status": 200,
        "outcome": "ok",
        "wait": 12.345,
        "duration": 98.765,
        "bytes": 10342,
        "prompt_tokens": 26,
        "completion_tokens": 301,
        "fair_client": None,
        "priority": None,
        "cost": 0.0,
    }
    unknown = exchange(model="", client="", waited=None, usage=None, path="/\n")
    line = logs.JsonFormatter().format(access_record(unknown, caplog))
    assert "\n" not in line
    fields = json.loads(line)
    assert [fields[k] for k in ("model", "key", "wait", "prompt_tokens", "completion_tokens")] == [None] * 5
    assert fields["path"] == "/\n"


def test_event_lines_in_both_formats() -> None:
    record = logging.LogRecord("proxy.handler", logging.WARNING, __file__, 1, "gone: %s", ("x",), None)
    record.created = 1795510862.5
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING proxy.handler: gone: x",
        logs.TextFormatter().format(record),
    )
    assert json.loads(logs.JsonFormatter().format(record)) == {
        "time": "2026-11-24T09:01:02.500Z",
        "level": "WARNING",
        "logger": "proxy.handler",
        "message": "gone: x",
    }
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logging.LogRecord("proxy", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = logs.JsonFormatter().format(failed)
    assert "\n" not in line
    assert json.loads(line)["exc"].endswith("ValueError: boom")


def test_a_refusal_shows_its_reason_as_the_outcome_in_both_formats(caplog) -> None:
    ex = exchange(waited=None, usage=None, sent=57)
    ex.fail(QueueFull("full"))
    record = access_record(ex, caplog)
    assert record.getMessage() == "POST /api/chat 503 queue_full"
    assert " status=503 outcome=queue_full wait=- " in logs.TextFormatter().format(record)
    assert json.loads(logs.JsonFormatter().format(record))["outcome"] == "queue_full"


def test_the_time_is_the_arrival_in_both_formats(caplog) -> None:
    record = access_record(exchange(arrived=1795510863.999), caplog)
    assert logs.TextFormatter().format(record).startswith("2026-11-24T09:01:03.999Z ")
    assert json.loads(logs.JsonFormatter().format(record))["time"] == "2026-11-24T09:01:03.999Z"


def test_iso_time_writes_milliseconds_across_seconds() -> None:
    iso = logs.IsoTime()
    assert iso(1795510862.123456) == "2026-11-24T09:01:02.123Z"
    assert iso(1795510862.9) == "2026-11-24T09:01:02.900Z"
    assert iso(1795510863.0) == "2026-11-24T09:01:03.000Z"
