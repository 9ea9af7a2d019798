"""What Ollama's API means: model names, request classes, wire formats, token counts."""
