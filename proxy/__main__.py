"""`python -m proxy`: the same as the `ollama-queue-proxy` command."""

import sys

from proxy.cli import main

sys.exit(main())
