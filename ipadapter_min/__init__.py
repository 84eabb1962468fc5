"""ipadapter_min: IP-Adapter on Stable Diffusion 1.5, written from scratch in PyTorch."""
