"""The simulated Ollama, for tests, the demo and benchmarks."""
