"""2-rank gloo checks of masked attention at TP=2 and PP=2 (run by tests/test_attention_masks.py).

The hardest mask: BD3-LM layout (block 4) over packed documents with restarted positions, through the
real train step (``megadiff.train.step``: noise -> bd3lm prepare -> step_attention -> model -> loss).
* tp2: logits and loss of a TP=2 model (same seed) vs the TP=1 reference
* pp2: loss and gradients of PP=2 stages (1F1B over 2 micro batches) vs the reference
The same again (keys prefixed ``anneal_``) for mdlm with attention-mask annealing over packed documents at
step 2 of 8 (the annealed mask is a function of the step: every stage and TP rank builds the same one).
Rank 0 writes {check: value} to argv[1].
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist


def main(out_path: str) -> None:
    torch.set_num_threads(1)
    from megadiff.dist import cpu_shim

    cpu_shim.install()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    from megatron.core import parallel_state as ps
    from omegaconf import OmegaConf

    from megadiff.config import DiffusionConfig, ModelConfig
    from megadiff.diffusion.objectives import make_objective
    from megadiff.diffusion.schedules import make_schedule
    from megadiff.train.step import StepContext

    V, L, B = 200, 16, 4
    mcfg = OmegaConf.structured(ModelConfig(arch="llama", num_layers=2, hidden_size=64, num_attention_heads=4,
                                            num_query_groups=2, max_seq_len=L, tie_embeddings=False))
    dcfg = OmegaConf.structured(DiffusionConfig(objective="bd3lm", block_size=4))
    obj = make_objective(dcfg, make_schedule(dcfg), mask_id=V - 1, vocab_size=V)
    x0 = torch.randint(0, V - 1, (B, L), generator=torch.Generator().manual_seed(0))
    seg = torch.tensor([[0] * 5 + [1] * 11, [0] * 16, [0] * 3 + [1] * 3 + [2] * 10, [0] * 12 + [1] * 4])
    mbs_full = [{"tokens": x0, "sample_ids": torch.arange(B), "segment_ids": seg}]
    ctx = SimpleNamespace(device=torch.device("cpu"))
    res: dict[str, float] = {}
    bd3lm = StepContext(obj, dcfg, B, document_mask=True, reset_position_ids=True)
    acfg = OmegaConf.structured(DiffusionConfig(objective="mdlm", anneal_steps=8))
    anneal = StepContext(make_objective(acfg, make_schedule(acfg), mask_id=V - 1, vocab_size=V), acfg, B,
                         document_mask=True, reset_position_ids=True, anneal_steps=8, loss_path="logits")
    for prefix, sc, step, off in (("", bd3lm, 0, dict(document_mask=False, reset_position_ids=False)),
                                  ("anneal_", anneal, 2, dict(anneal_steps=0))):
        check(res, prefix, sc, step, off, mcfg, V, mbs_full, ctx)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(res, f, indent=1)
    ps.destroy_model_parallel()
    dist.destroy_process_group()


def check(res, prefix, sc, step, off, mcfg, V, mbs_full, ctx):
    """TP=2 and PP=2 vs TP=1 for one step context at one step; ``off`` switches its mask feature off."""
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megadiff.model.build import build_model
    from megadiff.train.step import make_forward_step, run_forward_backward

    def layout(tp, pp):
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        return ProcessGroupCollection.use_mpu_process_groups()

    def build(tp=1, pp=1, pg=None):
        torch.manual_seed(1234)
        m = build_model(mcfg, V, tp=tp, pp=pp, pg_collection=pg, pre_process=ps.is_pipeline_first_stage(),
                        post_process=ps.is_pipeline_last_stage(), masked=True)
        m.config.calculate_per_token_loss = True
        return m.model

    def forward(model, mb, sc=sc):
        out, loss_fn = make_forward_step(sc, step)(iter([mb]), model)
        return out, loss_fn(out)[0]

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))

    pg = layout(1, 1)
    ref = build(pg=pg)
    ref_logits, ref_loss = forward(ref, mbs_full[0])
    ref_loss.backward()
    ref_grads = {n: p.grad.detach().clone() for n, p in ref.named_parameters()}
    ref_state = ref.state_dict()
    # the mask matters: the same step without documents (annealing) gives another loss
    plain = dataclasses.replace(sc, **off)
    res[prefix + "unmasked_loss_rel"] = abs(float(forward(ref, mbs_full[0], plain)[1]) - float(ref_loss)) / float(ref_loss)

    pg = layout(2, 1)
    tpm = build(tp=2, pg=pg)
    with torch.no_grad():
        lg, lo = forward(tpm, mbs_full[0])
    res[prefix + "tp2_logits_rel"] = rel(lg[..., :V], ref_logits.detach()[..., :V])
    res[prefix + "tp2_loss_rel"] = abs(float(lo) - float(ref_loss)) / float(ref_loss)

    pg = layout(1, 2)
    stage = build(pp=2, pg=pg)
    offset = ps.get_pipeline_model_parallel_rank() * (mcfg.num_layers // 2)

    def ref_name(n):
        if n.startswith("decoder.layers."):
            i, rest = n[len("decoder.layers."):].split(".", 1)
            return f"decoder.layers.{int(i) + offset}.{rest}"
        return n

    own = stage.state_dict()
    stage.load_state_dict({k: ref_state[ref_name(k)] for k in own if torch.is_tensor(own[k])}, strict=False)
    halves = [{k: v[:2] for k, v in mbs_full[0].items()}, {k: v[2:] for k, v in mbs_full[0].items()}]
    tot = run_forward_backward(stage, halves, sc, step, ctx, forward_only=False)
    dist.all_reduce(tot)  # only the last stage holds it
    res[prefix + "pp2_loss_rel"] = abs(float(tot[0]) - float(ref_loss)) / float(ref_loss)
    worst = torch.tensor([max(rel(p.grad, ref_grads[ref_name(n)]) for n, p in stage.named_parameters())],
                         dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    res[prefix + "pp2_grad_rel"] = float(worst)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1])
