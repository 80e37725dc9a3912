"""The OpenAI-compatible frontend: HTTP, templates and tokens, routing, detokenization."""
