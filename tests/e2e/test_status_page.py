"""GET /-/status in a real headless Chromium: the numbers it draws are the ones /-/queue gives.

The browser runs in a worker thread: the proxy under test shares this event loop
and must keep answering the page's fetches while the browser waits for them.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from importlib import resources

import aiohttp
import pytest
import redis.asyncio as redis
from aiohttp import web

from proxy.server import Server
from tests.support import eventually, hold_the_slot, release, serving
from tests.support.browser import BrowserUnavailable, ensure_chromium, png_colours, run_chromium
from tests.support.redisserver import RedisServer, needs_redis_server

#: Virtual time the page may run: its first fetch and a few refreshes.
BUDGET = "--virtual-time-budget=3000"
HOSTILE_MODEL = "<img src=x onerror=alert(1)>"


@pytest.fixture(scope="session")
def chromium() -> str:
    """Installed on first use: CI must exercise the page, so a missing browser fails, never skips."""
    try:
        return ensure_chromium()
    except BrowserUnavailable as exc:
        pytest.fail(f"headless Chromium is needed for the status page tests: {exc}")


@dataclass(eq=False)
class Element:
    tag: str
    attrs: dict[str, str | None]
    text: str = ""
    children: list[Element] = field(default_factory=list)

    def classes(self) -> set[str]:
        return set((self.attrs.get("class") or "").split())

    def cell(self, name: str) -> Element:
        [found] = [child for child in self.children if name in child.classes()]
        return found


class Dom(HTMLParser):
    """Chromium's --dump-dom read back into elements, enough to find the page's numbers."""

    VOID = frozenset({"meta", "link", "br", "img", "input", "hr", "col", "source", "wbr"})

    def __init__(self, html: str) -> None:
        super().__init__()
        self.elements: list[Element] = []
        self._open: list[Element] = []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = Element(tag, dict(attrs))
        if self._open:
            self._open[-1].children.append(element)
        self.elements.append(element)
        if tag not in self.VOID:
            self._open.append(element)

    def handle_endtag(self, tag: str) -> None:
        while self._open and self._open.pop().tag != tag:
            pass

    def handle_data(self, data: str) -> None:
        for element in self._open:
            element.text += data

    def by_id(self, ident: str) -> Element:
        [found] = [e for e in self.elements if e.attrs.get("id") == ident]
        return found

    def having(self, attr: str) -> list[Element]:
        return [e for e in self.elements if attr in e.attrs]


async def get_queue(http: aiohttp.ClientSession, proxy: Server) -> dict:
    async with http.get(proxy.admin_url + "/-/queue") as resp:
        assert resp.status == 200
        return await resp.json()


async def render(chromium: str, url: str, *args: str) -> str:
    """The page's DOM once its script has fetched and drawn; in a thread, so the proxy keeps serving."""
    done = await asyncio.to_thread(run_chromium, chromium, url, BUDGET, *args)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


async def test_page_draws_the_queue_it_fetches(sim, make_proxy, http, chromium, tmp_path):
    sim.models.add(HOSTILE_MODEL)  # upstream must list a model for it to queue
    proxy = await make_proxy(limits={"max_concurrent": 2, "models": {"big": 1, "idle": 3}})
    held = [await hold_the_slot(sim, http, proxy)]
    sim.load_delay = 60
    held.append(asyncio.create_task(_post(http, proxy, "big")))
    await sim.wait_until(lambda: sim.active == 2)
    sim.load_delay = 0
    for count, model in enumerate(["big", HOSTILE_MODEL, "llama3.2"], 1):
        held.append(asyncio.create_task(_post(http, proxy, model)))

        async def queued(count: int = count) -> bool:
            return (await get_queue(http, proxy))["waiting"] == count

        await eventually(queued)  # one at a time, so arrival order is known

    url = proxy.admin_url + "/-/status"
    shot = tmp_path / "status.png"
    before = await get_queue(http, proxy)
    html, _ = await asyncio.gather(
        render(chromium, url, "--dump-dom"),
        render(chromium, url, f"--screenshot={shot}", "--window-size=1024,768"),
    )
    after = await get_queue(http, proxy)
    # The state held still while the page rendered: only the ages moved.
    assert [w["model"] for w in after["queue"]] == [w["model"] for w in before["queue"]]
    assert (before["running"], before["waiting"], after["running"], after["waiting"]) == (2, 3, 2, 3)

    dom = Dom(html)
    assert dom.by_id("running").text == "2"
    assert dom.by_id("max-concurrent").text == "2"
    assert dom.by_id("waiting").text == "3"
    assert dom.by_id("max-queue").text == "100"
    assert (
        before["oldest_wait"] <= float(dom.by_id("oldest-wait").attrs["data-value"]) <= after["oldest_wait"]
    )
    [body] = [e for e in dom.elements if e.tag == "body"]
    assert body.attrs["data-state"] == "ok"
    assert "hidden" in dom.by_id("unreachable").attrs and "hidden" in dom.by_id("draining").attrs
    slots = [e for e in dom.by_id("slots").children if "slot" in e.classes()]
    assert len(slots) == 2 and all("busy" in s.classes() for s in slots)

    drawn = {
        row.attrs["data-model"]: tuple(row.cell(c).attrs["data-value"] for c in ("cap", "running", "waiting"))
        for row in dom.having("data-model")
    }
    assert drawn == {
        name: (
            str(m["limit"]) if m["limit"] is not None else "",
            str(len(m["running"])),
            str(len(m["waiting"])),
        )
        for name, m in before["models"].items()
    }
    assert drawn["idle:latest"] == ("3", "0", "0") and drawn["big:latest"] == ("1", "1", "1")
    [backend] = dom.having("data-backend")  # upstream.url alone: one backend named default
    assert backend.attrs["data-backend"] == "default"
    assert (backend.cell("health").text, backend.cell("running").text) == ("up", "2 / 2")

    rows = dom.having("data-position")
    assert [(r.attrs["data-position"], r.cell("model").text, r.cell("owner").text) for r in rows] == [
        (str(w["position"]), w["model"], "–") for w in before["queue"]
    ]
    assert [w["model"] for w in before["queue"]] == [
        "big:latest",
        HOSTILE_MODEL,  # not a name Ollama can parse: shown as sent (lowercase), no tag added
        "llama3.2:latest",
    ]
    for row, old, new in zip(rows, before["queue"], after["queue"], strict=True):
        assert old["age"] <= float(row.cell("age").attrs["data-value"]) <= new["age"]
    # A client's model name is drawn as text, never parsed as markup.
    assert not any(e.tag == "img" for e in dom.elements)

    assert shot.stat().st_size > 5000
    assert len(png_colours(shot)) > 20  # text, boxes and tables: far from one flat colour

    for task in held:
        task.cancel()
    await asyncio.gather(*held, return_exceptions=True)


async def test_idle_draining_proxy_shows_the_banner(sim, make_proxy, chromium):
    proxy = await make_proxy(limits={"models": {"gpt-oss:120b": 1}})
    proxy.state.draining = True
    try:
        dom = Dom(await render(chromium, proxy.admin_url + "/-/status", "--dump-dom"))
    finally:
        proxy.state.draining = False
    assert "hidden" not in dom.by_id("draining").attrs
    assert "hidden" in dom.by_id("unreachable").attrs
    assert (dom.by_id("running").text, dom.by_id("waiting").text, dom.by_id("max-concurrent").text) == (
        "0",
        "0",
        "3",
    )
    slots = [e for e in dom.by_id("slots").children if "slot" in e.classes()]
    assert len(slots) == 3 and not any("busy" in s.classes() for s in slots)
    [row] = dom.having("data-model")
    assert row.attrs["data-model"] == "gpt-oss:120b" and row.cell("cap").text == "1"
    assert [r.text for r in dom.by_id("queue").children[-1].children] == ["none"]


async def test_unreachable_queue_is_shown_as_such(chromium):
    """The page keeps running when the proxy goes away; here its queue endpoint is gone from the start."""
    page = resources.files("proxy.admin").joinpath("status.html").read_text(encoding="utf-8")
    app = web.Application()

    async def status(request: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html")

    app.router.add_get("/-/status", status)
    async with serving(app) as url:
        dom = Dom(await render(chromium, url + "/-/status", "--dump-dom"))
    [body] = [e for e in dom.elements if e.tag == "body"]
    assert body.attrs["data-state"] == "unreachable"
    assert "hidden" not in dom.by_id("unreachable").attrs
    assert "Cannot reach the proxy" in dom.by_id("unreachable").text
    assert dom.by_id("unreachable-detail").text == "No data yet (HTTP 404); retrying every second."


async def test_status_is_one_self_contained_file(sim, make_proxy, http):
    page = resources.files("proxy.admin").joinpath("status.html").read_text(encoding="utf-8")
    # No CDN, font, image or script from elsewhere: the admin port is all it may reach.
    assert not re.search(r"https?:|\b(src|href)\s*=|url\(|@import", page)
    assert re.search(r'fetch\(SOURCE|const SOURCE = "queue"', page)
    proxy = await make_proxy()
    async with http.get(proxy.admin_url + "/-/status") as resp:
        assert resp.status == 200 and resp.content_type == "text/html"
        assert resp.headers["Cache-Control"] == "no-store"
        assert await resp.text() == page


async def test_without_a_cluster_the_page_has_no_cluster_part(sim, make_proxy, chromium):
    proxy = await make_proxy()
    dom = Dom(await render(chromium, proxy.admin_url + "/-/status", "--dump-dom"))
    assert dom.by_id("running").text == "0"  # drawn: the script ran
    assert all("hidden" in dom.by_id(ident).attrs for ident in ("cluster", "redis-down"))
    labels = [e for e in dom.elements if "this-proxy" in e.classes()]
    assert len(labels) == 5 and all("hidden" in label.attrs for label in labels)


@needs_redis_server
async def test_cluster_part_counts_every_proxy_and_the_rest_is_this_proxys(
    sim, redis_server: RedisServer, make_proxy, http, chromium
):
    cluster = {"redis": redis_server.url, "lease": "3s"}
    limits = {"max_concurrent": 4, "models": {"big": 2}}
    a = await make_proxy(limits=limits, cluster=cluster)
    b = await make_proxy(limits=limits, cluster=cluster)
    sim.load_delay = 60
    held = [asyncio.create_task(_post(http, a, "big"))]
    held += [asyncio.create_task(_post(http, b, model)) for model in ("big", "llama3.2")]
    await sim.wait_until(lambda: sim.active == 3)
    sim.load_delay = 0
    # Big's cap is full across the cluster: this one waits on A.
    held.append(asyncio.create_task(_post(http, a, "big")))
    seen: list[dict] = []

    async def settled(lost: int) -> bool:  # B's heartbeat tells A there are two of them
        seen.append(await get_queue(http, a))
        counts = {"global": 3, "model:big:latest": 2}
        expected = {"up": True, "peers": 2, "running": counts, "leases_lost": lost}
        return {key: seen[-1]["cluster"][key] for key in expected} == expected and seen[-1]["waiting"] == 1

    await eventually(lambda: settled(0), timeout=10)
    # As if the leases had been reaped while the proxies stalled: each finds its own gone on
    # renewal (within lease/3), writes it again and counts it. Big's cap still holds A's waiter.
    client = redis.Redis.from_url(redis_server.url)
    try:
        await client.delete("oqp:lease:global")
    finally:
        await client.aclose()
    try:
        await eventually(lambda: settled(1), timeout=10)
    except AssertionError:
        raise AssertionError(f"A's view never settled: {seen[-1]}") from None

    dom = Dom(await render(chromium, a.admin_url + "/-/status", "--dump-dom"))
    after = await get_queue(http, a)
    assert after["cluster"] == seen[-1]["cluster"] and after["running"] == 1  # held still while it rendered
    assert after["cluster"]["on_redis_down"] == "local"
    assert "hidden" not in dom.by_id("cluster").attrs and "hidden" in dom.by_id("redis-down").attrs
    # Across the cluster: both proxies' slots against the one limit.
    assert (dom.by_id("cluster-redis").text, dom.by_id("cluster-peers").text) == ("up", "2")
    assert (dom.by_id("cluster-running").text, dom.by_id("cluster-max-concurrent").text) == ("3", "4")
    assert "hidden" not in dom.by_id("cluster-lost").attrs and dom.by_id("cluster-leases-lost").text == "1"
    assert boxes(dom, "cluster-slots") == [["busy", "slot"], ["other", "slot"], ["other", "slot"], ["slot"]]
    [row] = dom.having("data-cluster-model")
    assert row.attrs["data-cluster-model"] == "big:latest"
    assert (row.cell("cap").text, row.cell("running").text) == ("2", "2")
    # The rest is A's alone, and says so.
    assert (dom.by_id("running").text, dom.by_id("waiting").text) == ("1", "1")
    assert boxes(dom, "slots") == [["busy", "slot"], ["slot"], ["slot"], ["slot"]]
    assert [r.cell("model").text for r in dom.having("data-position")] == ["big:latest"]
    labels = [e for e in dom.elements if "this-proxy" in e.classes()]
    assert len(labels) == 5 and not any("hidden" in label.attrs for label in labels)
    assert dom.by_id("slots-title").text.split() == ["Slots", "this", "proxy"]

    for task in held:
        task.cancel()
    await asyncio.gather(*held, return_exceptions=True)


@needs_redis_server
@pytest.mark.parametrize(
    ("mode", "says"),
    [("local", "serves on with its share of each limit (the limit ÷ 1 proxy"), ("refuse", "refuses")],
    ids=["local", "refuse"],
)
async def test_redis_down_is_shown_with_what_this_proxy_does_meanwhile(
    sim, redis_server: RedisServer, make_proxy, http, chromium, mode, says
):
    proxy = await make_proxy(
        limits={"max_concurrent": 2, "models": {"big": 1}},
        cluster={"redis": redis_server.url, "lease": "3s", "on_redis_down": mode},
    )
    held = await hold_the_slot(sim, http, proxy)
    await redis_server.kill()

    async def noticed() -> bool:  # the page's own source: its next count finds Redis gone
        return (await get_queue(http, proxy))["cluster"]["up"] is False

    await eventually(noticed)
    dom = Dom(await render(chromium, proxy.admin_url + "/-/status", "--dump-dom"))
    banner = dom.by_id("redis-down")
    assert "hidden" not in banner.attrs and banner.attrs["data-mode"] == mode
    assert "Redis is unreachable" in banner.text and says in dom.by_id("redis-down-detail").text
    # The last counts are stale once Redis is gone: shown as not known, never as current.
    assert (dom.by_id("cluster-redis").text, dom.by_id("cluster-running").text) == ("down", "–")
    assert dom.by_id("cluster-peers-label").text == "proxies last seen alive"
    assert dom.by_id("cluster-peers").text == "1"
    assert all("hidden" in dom.by_id(ident).attrs for ident in ("cluster-slots", "cluster-legend"))
    [row] = dom.having("data-cluster-model")
    assert (row.cell("cap").text, row.cell("running").text) == ("1", "–")
    assert dom.by_id("running").text == "1"  # this proxy's running request goes on
    await release(held)


def boxes(dom: Dom, ident: str) -> list[list[str]]:
    """The classes of each slot box drawn in `ident`, in order."""
    return [sorted(box.classes()) for box in dom.by_id(ident).children]


async def _post(http: aiohttp.ClientSession, proxy: Server, model: str) -> None:
    async with http.post(proxy.listen_url + "/api/generate", json={"model": model, "prompt": "p"}) as resp:
        await resp.read()
