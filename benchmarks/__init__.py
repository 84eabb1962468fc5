"""Benchmarks: python -m benchmarks.attention (see its --help)."""
