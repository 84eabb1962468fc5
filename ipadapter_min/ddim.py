"""The older home of SD1.5's noise schedule, kept so that ``from ipadapter_min.ddim import DDIM``
and ``DDIM().add_noise(latents, noise, timesteps)`` (training's forward process) still work.
The schedule is ``samplers.schedule.NoiseSchedule``; the DDIM sampler is ``samplers.DDIM``."""
from .samplers.schedule import NoiseSchedule as DDIM  # noqa: F401
