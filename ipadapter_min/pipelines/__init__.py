"""Generation: prompt, reference images, init image, mask and controls in, images out.
``text_to_image.py`` is the loop (StableDiffusion), ``image_prompts.py`` adds the IP-Adapter
(IPAdapterPipeline); img2img and inpainting, structure controls, long prompts, picture
preparation and the memory check are their parts.

It imports from: formats, ip_adapter, kernels, loading, models, samplers.
"""
