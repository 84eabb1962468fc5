"""Benchmarks: python -m ipadapter_min.benchmarks.attention (see its --help)."""
