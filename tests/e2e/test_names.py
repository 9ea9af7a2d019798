"""Model names and request bodies read as Ollama reads them (issue 8 item 5), and
`ollama stop` never waiting behind generations (item 11)."""

from __future__ import annotations

import asyncio
import json

import pytest

from proxy.errors import BadRequest
from proxy.ollama import classify, names
from tests.support import eventually, hold_the_slot, release

PART80 = "8" * 80
PART350 = "3" * 350

# --- canonical_model: Ollama's own ParseName tests (types/model/name_test.go) ---------


@pytest.mark.parametrize(
    "name, canonical",
    [
        # TestParseNameParts: every spelling, with its default parts filled in.
        (
            "registry.ollama.ai/library/dolphin-mistral:7b-v2.6-dpo-laser-q6_K",
            "dolphin-mistral:7b-v2.6-dpo-laser-q6_k",
        ),
        ("scheme://host:port/namespace/model:tag", "host:port/namespace/model:tag"),
        ("host/namespace/model:tag", "host/namespace/model:tag"),
        ("host:port/namespace/model:tag", "host:port/namespace/model:tag"),
        ("host/namespace/model", "host/namespace/model:latest"),
        ("host:port/namespace/model", "host:port/namespace/model:latest"),
        ("namespace/model", "namespace/model:latest"),
        ("model", "model:latest"),
        ("h/nn/mm:t", "h/nn/mm:t"),
        (f"{PART80}/{PART80}/{PART80}:{PART80}", f"{PART80}/{PART80}/{PART80}:{PART80}"),
        (f"{PART350}/{PART80}/{PART80}:{PART80}", f"{PART350}/{PART80}/{PART80}:{PART80}"),
        ("_why/_the/_lucky:_stiff", "_why/_the/_lucky:_stiff"),
        ("host:https/namespace/model:tag", "host:https/namespace/model:tag"),
        # TestNameparseNameDefault, and the three spellings of one model.
        ("xx", "xx:latest"),
        ("big", "big:latest"),
        ("library/big", "big:latest"),
        ("registry.ollama.ai/library/big:latest", "big:latest"),
        ("https://registry.ollama.ai/library/big", "big:latest"),
        # Parts compare case-insensitively (Name.EqualFold).
        ("Big:Latest", "big:latest"),
        ("Registry.Ollama.AI/Library/BIG", "big:latest"),
        ("Gpt-OSS:120B", "gpt-oss:120b"),
        ("hf.co/Org/Repo:Q4_K_M", "hf.co/org/repo:q4_k_m"),
        # modelref.ParseRef: trimmed; :local dropped; :cloud folded into the tag as pulled.
        ("  big  ", "big:latest"),
        ("big:local", "big:latest"),
        ("gpt-oss:20b:cloud", "gpt-oss:20b-cloud"),
        ("gpt-oss:20b-cloud", "gpt-oss:20b-cloud"),
        ("gpt-oss:cloud", "gpt-oss:cloud"),
    ],
)
def test_canonical_model_follows_ollamas_parse_name(name, canonical):
    assert names.canonical_model(name) == canonical


@pytest.mark.parametrize(
    "name",
    # name_test.go's invalid names (after defaults fill what is absent), and more.
    [
        "",
        "^",
        "mm:",
        "n/m:",
        "/nn/mm",
        "//",
        "//mm",
        "hh//",
        "//mm:@",
        "00@",
        "@",
        "m@d",
        "-hh/nn/mm:tt",
        "hh/-nn/mm:tt",
        "hh/nn/-mm:tt",
        "hh/nn/mm:-tt",
        "host/name:space/model:tag",
        "a/b/c/d",
        "m" * 81,
        "m:" + "t" * 81,
        "ns.dotted/m",
        "m:cloud:local",
    ],
)
def test_invalid_names_are_only_trimmed_and_lowercased(name):
    """Ollama answers 404 for these; they keep a key of their own that no valid name shares."""
    assert names.canonical_model(name) == name.strip().lower()
    assert names.canonical_model(name) != names.canonical_model(name.strip().lower() + "x")


# --- job: the body's keys as Go's encoding/json reads them ----------------------------


def _job(body: bytes, path: str = "/api/generate") -> classify.Job:
    return classify.job(classify.route("POST", path), body)


@pytest.mark.parametrize(
    "body, model",
    [
        (b'{"Model":"llama3"}', "llama3"),  # .NET clients' PascalCase
        (b'{"MODEL":"llama3"}', "llama3"),
        (b'{"model":"a","model":"b"}', "b"),  # the last duplicate wins
        (b'{"model":"a","Model":"b"}', "b"),  # even across spellings: Go assigns in order
        (b'{"Model":"a","model":"b","Model":"c"}', "c"),  # a dict would keep "b" here
        (b'{"mode\\u212Al":"kelvin"}', None),  # K (U+212A) folds to K, not to d
        (b'{"\\u017Ftream":false,"model":"m"}', "m"),
    ],
)
def test_body_keys_match_case_insensitively_and_the_last_wins(body, model):
    if model is None:
        with pytest.raises(BadRequest):
            _job(body)
    else:
        assert _job(body).model == model


def test_stream_is_read_as_go_reads_it():
    # U+017F (long s) folds to S in Go's foldName, so this is "stream": false.
    assert _job(b'{"model":"m","\\u017Ftream":false}').wire is not _job(b'{"model":"m"}').wire
    assert _job(b'{"model":"m","Stream":false,"stream":true}').wire is _job(b'{"model":"m"}').wire
    with pytest.raises(BadRequest, match=r"got object"):
        _job(b'{"model":"m","stream":{}}')
    with pytest.raises(BadRequest, match=r"got object"):
        _job(b'{"model":{}}')


@pytest.mark.parametrize(
    "path, body, unload",
    [
        ("/api/generate", {"model": "m", "keep_alive": 0}, True),  # what `ollama stop` sends
        ("/api/generate", {"model": "m", "prompt": "", "keep_alive": "0"}, True),
        ("/api/generate", {"model": "m", "Keep_Alive": "0s"}, True),
        ("/api/generate", {"model": "m", "keep_alive": "0m0s"}, True),
        ("/api/generate", {"model": "m", "keep_alive": 0.0}, True),
        ("/api/chat", {"model": "m", "keep_alive": 0}, True),
        ("/api/chat", {"model": "m", "messages": [], "keep_alive": "-0"}, True),
        ("/api/generate", {"model": "m"}, False),  # a load, not an unload
        ("/api/generate", {"model": "m", "keep_alive": None}, False),
        ("/api/generate", {"model": "m", "keep_alive": "5m"}, False),
        ("/api/generate", {"model": "m", "keep_alive": -1}, False),  # forever
        ("/api/generate", {"model": "m", "keep_alive": "0x"}, False),  # a 400 upstream
        ("/api/generate", {"model": "m", "prompt": "hi", "keep_alive": 0}, False),
        (
            "/api/chat",
            {"model": "m", "messages": [{"role": "user", "content": "hi"}], "keep_alive": 0},
            False,
        ),
        ("/api/chat", {"model": "m", "messages": {}, "keep_alive": 0}, False),
        ("/api/embed", {"model": "m", "keep_alive": 0}, False),
        ("/v1/chat/completions", {"model": "m", "keep_alive": 0}, False),
    ],
)
def test_an_unload_is_recognised_as_ollama_recognises_it(path, body, unload):
    assert _job(json.dumps(body).encode(), path).unload is unload


# --- end to end -----------------------------------------------------------------------

SPELLINGS = ("big", "library/big", "registry.ollama.ai/library/big:latest")


async def test_three_spellings_of_one_model_share_its_cap(sim, make_proxy, http):
    sim.models |= set(SPELLINGS)  # the simulator knows each spelling, as Ollama would
    sim.tokens, sim.token_delay = 6, 0.02
    proxy = await make_proxy(limits={"max_concurrent": 3, "models": {"big": 1}})

    async def generate(model: str) -> int:
        body = {"model": model, "prompt": "hi", "stream": False}
        async with http.post(proxy.listen_url + "/api/generate", json=body) as resp:
            await resp.read()
            return resp.status

    statuses = await asyncio.gather(*(generate(name) for name in SPELLINGS * 2))

    assert statuses == [200] * 6
    assert sim.peak == 1
    assert len(sim.records) == 6


async def test_a_pascal_case_body_is_queued_and_forwarded_unchanged(sim, make_proxy, http):
    proxy = await make_proxy(limits={"max_concurrent": 1, "models": {"small": 1}})
    body = b'{"Model":"small","Prompt":"hi","Stream":false}'
    async with http.post(
        proxy.listen_url + "/api/generate", data=body, headers={"Content-Type": "application/json"}
    ) as resp:
        assert resp.status == 200, await resp.text()
        assert json.loads(await resp.read())["done"] is True
    assert [r.body for r in sim.records] == [body]
    assert "X-Queue-Wait" in resp.headers  # it went through admission, as a generation


async def test_an_unload_is_relayed_while_the_queue_is_full(sim, make_proxy, http):
    proxy = await make_proxy(limits={"max_concurrent": 1, "max_queue": 1}, heartbeat={"interval": "10s"})
    holder = await hold_the_slot(sim, http, proxy)
    waiter = asyncio.create_task(
        http.post(proxy.listen_url + "/api/generate", json={"model": "small", "prompt": "wait"})
    )
    try:
        await eventually(lambda: proxy.state.admission.waiting_by_model().total() == 1, timeout=10)

        async with http.post(
            proxy.listen_url + "/api/generate", json={"model": "small", "keep_alive": 0}
        ) as resp:
            assert resp.status == 200
            await resp.read()
        assert "X-Queue-Wait" not in resp.headers  # never admitted: relayed at once
        assert [json.loads(r.body)["model"] for r in sim.records] == ["llama3.2", "small"]
        assert not waiter.done()  # the full queue is untouched
    finally:
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        await release(holder)
