"""Benchmarks for the nested-attention pack (run as modules, e.g. `python -m benchmarks.overhead`)."""
