"""Training an IP-Adapter with the paper's recipe: the frozen models and the loss (``recipe.py``),
its data, the encoder-output cache, checkpoints and torchrun processes; CLIP scores for the paper's
evaluation.

It imports from: formats, ip_adapter, loading, models, samplers.
"""
