"""The samplers of ``StableDiffusion(…, sampler=NAME)`` and ``--sampler NAME``, each the diffusers
scheduler of the same name built from SD1.5's scheduler config (``X.from_config``), so the same seed
gives its image; one interface (:class:`Sampler`), one file each, one noise schedule (``schedule``).

It imports nothing else of ours.
"""
from __future__ import annotations

from .ddim import DDIM
from .dpmpp_2m import DPMPlusPlus2M
from .euler import Euler
from .euler_ancestral import EulerAncestral
from .sampler import Sampler
from .schedule import SD15, NoiseSchedule

# name → (class, its options)
SAMPLERS: dict[str, tuple[type[Sampler], dict]] = {
    "ddim": (DDIM, {}),
    "euler": (Euler, {}),
    "euler-a": (EulerAncestral, {}),
    "dpmpp-2m": (DPMPlusPlus2M, {}),
    "dpmpp-2m-karras": (DPMPlusPlus2M, {"karras": True}),
}

DESCRIPTIONS = {
    "ddim": "DDIM, deterministic at --eta 0 (diffusers' DDIMScheduler with SD1.5's settings; A1111's 'DDIM')",
    "euler": "Euler steps in noise level σ (EulerDiscreteScheduler; A1111's 'Euler')",
    "euler-a": "Euler ancestral: adds fresh noise at each step, so the image depends more on --steps "
               "(EulerAncestralDiscreteScheduler; A1111's 'Euler a')",
    "dpmpp-2m": "DPM++ 2M, second order, good images in 20-30 steps (DPMSolverMultistepScheduler; "
                "A1111's 'DPM++ 2M')",
    "dpmpp-2m-karras": "DPM++ 2M with Karras σ (smaller steps at low noise; use_karras_sigmas), A1111's "
                       "'DPM++ 2M Karras'",
}


def make_sampler(name: str, steps: int, eta: float = 0.0) -> Sampler:
    """A fresh sampler for one generation of ``steps`` steps. ``eta``: DDIM's η (fresh noise
    per step; 0 is deterministic); other samplers take none."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}: one of {', '.join(SAMPLERS)}")
    cls, options = SAMPLERS[name]
    if cls is DDIM:
        return DDIM(steps, eta)
    if eta:
        raise ValueError(f"eta applies to the DDIM sampler only, not to {name}")
    return cls(steps, **options)


def max_steps(name: str) -> int:
    return SAMPLERS[name][0].max_steps


__all__ = ["DDIM", "DPMPlusPlus2M", "Euler", "EulerAncestral", "NoiseSchedule", "SAMPLERS", "SD15", "Sampler",
           "DESCRIPTIONS", "make_sampler", "max_steps"]
