"""The simulated Ollama, for tests, the demo and benchmarks.

`server` (the aiohttp app, its knobs and instrumentation), `generation` (what one
request asks for), `wire` (Ollama's and OpenAI's answers, rendered), `faults` (the
faults a test may inject, and the writer that plays them).
"""

from proxy.sim.faults import FAULTS, GARBAGE
from proxy.sim.generation import GenRecord
from proxy.sim.server import Simulator

__all__ = ["FAULTS", "GARBAGE", "GenRecord", "Simulator"]
