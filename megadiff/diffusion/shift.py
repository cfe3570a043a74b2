"""Shift parameterisation (DiffuLLaMA, Dream): the network's output at position i predicts token i + 1.

An autoregressive checkpoint already predicts the NEXT token at every position; keeping that output
alignment when it is adapted into a diffusion LM reuses its head unchanged. A shifted model's logits
are turned into the usual alignment (``logits[:, i]`` predicts token i) by ``unshift``:

    aligned[:, i] = shifted[:, i - 1]   (i >= 1)
    aligned[:, 0] = shifted[:, 0]       (Dream's convention: no output predicts token 0)

Token 0 therefore has no proper prediction: the shifted objectives never mask it (it is conditioning,
like a one-token prompt; their NELBO bounds -log p(x_1..x_{L-1} | x_0) per predicted token, the same
quantity as the AR NLL), and samplers should be given a first token (a BOS or prompt). Wrapping a
shifted model's ``model_fn`` with ``aligned_model_fn`` makes every sampler and ``evaluate_nelbo`` work
on it unchanged (evaluate_nelbo may mask token 0 too; its estimate then stays a valid, slightly looser
bound because Dream's position-0 logits are a proper distribution).

``parameterisation_record(cfg.diffusion)`` is what an export (``convert to-hf``) states about the
output alignment, and ``parameterisation_readme`` the README lines that say it.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from megadiff.diffusion.catalog import OBJECTIVES


def unshift(logits: torch.Tensor) -> torch.Tensor:
    """[B, L, V] shifted logits (position i predicts i + 1) -> the usual alignment (position i predicts i)."""
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


def is_shifted(cfg_diffusion: Any) -> bool:
    """The run's network output at position i predicts token i + 1 (an AR objective, or ``diffusion.shift``)."""
    if OBJECTIVES.traits(cfg_diffusion.objective).is_autoregressive:
        return True
    return bool(getattr(cfg_diffusion, "shift", False)) and "shift" in OBJECTIVES.traits(cfg_diffusion.objective).options


def aligned_model_fn(model_fn: Callable[[torch.Tensor], torch.Tensor],
                     cfg_diffusion: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model_fn`` of a diffusion run in the usual alignment: unshifted when the run trained shifted.

    Only for diffusion objectives (an autoregressive run's logits are next-token by definition and are
    consumed as such by the AR paths); returns ``model_fn`` itself when nothing is to be done.
    """
    tr = OBJECTIVES.traits(cfg_diffusion.objective)
    if tr.is_autoregressive or not is_shifted(cfg_diffusion):
        return model_fn

    def fn(tokens: torch.Tensor) -> torch.Tensor:
        return unshift(model_fn(tokens))

    return fn


def parameterisation_record(cfg_diffusion: Any) -> dict:
    """What a checkpoint export records about its output alignment and objective (JSON-ready)."""
    tr = OBJECTIVES.traits(cfg_diffusion.objective)
    shifted = is_shifted(cfg_diffusion)
    rec = {
        "objective": str(cfg_diffusion.objective),
        "objective_description": tr.description,
        "shift": shifted,
        "logits_alignment": "position i predicts token i+1" if shifted else "position i predicts token i",
        "causal_attention": bool(tr.needs_causal_mask),
    }
    for key in tr.options:
        rec[key] = getattr(cfg_diffusion, key)
    return rec


def parameterisation_readme(cfg_diffusion: Any) -> str:
    """Markdown lines for an exported model's README stating the output alignment."""
    rec = parameterisation_record(cfg_diffusion)
    lines = [f"- Objective: `{rec['objective']}` ({rec['objective_description']})",
             f"- Output alignment: **{rec['logits_alignment']}**"
             + (" (shift parameterisation: to score token i read the logits at i-1; token 0 is conditioning)"
                if rec["shift"] else ""),
             f"- Attention: {'causal' if rec['causal_attention'] else 'bidirectional'}"]
    extra = {k: v for k, v in rec.items() if k in OBJECTIVES.traits(rec["objective"]).options}
    if extra:
        lines.append("- Objective options: " + ", ".join(f"`diffusion.{k}={v}`" for k, v in extra.items()))
    return "\n".join(lines) + "\n"
