"""rayft.serving: the Ray Serve application (OpenAI-compatible), its engines, adapters and auth."""
