"""Masked-diffusion maths in pure torch: schedules, noise, objectives, NELBO evaluation, samplers.

No distributed code and no megatron imports (see docs/diffusion.md and docs/architecture.md, Contract 2).
"""

from megadiff.diffusion import block as _block  # noqa: F401  (registers the bd3lm objective)
from megadiff.diffusion.elbo import evaluate_nelbo
from megadiff.diffusion.noise import Noise, corrupt, make_noise, random_length
from megadiff.diffusion.objectives import OBJECTIVES, LossOut, Objective, make_objective
from megadiff.diffusion.samplers import SAMPLERS, SampleOut, make_canvas, make_infill_canvas
from megadiff.diffusion.schedules import SCHEDULES, Schedule, make_schedule

__all__ = [
    "OBJECTIVES",
    "SAMPLERS",
    "SCHEDULES",
    "LossOut",
    "Noise",
    "Objective",
    "SampleOut",
    "Schedule",
    "corrupt",
    "evaluate_nelbo",
    "make_canvas",
    "make_infill_canvas",
    "make_noise",
    "make_objective",
    "make_schedule",
    "random_length",
]
