"""Training objectives: MDLM continuous-time NELBO (SUBS), LLaDA/MD4 form, autoregressive baseline.

    obj = OBJECTIVES.get(cfg.objective)(schedule, mask_id=mask_id, vocab_size=vocab_size)
    model_input, aux = obj.prepare(x0, noise)      # corrupted tokens (mdlm/llada) or x0 (ar)
    out = obj.loss(logits, x0, aux)                 # LossOut(loss_sum, tokens)

Reductions (see docs/diffusion.md): ``loss_sum`` is a SUM over the micro batch and ``tokens``
the number of token positions it is normalised by; the trainer divides the summed loss of all
micro batches and ranks by the summed ``tokens`` (gradient accumulation and data parallelism
then give exactly the full-batch gradient).

Logits may be wider than ``vocab_size`` (megatron pads the vocab): columns >= vocab_size get
-inf, and so does the mask id for every objective here (it is never a target; for mdlm/llada
this is the SUBS parameterisation). CE is computed in float32 whatever the logits' dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from megadiff.diffusion.catalog import OBJECTIVES, ObjectiveTraits
from megadiff.diffusion.noise import Noise, corrupt
from megadiff.diffusion.schedules import Schedule


@dataclass
class LossOut:
    loss_sum: torch.Tensor  # scalar float32, SUM over the micro batch (carries the graph)
    tokens: torch.Tensor  # scalar int64: normaliser contribution (token positions)


@dataclass
class DiffusionAux:
    """What ``loss`` needs from ``prepare``: the mask and the per-sample weight."""

    masked: torch.Tensor  # [B, L] bool, True where x0 was replaced by [MASK]
    t: torch.Tensor  # [B] float32
    weight: torch.Tensor  # [B] float32, per-token weight of the masked CE


@dataclass
class LossRows:
    """The positions that carry loss, so that a loss head can score those rows only (the training step's
    fused path, megadiff/model/loss_head.py): ``loss_from_ce`` turns their CE into the same ``LossOut``
    as ``loss`` on full logits."""

    select: torch.Tensor  # [B, L] bool: positions whose output row is scored
    target: torch.Tensor  # [N] long: target token of each selected position (row-major order)
    weight: torch.Tensor  # [N] float32: weight of each selected position's CE in loss_sum


def restrict_logits(logits: torch.Tensor, vocab_size: int, mask_id: int | None) -> torch.Tensor:
    """float32 logits over the real vocab with the mask column at -inf (SUBS); drops padded columns."""
    out = logits[..., :vocab_size].float()
    if mask_id is not None and 0 <= mask_id < vocab_size:
        out = out.index_fill(-1, torch.tensor([mask_id], device=out.device), float("-inf"))
    return out


def token_ce(logits: torch.Tensor, target: torch.Tensor, vocab_size: int, mask_id: int | None) -> torch.Tensor:
    """Per-position cross-entropy [..] in float32: logsumexp(logits) - logits[target] (restricted vocab)."""
    lg = restrict_logits(logits, vocab_size, mask_id)
    return torch.logsumexp(lg, dim=-1) - lg.gather(-1, target.unsqueeze(-1)).squeeze(-1)


def next_token_ce(logits: torch.Tensor, x: torch.Tensor, vocab_size: int, mask_id: int | None) -> torch.Tensor:
    """[B, L-1] float32 CE of x[:, l+1] under logits[:, l]: the autoregressive likelihood, used by the ``ar``
    objective, the zero-shot NLL and the AR scorer of generation quality."""
    return token_ce(logits[:, :-1], x[:, 1:], vocab_size, mask_id)


class Objective:
    """Base class. Subclasses implement ``prepare`` and ``loss`` (contract in the module docstring)."""

    name = "base"

    def __init__(self, schedule: Schedule, mask_id: int, vocab_size: int, **_: Any):
        if not 0 <= mask_id < vocab_size:
            raise ValueError(f"mask_id {mask_id} must be inside the real vocab (size {vocab_size})")
        self.schedule, self.mask_id, self.vocab_size = schedule, int(mask_id), int(vocab_size)

    @property
    def traits(self) -> ObjectiveTraits:
        """Declared in megadiff/diffusion/catalog.py: causal mask, validation metric, bound or exact."""
        return OBJECTIVES.traits(self.name)

    def for_validation(self) -> Objective:
        """The objective whose mean loss is the validation metric (``traits.val_metric``): itself, unless
        its training loss is not that metric (llada's 1/p_mask weighting is no bound for most schedules)."""
        return self

    @property
    def rows_per_sample(self) -> int:
        """Model input rows that ``prepare`` makes per sample (>1 for objectives that stack copies of the batch,
        trait ``stacks_rows``): the trainer's FLOPs accounting multiplies by it."""
        return 1

    def prepare(self, x0: torch.Tensor, noise: Noise) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, x0: torch.Tensor, aux: Any) -> LossOut:
        raise NotImplementedError

    @property
    def has_loss_rows(self) -> bool:
        """``loss_rows`` / ``loss_from_ce`` are implemented: the step may score only those rows (fused loss
        path); otherwise it computes full logits and calls ``loss``."""
        return type(self).loss_rows is not Objective.loss_rows

    def loss_rows(self, x0: torch.Tensor, aux: Any) -> LossRows:
        raise NotImplementedError

    def loss_from_ce(self, ce: torch.Tensor, loss_sum: torch.Tensor, rows: LossRows, x0: torch.Tensor,
                     aux: Any) -> LossOut:
        """``LossOut`` from the CE of the selected rows (``ce`` detached, ``loss_sum`` = sum weight x ce)."""
        raise NotImplementedError


class _MaskedDiffusion(Objective):
    """Shared body: loss_sum = sum_b weight_b * sum_{l masked} CE(b, l); tokens = B * L."""

    def __init__(self, schedule: Schedule, mask_id: int, vocab_size: int, cfg: Any = None, **kw: Any):
        super().__init__(schedule, mask_id=mask_id, vocab_size=vocab_size, **kw)
        self.eps = float(cfg.eps) if cfg is not None else 1e-3  # diffusion.eps

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def for_validation(self) -> Objective:
        """The NELBO of the eps-truncated chain by mask counts (elbo.CountNELBO): unbiased, finite variance,
        an upper bound on the NLL for every schedule, whatever this objective's training weighting."""
        from megadiff.diffusion.elbo import CountNELBO

        return CountNELBO(self.schedule, self.mask_id, self.vocab_size, eps=self.eps)

    def prepare(self, x0, noise):
        xt, masked = corrupt(x0, noise, self.schedule, self.mask_id)
        w = self.weight(noise.t.to(torch.float64)).to(torch.float32)
        return xt, DiffusionAux(masked=masked, t=noise.t, weight=w)

    def loss(self, logits, x0, aux: DiffusionAux):
        ce = token_ce(logits, x0, self.vocab_size, self.mask_id)  # [B, L] float32
        ce_m = torch.where(aux.masked, ce, torch.zeros_like(ce))
        loss_sum = (ce_m * aux.weight[:, None]).sum()
        return LossOut(loss_sum, torch.tensor(x0.numel(), device=x0.device))

    def loss_rows(self, x0, aux: DiffusionAux):
        sel = aux.masked
        return LossRows(sel, x0[sel], aux.weight[:, None].expand_as(x0)[sel])

    def loss_from_ce(self, ce, loss_sum, rows, x0, aux: DiffusionAux):
        return LossOut(loss_sum, torch.tensor(x0.numel(), device=x0.device))


@OBJECTIVES.register("mdlm")
class MDLM(_MaskedDiffusion):
    """Continuous-time NELBO with SUBS: weight -alpha'(t) / (1 - alpha(t)) on the masked CE.

    loss_sum / tokens is an unbiased estimate of the NELBO in nats per token (up to the
    (1 - eps) factor from t ~ U(eps, 1)).
    """

    name = "mdlm"

    def weight(self, t):
        return self.schedule.nelbo_weight(t)


@OBJECTIVES.register("llada")
class LLaDA(_MaskedDiffusion):
    """LLaDA / MD4 form: weight 1 / p_mask with p_mask = 1 - alpha(t) (= 1/t for loglinear).

    Matches LLaDA's pretraining loss sum_{masked} CE / p_mask / (B * L). Equal to ``mdlm`` (and a
    NELBO) for the loglinear schedule; for other schedules it is the mask-ratio weighting, not a bound.
    """

    name = "llada"

    def weight(self, t):
        return 1.0 / self.schedule.mask_prob(t)



@OBJECTIVES.register("ar")
class Autoregressive(Objective):
    """Next-token CE: logits at position l predict x0[l + 1]; the model runs with a causal mask.

    prepare returns x0 unchanged (noise ignored); loss_sum = sum over B x (L - 1) positions,
    tokens = B * (L - 1).
    """

    name = "ar"

    def prepare(self, x0, noise=None):
        return x0, None

    def loss(self, logits, x0, aux=None):
        ce = next_token_ce(logits, x0, self.vocab_size, self.mask_id)
        n = ce.numel()
        return LossOut(ce.sum(), torch.tensor(n, device=x0.device))

    def loss_rows(self, x0, aux=None):
        sel = torch.ones_like(x0, dtype=torch.bool)
        sel[:, -1] = False  # position l predicts x0[l + 1]; the last position has no target
        target = x0[:, 1:].reshape(-1)
        return LossRows(sel, target, torch.ones(target.shape, dtype=torch.float32, device=x0.device))

    def loss_from_ce(self, ce, loss_sum, rows, x0, aux=None):
        return LossOut(loss_sum, torch.tensor(ce.numel(), device=x0.device))


def make_objective(cfg_diffusion: Any, schedule: Schedule, mask_id: int, vocab_size: int) -> Objective:
    """Build the objective named by a ``DiffusionConfig``."""
    return OBJECTIVES.get(cfg_diffusion.objective)(schedule, mask_id=mask_id, vocab_size=vocab_size, cfg=cfg_diffusion)
