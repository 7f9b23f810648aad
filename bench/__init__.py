"""Tessera's benchmark harness (``make bench``; see bench/README.md and docs/benchmarks.md)."""
