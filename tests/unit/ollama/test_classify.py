"""Which requests queue, how they stream, and which bodies are refused."""

from __future__ import annotations

import pytest

from proxy.edge.access import canonical_path
from proxy.errors import BadRequest
from proxy.ollama import classify, names
from proxy.ollama.frames import Wire


@pytest.mark.parametrize("path", sorted(classify.QUEUED))
def test_generation_paths_queue_on_post_only(path):
    assert classify.route("POST", path).queued
    assert classify.route("POST", path).endpoint == path
    assert not classify.route("GET", path).queued


@pytest.mark.parametrize(
    "method, path",
    [
        ("GET", "/api/tags"),
        ("POST", "/api/show"),
        ("POST", "/api/pull"),
        ("GET", "/v1/models"),
        ("HEAD", "/"),
        ("POST", "/api/generate/"),
        ("POST", "/API/generate"),  # Ollama's router is case-sensitive: a 404 there, not a generation
    ],
)
def test_everything_else_is_relayed_at_once_as_other(method, path):
    route = classify.route(method, path)
    assert not route.queued and route.endpoint == "other"


@pytest.mark.parametrize(
    "raw", ["/api/x/../generate", "//api/./generate", "/api/%67enerate", "/../api/generate?x=/../y"]
)
def test_a_generation_in_disguise_is_classified_by_its_canonical_path(raw):
    route = classify.route("POST", canonical_path(raw))
    assert route.queued and route.endpoint == "/api/generate"


def test_openai_paths_are_recognised_for_error_shapes():
    assert classify.route("POST", "/v1/chat/completions").openai
    assert classify.route("GET", "/v1/models").openai
    assert not classify.route("POST", "/api/chat").openai
    assert not classify.route("GET", "/v1beta").openai


@pytest.mark.parametrize(
    "path, stream, wire",
    [
        ("/api/generate", None, Wire.GENERATE),
        ("/api/generate", True, Wire.GENERATE),
        ("/api/generate", False, Wire.JSON),
        ("/api/chat", None, Wire.CHAT),
        ("/api/chat", False, Wire.JSON),
        ("/v1/chat/completions", None, Wire.JSON),
        ("/v1/chat/completions", True, Wire.SSE),
        ("/v1/completions", True, Wire.SSE),
        ("/v1/responses", True, Wire.SSE),
        ("/api/embed", True, Wire.JSON),
        ("/api/embeddings", None, Wire.JSON),
        ("/v1/embeddings", True, Wire.JSON),
    ],
)
def test_streaming_follows_each_api_default(path, stream, wire):
    body = b'{"model":"m"' + (b"" if stream is None else b',"stream":' + str(stream).lower().encode()) + b"}"
    assert classify.job(classify.route("POST", path), body).wire is wire


def test_stream_null_means_the_default():
    assert classify.job(classify.route("POST", "/api/chat"), b'{"model":"m","stream":null}').wire is Wire.CHAT


@pytest.mark.parametrize(
    "body",
    [b"", b"null", b'"m"', b"{", b'{"model":null}', b'{"model":["m"]}', b'{"model":"m","stream":1}'],
)
def test_bad_bodies_are_bad_requests(body):
    with pytest.raises(BadRequest):
        classify.job(classify.route("POST", "/api/generate"), body)


def test_the_model_is_kept_as_sent():
    assert classify.job(classify.route("POST", "/api/chat"), b'{"model":"Llama3"}').model == "Llama3"


@pytest.mark.parametrize(
    "name, canonical",
    [
        ("llama3", "llama3:latest"),
        ("llama3:latest", "llama3:latest"),
        ("Gpt-OSS:120B", "gpt-oss:120b"),
        ("registry.local:5000/team/model", "registry.local:5000/team/model:latest"),
        ("hf.co/org/repo:Q4_K_M", "hf.co/org/repo:q4_k_m"),
    ],
)
def test_canonical_model_names(name, canonical):
    assert names.canonical_model(name) == canonical
