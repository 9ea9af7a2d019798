"""The fleet's choice of backend: loaded first, then most free, then fewest loaded, then in turn."""

from __future__ import annotations

from collections.abc import Callable

from proxy.config import config_from_dict
from proxy.errors import ProxyError
from proxy.upstream.fleet import Fleet

MODEL = "llama3.2:latest"


class NoGate:
    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass

    def fail_waiting(self, error: Callable[[], ProxyError]) -> int:
        return 0

    def fail_unlisted(self, unlisted: Callable[[str, float], bool]) -> int:
        return 0


def fleet(**hosts: int) -> Fleet:
    backends = {
        name: {"url": f"http://127.0.0.1:{1000 + i}", "max_concurrent": most}
        for i, (name, most) in enumerate(hosts.items())
    }
    return Fleet(config_from_dict({"backends": backends}), NoGate())


async def test_a_backend_with_the_model_loaded_comes_first_even_with_fewer_free_slots() -> None:
    chosen = fleet(a=4, b=1)
    chosen.sent("b", MODEL)
    assert list(chosen.candidates(MODEL, {})) == ["b", "a"]


async def test_then_the_most_free_slots_and_a_full_backend_is_left_out() -> None:
    chosen = fleet(a=2, b=4, c=1)
    assert list(chosen.candidates(MODEL, {"b": 1, "c": 1})) == ["b", "a"]


async def test_then_the_fewest_models_loaded_then_in_turn() -> None:
    chosen = fleet(a=2, b=2)
    chosen.sent("a", "other:latest")
    assert list(chosen.candidates(MODEL, {}))[0] == "b"
    even = fleet(a=2, b=2)
    firsts = {even.candidates(MODEL, {})[0] for _ in range(4)}
    assert firsts == {"a", "b"}  # a tie is broken in turn
