"""Masked-diffusion maths in pure torch: schedules, noise, objectives, NELBO evaluation, samplers.

No distributed code and no megatron imports (see docs/diffusion.md and docs/architecture.md, Contract 2).
The package imports nothing eagerly: ``megadiff.diffusion.catalog`` (names and traits of the objectives,
samplers and schedules) loads without torch.
"""
