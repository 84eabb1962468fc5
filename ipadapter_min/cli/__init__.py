"""The command lines' parts: ``sample.py`` (``python -m ipadapter_min.sample``), ``train.py``,
``evaluate.py``, with what they share: checked option values, the command line cut into options and one-line errors (``parsing.py``),
image-prompt groups, image files, comma-list sweeps, the PNG's parameters and re-runs from them.
The thin entry modules ``ipadapter_min/sample.py``, ``train.py`` and ``evaluate.py`` run them.

It imports from: formats, ip_adapter, kernels, loading, models, pipelines, samplers, training.
"""
