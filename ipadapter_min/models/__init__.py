"""The networks of SD1.5 and its controls, one file a model, each built from a dataclass in
``configs.py`` whose defaults are SD1.5: the CLIP tokenizer and text encoder, the UNet, the VAE, the
CLIP image encoder, ControlNet and T2I-Adapter. They know no files (``loading`` fills them) and no
image prompt: the UNet's cross-attention takes a hook (``attention.CrossAttentionHook``), and its
one residual input (``residuals.Residuals``) takes ControlNets and T2I-Adapters.

It imports from: kernels.
"""
