"""`python -m bench.uvloop_proxy --config PATH`: the proxy on uvloop's event loop.

The proxy itself does not support uvloop; this measures what it would gain.
`asyncio.run` in the CLI picks the loop from the policy installed here.
"""

import sys

import uvloop

from proxy.cli import main

uvloop.install()
sys.exit(main())
