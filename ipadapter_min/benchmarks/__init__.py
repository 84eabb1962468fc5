"""Benchmarks: python -m ipadapter_min.benchmarks.attention (see its --help).

It imports from: formats, ip_adapter, kernels, loading, models, pipelines.
"""
