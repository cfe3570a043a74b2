"""Multi-process model checks, run by tests/test_model_parallel.py as 2 ranks under gloo on CPU.

One launch does every check (each launch costs seconds of megatron import): parallel_state is torn
down and rebuilt between layouts. Rank 0 writes {check: value} to the JSON file given as argv[1].

* reference: TP=1/PP=1 model, full batch, MDLM loss with fixed noise -> logits, loss, grads
* dp2:  megatron DDP (per-token loss) on half the batch per rank; reduced grads vs reference
* tp2:  TP=2 model from the same seed (CPU init slices the same full weights); logits, loss and
        gathered grads vs reference
* pp2:  PP=2 stages loaded with the reference weights, 1F1B over 2 micro batches; loss and grads
* bidirectional / causal: flipping one token changes logits at every position (no_mask spec), and
  only at positions >= the flipped one under the AR (causal) spec
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist


def main(out_path: str) -> None:
    torch.set_num_threads(1)
    import faulthandler

    faulthandler.dump_traceback_later(float(os.environ.get("MEGADIFF_HANG_DUMP_S", "400")), exit=True)
    from megadiff.dist import cpu_shim

    cpu_shim.install()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection
    from omegaconf import OmegaConf

    from megadiff.config import DiffusionConfig, ModelConfig
    from megadiff.diffusion.noise import make_noise
    from megadiff.diffusion.objectives import make_objective
    from megadiff.diffusion.schedules import make_schedule
    from megadiff.model.build import build_model, forward_logits, position_ids_for

    V, L, B = 200, 16, 4
    mcfg = OmegaConf.structured(ModelConfig(arch="llama", num_layers=2, hidden_size=64, num_attention_heads=4,
                                            num_query_groups=2, max_seq_len=L, tie_embeddings=True))
    dcfg = OmegaConf.structured(DiffusionConfig())
    sched = make_schedule(dcfg)
    obj = make_objective(dcfg, sched, mask_id=V - 1, vocab_size=V)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, V - 1, (B, L), generator=gen)
    ids = torch.arange(B)
    noise = make_noise(0, 0, ids, L, eps=1e-3, antithetic=True, global_batch=B)
    xt, aux = obj.prepare(x0, noise)
    res: dict[str, float] = {}

    def layout(tp, pp):
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        return ProcessGroupCollection.use_mpu_process_groups()

    def build(cfg, tp=1, pp=1, pg=None, seed=1234, causal=False):
        torch.manual_seed(seed)
        return build_model(cfg, V, causal=causal, tp=tp, pp=pp, pg_collection=pg, pre_process=ps.is_pipeline_first_stage(),
                           post_process=ps.is_pipeline_last_stage())

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))

    # ---------------------------------------------------------------- reference (TP=1, PP=1)
    pg = layout(1, 1)
    ref = build(mcfg, pg=pg).model
    logits = forward_logits(ref, xt)
    lo = obj.loss(logits, x0, aux)
    lo.loss_sum.backward()
    ref_logits = logits.detach()
    ref_loss = float(lo.loss_sum.detach())
    ref_tokens = float(lo.tokens)
    ref_grads = {n: p.grad.detach().clone() for n, p in ref.named_parameters()}

    # ---------------------------------------------------------------- DP=2 (megatron DDP, per-token loss)
    print(f'[{rank}] dp2', flush=True)
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    built = build(mcfg, pg=pg)
    conf = built.config
    conf.calculate_per_token_loss = True
    conf.finalize_model_grads_func = finalize_model_grads
    # all-reduce DDP: every rank then holds the full reduced gradient (with the distributed optimizer each
    # holds only its reduce-scattered shard; that path is covered by the trainer's DP=2 == DP=1 loss tests)
    ddp = DistributedDataParallel(conf, DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                                                     use_distributed_optimizer=False),
                                  built.model, pg_collection=pg)
    half = slice(rank * B // 2, (rank + 1) * B // 2)
    mine = {"x0": x0[half], "ids": ids[half]}

    def fstep(it, model):
        mb = next(it)
        nz = make_noise(0, 0, mb["ids"], L, eps=1e-3, antithetic=True, global_batch=B)
        inp, ax = obj.prepare(mb["x0"], nz)
        out = model(inp, position_ids_for(inp), None)

        def lf(lg):
            o = obj.loss(lg, mb["x0"], ax)
            return o.loss_sum, o.tokens.to(torch.int), {"lm": torch.stack([o.loss_sum.detach(), o.tokens.float()])}

        return out, lf

    ddp.zero_grad_buffer()
    get_forward_backward_func()(forward_step_func=fstep, data_iterator=iter([mine]), model=[ddp], num_microbatches=1,
                                seq_length=L, micro_batch_size=B // 2, forward_only=False)
    # finalize scaled by 1/total tokens; the reference grads are of the SUM -> compare ref / tokens
    res["dp2_grad_rel"] = max(rel(p.main_grad, ref_grads[n] / ref_tokens) for n, p in built.model.named_parameters())

    # ---------------------------------------------------------------- TP=2
    print(f'[{rank}] tp2', flush=True)
    pg = layout(2, 1)
    tpm = build(mcfg, tp=2, pg=pg).model
    lg = forward_logits(tpm, xt)
    lo = obj.loss(lg, x0, aux)
    lo.loss_sum.backward()
    res["tp2_logits_rel"] = rel(lg[..., :V].detach(), ref_logits[..., :V])
    res["tp2_loss_rel"] = abs(float(lo.loss_sum) - ref_loss) / abs(ref_loss)
    worst = 0.0
    tp_group = ps.get_tensor_model_parallel_group()
    for n, p in tpm.named_parameters():
        g = p.grad.detach()
        if getattr(p, "tensor_model_parallel", False):
            parts = [torch.empty_like(g) for _ in range(2)]
            dist.all_gather(parts, g.contiguous(), group=tp_group)
            if n.endswith("mlp.linear_fc1.weight") and mcfg.arch == "llama":
                # SwiGLU fc1 = [gate; up], each split over TP: rank r holds [gate_r; up_r]
                halves = [q.chunk(2, dim=0) for q in parts]
                g = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
            else:
                g = torch.cat(parts, dim=p.partition_dim)
        r = ref_grads[n]
        if g.shape != r.shape:  # padded vocab rows (TP pads to 128 x TP)
            g = g[: r.shape[0]]
        if rel(g, r) > worst:
            worst, res["tp2_grad_worst_param"] = rel(g, r), n
    res["tp2_grad_rel"] = worst

    # ---------------------------------------------------------------- PP=2 (untied embeddings)
    print(f'[{rank}] pp2', flush=True)
    pp_cfg = OmegaConf.merge(mcfg, {"tie_embeddings": False})
    pg = layout(1, 1)
    ref_u = build(pp_cfg, pg=pg).model
    lo = obj.loss(forward_logits(ref_u, xt), x0, aux)
    lo.loss_sum.backward()
    ref_u_loss = float(lo.loss_sum.detach())
    ref_u_grads = {n: p.grad.detach().clone() for n, p in ref_u.named_parameters()}
    ref_u_state = ref_u.state_dict()
    pg = layout(1, 2)
    stage = build(pp_cfg, pp=2, pg=pg).model
    stage.config.calculate_per_token_loss = True
    offset = ps.get_pipeline_model_parallel_rank() * (pp_cfg.num_layers // 2)

    def ref_name(n):
        if n.startswith("decoder.layers."):
            i, rest = n[len("decoder.layers."):].split(".", 1)
            return f"decoder.layers.{int(i) + offset}.{rest}"
        return n

    own = stage.state_dict()
    stage.load_state_dict({k: ref_u_state[ref_name(k)] for k in own if torch.is_tensor(own[k])}, strict=False)
    mbs = [{"x0": x0[:2], "ids": ids[:2]}, {"x0": x0[2:], "ids": ids[2:]}]
    out = get_forward_backward_func()(forward_step_func=fstep, data_iterator=iter(mbs), model=[stage],
                                      num_microbatches=2, seq_length=L, micro_batch_size=2, forward_only=False)
    loss_here = torch.tensor([sum(float(o["lm"][0]) for o in out)], dtype=torch.float64)
    dist.all_reduce(loss_here)  # only the last stage holds it
    res["pp2_loss_rel"] = abs(float(loss_here) - ref_u_loss) / abs(ref_u_loss)
    worst = torch.tensor([max(rel(p.grad, ref_u_grads[ref_name(n)]) for n, p in stage.named_parameters())],
                         dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    res["pp2_grad_rel"] = float(worst)
    res["pp2_num_params_stage"] = sum(1 for _ in stage.parameters())

    # ---------------------------------------------------------------- attention direction
    print(f'[{rank}] attn', flush=True)
    pg = layout(1, 1)
    j = L // 2
    flipped = xt.clone()
    flipped[:, j] = (flipped[:, j] + 1) % (V - 1)
    for name, causal in (("bidirectional", False), ("causal", True)):
        m = build(mcfg, pg=pg, causal=causal).model
        with torch.no_grad():
            d = (forward_logits(m, xt) - forward_logits(m, flipped)).abs().amax(dim=(0, 2))
        res[f"{name}_changed_before"] = int((d[:j] > 1e-6).sum())
        res[f"{name}_changed_from"] = int((d[j:] > 1e-6).sum())
    res["seq_len"] = L
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(res, f, indent=1)
    ps.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1])
