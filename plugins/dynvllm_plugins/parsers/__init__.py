"""First-party tool-call and reasoning parsers (pure text processing)."""
