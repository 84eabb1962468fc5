"""Attention kernels. Importing this package does not import triton (see decoupled_attention).

It imports nothing else of ours.
"""
from .decoupled_attention import (decoupled_attention, decoupled_attention_branches,
                                  decoupled_attention_branches_reference, decoupled_attention_reference,
                                  decoupled_attention_triton)

__all__ = ["decoupled_attention", "decoupled_attention_branches", "decoupled_attention_branches_reference",
           "decoupled_attention_reference", "decoupled_attention_triton"]
