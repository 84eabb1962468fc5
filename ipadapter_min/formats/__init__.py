"""Checkpoint formats: how each file people download names and shapes its tensors, and how those
names map to ours. Readers return plain ``{key: tensor}`` dicts and configs; they know key names
and shapes, and the architecture's numbers (``models.configs``, ``ip_adapter.layers``), never model
classes (building and checking models is ``loading``'s job).

It imports from: ip_adapter, models.
"""
