"""The benchmark: `python -m bench` measures what the proxy adds over Ollama, next to nginx.

See docs/performance.md for what it measures, how, and the latest figures.
"""
