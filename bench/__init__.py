"""Benchmarks: `python -m bench.model` (model-only paths), `python -m bench.server` (the server under load)."""
