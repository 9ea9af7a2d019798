"""`python -m proxy.sim`: a simulated Ollama to try the proxy against, without a GPU."""

from __future__ import annotations

import argparse
import asyncio

from proxy.sim.faults import forever
from proxy.sim.server import Simulator


async def _serve(args: argparse.Namespace) -> None:
    sim = Simulator(
        models=[m for m in args.models.split(",") if m],
        tokens=args.tokens,
        token_delay=args.token_delay,
        load_delay=args.load_delay,
    )
    url = await sim.start(args.host, args.port)
    print(
        f"simulated Ollama listening on {url} (models: {', '.join(sim.model_names())}); Ctrl-C to stop",
        flush=True,
    )
    try:
        await forever()
    finally:
        await sim.close()


def main(argv: list[str] | None = None) -> None:
    """Serve a simulated Ollama until interrupted, for trying the proxy without a GPU."""
    parser = argparse.ArgumentParser(prog="python -m proxy.sim", description=main.__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11434, help="0 picks a free port (default: %(default)s)")
    parser.add_argument(
        "--models", default="llama3.2,big,small", help="comma-separated (default: %(default)s)"
    )
    parser.add_argument("--tokens", type=int, default=8, help="tokens per answer (default: %(default)s)")
    parser.add_argument(
        "--token-delay", type=float, default=0.05, help="seconds per token (default: %(default)s)"
    )
    parser.add_argument(
        "--load-delay", type=float, default=0.0, help="seconds before headers (default: %(default)s)"
    )
    try:
        asyncio.run(_serve(parser.parse_args(argv)))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
