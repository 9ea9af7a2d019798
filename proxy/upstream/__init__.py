"""The Ollama side: relaying a request, and knowing the upstream's health."""
