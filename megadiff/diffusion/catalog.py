"""What exists, and how it behaves, without importing torch: the objectives, samplers and noise schedules.

Each entry names the module that implements it (and registers it with ``@REGISTRY.register(name)``)
and declares its traits. Code outside ``megadiff/diffusion/`` asks these traits instead of comparing
names (``OBJECTIVES.traits(name).is_autoregressive``, never ``name == "ar"``). Adding an objective or a
sampler = one ``declare`` line here + the decorated implementation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megadiff.registry import Registry


@dataclass(frozen=True)
class ObjectiveTraits:
    description: str  # one line for model cards, exports and tables
    is_autoregressive: bool = False  # next-token model (causal mask, exact likelihood, sampled left to right)
    needs_causal_mask: bool = False  # the model is built with causal self-attention
    val_metric: str = "nelbo"  # validation metric name: nelbo (a bound on the NLL) | nll (exact)
    val_is_bound: bool = True  # the validation value upper-bounds the NLL (printed as "ppl <=")
    train_loss_is_val_metric: bool = True  # its training loss estimates the validation metric itself
    options: tuple = ()  # the diffusion.* config keys (beyond the common ones) this objective reads
    # (anneal_steps: the bidirectional objectives on plain sequences; the trainer applies it to the attention)
    stacks_rows: bool = False  # prepare may stack several inputs per sample along the batch (2x/3x rows)
    absorbing: bool = True  # [MASK]-only forward process: the SAMPLERS and elbo.evaluate_nelbo apply to it
    block_diffusion: bool = False  # BD3-LM: takes diffusion.block_size; model input [x_t ‖ x_0] (2L tokens)


OBJECTIVES: Registry = Registry("objective")
OBJECTIVES.declare("mdlm", "megadiff.diffusion.objectives", ObjectiveTraits(
    "masked diffusion (MDLM, continuous-time NELBO)", options=("anneal_steps",)))
OBJECTIVES.declare("llada", "megadiff.diffusion.objectives", ObjectiveTraits(
    "masked diffusion (LLaDA, 1/p_mask-weighted loss)", train_loss_is_val_metric=False, options=("anneal_steps",)))
OBJECTIVES.declare("ar", "megadiff.diffusion.objectives", ObjectiveTraits(
    "autoregressive (next token)", is_autoregressive=True, needs_causal_mask=True, val_metric="nll",
    val_is_bound=False))
OBJECTIVES.declare("mdlm_adapt", "megadiff.diffusion.hybrid", ObjectiveTraits(
    "masked diffusion (MDLM NELBO) with AR-adaptation options: shift (position i predicts i+1), "
    "complementary masks", options=("shift", "complementary", "anneal_steps"), stacks_rows=True))
OBJECTIVES.declare("ar_mdlm", "megadiff.diffusion.hybrid", ObjectiveTraits(
    "joint autoregressive + shifted masked-diffusion loss (causal model)", is_autoregressive=True,
    needs_causal_mask=True, val_metric="nll", val_is_bound=False, train_loss_is_val_metric=False,
    options=("ar_weight", "diffusion_weight", "complementary"), stacks_rows=True))
OBJECTIVES.declare("gidd", "megadiff.diffusion.uniform", ObjectiveTraits(
    "interpolating mask + uniform noise (GIDD; uniform_fraction=1: uniform diffusion), continuous-time NELBO",
    options=("uniform_fraction", "anneal_steps"), absorbing=False))
OBJECTIVES.declare("bd3lm", "megadiff.diffusion.block", ObjectiveTraits(
    "block diffusion (BD3-LM, block NELBO)", block_diffusion=True,
    options=("block_size", "mask_rate_min", "mask_rate_max", "block_curriculum_start",
             "block_curriculum_warmup_steps", "block_curriculum_decay_steps")))


@dataclass(frozen=True)
class SamplerTraits:
    description: str
    stepless: bool = False  # output does not depend on a step count (one network call per reveal)
    needs_schedule: bool = False  # takes the run's noise schedule
    cacheable: bool = False  # reuses logits when no token changed (`cache=` keyword)
    blocks: bool = False  # generates block by block (`block_length=`, steps counted per block)
    default_block: Optional[int] = None  # block length when none is given (None: one block)
    stops_at_eos: bool = False  # takes eos_id/pad_id: variable-length output (not with infilling)
    remasking: bool = False  # takes `remasking=` (LLaDA low_confidence | random)
    grouped: bool = False  # takes `group=` (tokens revealed per network call)
    needs_denoiser: bool = False  # block diffusion: takes `denoiser=` (KV-cached BD3-LM calls) and the run's block size


SAMPLERS: Registry = Registry("sampler")
SAMPLERS.declare("ancestral", "megadiff.diffusion.samplers", SamplerTraits(
    "MDLM ancestral sampling over uniform time steps", needs_schedule=True, cacheable=True))
SAMPLERS.declare("first_hitting", "megadiff.diffusion.samplers", SamplerTraits(
    "first-hitting: one reveal per network call (exact)", stepless=True, grouped=True))
SAMPLERS.declare("llada", "megadiff.diffusion.samplers", SamplerTraits(
    "LLaDA fixed-count commits with remasking", blocks=True, remasking=True))
SAMPLERS.declare("block", "megadiff.diffusion.samplers", SamplerTraits(
    "semi-autoregressive blocks of cached ancestral sampling", needs_schedule=True, cacheable=True, blocks=True,
    default_block=32, stops_at_eos=True))
SAMPLERS.declare("bd3lm", "megadiff.diffusion.block_sampler", SamplerTraits(
    "block diffusion (BD3-LM) with an exact KV cache of the clean prefix", cacheable=True, blocks=True,
    stops_at_eos=True, needs_denoiser=True))

SCHEDULES: Registry = Registry("noise schedule")
for _name in ("loglinear", "linear", "cosine", "poly"):
    SCHEDULES.declare(_name, "megadiff.diffusion.schedules")
