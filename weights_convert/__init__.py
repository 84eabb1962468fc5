"""Readers for the checkpoint files people download, and writers of the project's own layout.

``python -m weights_convert --help`` lists the conversions.
"""
