"""IP-Adapter (Ye et al., 2023). The paper's method: ``projection.py`` turns the image encoder's
features into image tokens, ``adapter.py`` holds them with the 16 (to_k_ip, to_v_ip) pairs, and
``hook.py`` is the decoupled cross-attention the UNet calls, out = text attention + λ · image
attention, λ per layer (``layers.py``); ``tokens.py`` turns reference images into one prompt's
positive and negative tokens. Around it, ComfyUI's and diffusers' extras on the same seams:
``hook_options.py`` (masks, step ranges, embeds scaling, swapped layers) extends the hook; weight
types, combine modes, negative noise and several adapters at once.

It imports from: kernels, models, samplers.
"""
