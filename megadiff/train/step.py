"""The training/eval step: corrupt → model → objective, through megatron's forward-backward schedules.

The diffusion maths never sees megatron: ``forward_step`` feeds the objective's corrupted tokens to
the model and hands its output back to the objective's loss. Two loss paths (``trainer.loss_path``):

* ``fused`` (default): the model returns final hidden states; only the rows that carry loss (the
  objective's ``loss_rows``: masked positions for the diffusion objectives, all but the last for ar)
  are gathered and scored by the vocab-parallel, chunked linear + cross-entropy head
  (megadiff/model/loss_head.py). No rank materialises logits for all rows or all of the vocab.
* ``logits``: full-vocab logits on every position and TP rank, ``objective.loss`` on them (the
  reference path: simpler, far more memory; tests check the two agree).

Step curricula (``megadiff.diffusion.curricula``; functions of the step, the same on every TP/PP/DP rank
and after a resume): with ``anneal_steps`` the model attends through the step's annealed mask (causal +
a growing random share of the upper triangle) until it is all open; with ``block_curriculum`` the
block-diffusion objective (and so the attention layout) takes the step's block size. Validation builds
its StepContext without either.

Losses are SUMS with a token count
(megatron's ``calculate_per_token_loss``), so gradient accumulation and data parallelism give
exactly the full-global-batch gradient whatever the layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist

from megadiff.diffusion.curricula import BlockCurriculum, anneal_ratio, annealed_attention
from megadiff.diffusion.noise import make_noise, random_length
from megadiff.model.loss_head import hidden_states_out, linear_cross_entropy
from megadiff.model.masks import step_attention


@dataclass(frozen=True)
class StepContext:
    """What forward_step needs besides the step number: the objective and how its noise is drawn."""

    objective: Any
    diffusion_cfg: Any
    global_batch: int
    noise_seed: int = 0
    t_min: float | None = None  # lower end of t ~ U(t_min, 1); None: diffusion.eps (the training cut)
    document_mask: bool = False  # data.document_mask: attention inside each packed document
    reset_position_ids: bool = False  # model.reset_position_ids
    loss_path: str = "fused"  # fused | logits (see the module docstring)
    anneal_steps: int = 0  # diffusion.anneal_steps: attention-mask annealing over the first steps (0: off)
    block_curriculum: Optional[BlockCurriculum] = None  # block-size curriculum of a block-diffusion objective


def step_objective(sc: StepContext, step: int, seq_len: int):
    """The objective of this step: the block curriculum's block size when there is one."""
    if sc.block_curriculum is None:
        return sc.objective
    return sc.objective.with_block_size(sc.block_curriculum.size_at(step, seq_len))


def step_allow(sc: StepContext, step: int, seq_len: int, device) -> Optional[torch.Tensor]:
    """[L, L] annealed attention of this step, or None once annealing is complete (or off)."""
    if sc.anneal_steps <= 0 or anneal_ratio(step, sc.anneal_steps) >= 1.0:
        return None
    return annealed_attention(sc.noise_seed, step, seq_len, sc.anneal_steps, device=device)


def make_forward_step(sc: StepContext, step: int):
    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        x0 = mb["tokens"]
        dc = sc.diffusion_cfg
        eps = dc.eps if sc.t_min is None else sc.t_min
        noise = make_noise(sc.noise_seed, step, mb["sample_ids"], x0.shape[1], eps=eps,
                           antithetic=dc.antithetic, global_batch=sc.global_batch, device=x0.device)
        objective = step_objective(sc, step, x0.shape[1])
        model_input, aux = objective.prepare(x0, noise)
        pos, mask = step_attention(objective, x0, model_input, mb.get("segment_ids"), sc.document_mask,
                                   sc.reset_position_ids, allow=step_allow(sc, step, x0.shape[1], x0.device))
        if sc.loss_path == "fused" and objective.has_loss_rows:
            with hidden_states_out(model) as head:
                output = model(model_input, pos, mask)
        else:
            output, head = model(model_input, pos, mask), None

        def loss_func(output):
            lo = fused_loss(objective, output, head["weight"], x0, aux) if head is not None \
                else objective.loss(output, x0, aux)
            tokens = lo.tokens.to(torch.int) if torch.is_tensor(lo.tokens) else torch.tensor(lo.tokens, dtype=torch.int)
            report = torch.stack([lo.loss_sum.detach().float(), tokens.float().to(lo.loss_sum.device)])
            return lo.loss_sum, tokens.to(lo.loss_sum.device), {"lm": report}

        return output, loss_func

    return forward_step


def fused_loss(objective, hidden: torch.Tensor, weight: torch.Tensor, x0: torch.Tensor, aux):
    """The objective's LossOut from the final hidden states ``[B, L, h]``: its loss rows only."""
    rows = objective.loss_rows(x0, aux)
    loss_sum, ce = linear_cross_entropy(hidden[rows.select], weight, rows.target, rows.weight,
                                        objective.vocab_size, objective.mask_id)
    return objective.loss_from_ce(ce, loss_sum, rows, x0, aux)


def to_device(mbs: Iterable[dict], device: torch.device, length: int | None = None) -> list[dict]:
    out = []
    for mb in mbs:
        tok = mb["tokens"]
        if length is not None and length < tok.shape[1]:
            tok = tok[:, :length]
        d = {"tokens": tok.to(device, non_blocking=True), "sample_ids": mb["sample_ids"].to(device)}
        if mb.get("segment_ids") is not None:
            d["segment_ids"] = mb["segment_ids"][:, :tok.shape[1]].to(device)
        out.append(d)
    return out


def run_forward_backward(ddp_model, mbs: list[dict], sc: StepContext, step: int, ctx,
                         forward_only: bool) -> torch.Tensor:
    """One global-batch pass on this rank. Returns [loss_sum, tokens] summed over micro batches
    (non-zero only on the last pipeline stage)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    fb = get_forward_backward_func()
    seq = mbs[0]["tokens"].shape[1]
    out = fb(forward_step_func=make_forward_step(sc, step), data_iterator=iter(mbs), model=[ddp_model],
             num_microbatches=len(mbs), seq_length=seq, micro_batch_size=mbs[0]["tokens"].shape[0],
             decoder_seq_length=seq, forward_only=forward_only)
    total = torch.zeros(2, dtype=torch.float64, device=ctx.device)
    for rec in out or []:
        total += rec["lm"].to(torch.float64)
    return total


def global_sum(vec: torch.Tensor, ctx) -> torch.Tensor:
    """Sum a per-rank statistic over the world, counting each TP group once (tp_rank 0 only)."""
    v = vec.clone() if ctx.tp_rank == 0 else torch.zeros_like(vec)
    if dist.get_world_size() > 1:
        dist.all_reduce(v)
    return v


def step_length(sc: StepContext, step: int, seq_len: int) -> int:
    """LLaDA random-length crop: identical on every rank (a function of seed and step)."""
    p = float(sc.diffusion_cfg.random_length_prob)
    return random_length(sc.noise_seed, step, seq_len, p)
