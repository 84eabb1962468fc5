"""Checkpoint formats: how each file people download names and shapes its tensors, and how those
names map to ours. Readers return plain ``{key: tensor}`` dicts and configs; they know key names
and shapes, never model classes (building and checking models is ``ipadapter_min.loading``'s job).
"""
