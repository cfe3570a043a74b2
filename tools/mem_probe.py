"""Measure the peak memory and time of real CPU training steps, in a fresh process (one rank or torchrun).

    python tools/mem_probe.py '{"arch": "llama", "num_layers": 2, "hidden_size": 256, "vocab": 32000,
                               "seq": 256, "micro_batch": 2, "recompute": "none", "steps": 2}' OUT.json
    python -m torch.distributed.run --nproc-per-node 2 tools/mem_probe.py '{..., "tp": 2}' OUT.json

The step is megadiff's own: build_model -> megatron DDP + distributed optimizer -> run_forward_backward
(the objective's loss through megatron's schedule) -> optimizer.step, on random tokens.

How peak memory is measured on CPU (there is no allocator statistic like torch.cuda.max_memory_allocated):
glibc's malloc is told to serve every block >= 64 KiB by mmap and to return it on free
(``MALLOC_MMAP_THRESHOLD_=65536`` fixes the threshold, so it does not adapt upwards), so the resident set
follows the live tensors. The kernel's high-water mark ``VmHWM`` is reset (``/proc/self/clear_refs`` = 5)
once the model, DDP buffers and optimizer are built, and read after the steps; reported per rank:

    base_rss  : RSS just before the model is built (interpreter, torch, megatron, process groups)
    static    : RSS after the first step (weights, grad buffer, Adam states) - base_rss
    peak      : VmHWM during the steps - base_rss   (what the memory model forecasts)
    step_s    : mean wall time of the steps after the first

``"loss_path"``: fused (default) | logits, as ``trainer.loss_path``. ``"phases": true`` adds a per-phase
timing of the step (see ``phases``; the fused head's weight gradient reaches the weight only through the
model's backward, so "loss" holds the head's whole cost and "backward" the layers').
With ``"grads": PATH, "variants": [{"recompute": ..., "loss_path": ...}, ...]`` the probe instead builds
the model once per variant (same seed, same batch) and saves this rank's [loss_sum, tokens] and
gradients after one forward-backward (no optimizer step) to PATH.rank<r>, for the equivalence tests.
"""

from __future__ import annotations

import json
import os
import sys
import time

if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":  # must be set before the process starts
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def model_cfg(spec: dict, recompute: str):
    from omegaconf import OmegaConf

    from megadiff.config import ModelConfig

    return OmegaConf.structured(ModelConfig(
        arch=spec.get("arch", "llama"), num_layers=spec["num_layers"], hidden_size=spec["hidden_size"],
        num_attention_heads=spec.get("heads", 4), num_query_groups=spec.get("kv_groups"),
        max_seq_len=spec["seq"], tie_embeddings=spec.get("tie", True), recompute=recompute,
        recompute_num_layers=spec.get("recompute_num_layers")))


def phases(ddp, opt, mb: dict, obj, dcfg, gb: int, loss_path: str, reps: int) -> dict:
    """Mean seconds of each phase of one micro-batch step, timed apart on the same modules (one rank):
    model forward, loss (forward + backward down to the model output), model backward, DDP grad
    finalisation + optimizer step."""
    from megatron.core.distributed import finalize_model_grads

    from megadiff.diffusion.noise import make_noise
    from megadiff.model.build import position_ids_for
    from megadiff.model.loss_head import hidden_states_out
    from megadiff.train.step import fused_loss

    x0 = mb["tokens"]
    noise = make_noise(0, 0, mb["sample_ids"], x0.shape[1], eps=dcfg.eps, antithetic=True, global_batch=gb)
    xt, aux = obj.prepare(x0, noise)
    acc = {"forward": 0.0, "loss": 0.0, "backward": 0.0, "ddp_optimizer": 0.0}
    for _ in range(reps):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        t0 = time.perf_counter()
        if loss_path == "fused":
            with hidden_states_out(ddp) as head:
                out = ddp(xt, position_ids_for(xt), None)
        else:
            out = ddp(xt, position_ids_for(xt), None)
        t1 = time.perf_counter()
        leaf = out.detach().requires_grad_(True)
        lo = fused_loss(obj, leaf, head["weight"], x0, aux) if loss_path == "fused" else obj.loss(leaf, x0, aux)
        lo.loss_sum.backward(inputs=[leaf])
        t2 = time.perf_counter()
        out.backward(leaf.grad)
        t3 = time.perf_counter()
        finalize_model_grads([ddp])
        opt.step()
        t4 = time.perf_counter()
        for k, v in zip(acc, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            acc[k] += v / reps
    return acc


def main(spec: dict, out_path: str) -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from omegaconf import OmegaConf

    from megadiff.config import DiffusionConfig, OptimConfig, ParallelConfig
    from megadiff.diffusion.objectives import make_objective
    from megadiff.diffusion.schedules import make_schedule
    from megadiff.dist.parallel import destroy_parallel, init_parallel
    from megadiff.model.build import build_model
    from megadiff.train.optim import build_optimizer, set_lr, wrap_ddp
    from megadiff.train.step import StepContext, run_forward_backward

    tp, pp = spec.get("tp", 1), spec.get("pp", 1)
    ctx = init_parallel(tp, pp, "cpu", "gloo", seed=1234)
    V, S, mb, n_mb = spec["vocab"], spec["seq"], spec["micro_batch"], spec.get("num_micro", 1)
    dcfg = OmegaConf.structured(DiffusionConfig(objective=spec.get("objective", "mdlm")))
    mask_id = spec.get("mask_id", V - 1)
    obj = make_objective(dcfg, make_schedule(dcfg), mask_id=mask_id, vocab_size=V)
    causal = obj.traits.needs_causal_mask
    gen = torch.Generator().manual_seed(0)
    gb = mb * n_mb * ctx.dp
    batches = [[{"tokens": torch.randint(0, V - 1, (mb, S), generator=gen) + (mask_id == 0),
                 "sample_ids": torch.arange(mb) + i * mb} for i in range(n_mb)] for _ in range(spec.get("steps", 2))]

    def step_ctx(loss_path: str) -> StepContext:
        return StepContext(obj, dcfg, gb, noise_seed=0, loss_path=loss_path)
    import gc

    gc.collect()
    base = rss_bytes()
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads

    def build(recompute: str):
        torch.manual_seed(1234)
        built = build_model(model_cfg(spec, recompute), V, causal=causal, tp=tp, pp=pp, pg_collection=ctx.pg,
                            pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())
        tconf = built.config
        tconf.calculate_per_token_loss = True
        pcfg = OmegaConf.structured(ParallelConfig(tp=tp, pp=pp))
        ddp = wrap_ddp(built.model, tconf, ctx, pcfg)
        opt = build_optimizer(ddp, OmegaConf.structured(OptimConfig()), pcfg, ctx, bf16=False)
        tconf.finalize_model_grads_func = finalize_model_grads
        tconf.grad_scale_func = opt.scale_loss
        return built, ddp, opt

    res = {"rank": ctx.rank, "tp_rank": ctx.tp_rank, "pp_rank": ctx.pp_rank, "base_rss": base}
    if spec.get("grads"):  # one forward-backward per variant, same weights and batch
        saved = []
        for var in spec["variants"]:
            built, ddp, _ = build(var.get("recompute", "none"))
            ddp.zero_grad_buffer()
            out = run_forward_backward(ddp, batches[0], step_ctx(var.get("loss_path", "fused")), 0, ctx,
                                       forward_only=False)
            saved.append({"loss": out, "grads": {n: p.main_grad.detach().clone()
                                                 for n, p in ddp.module.named_parameters()}})
        torch.save(saved, f"{spec['grads']}.rank{ctx.rank}")
    else:
        built, ddp, opt = build(spec.get("recompute", "none"))
        res["params_rank"] = sum(p.numel() for p in built.model.parameters())
        times = []
        for i, mbs in enumerate(batches):
            if i == 1:
                gc.collect()
                res["static"] = rss_bytes() - base
                reset_hwm()
            t0 = time.perf_counter()
            set_lr(opt, 1e-4, 0.0)
            ddp.zero_grad_buffer()
            opt.zero_grad()
            run_forward_backward(ddp, mbs, step_ctx(spec.get("loss_path", "fused")), i, ctx, forward_only=False)
            opt.step()
            times.append(time.perf_counter() - t0)
        res["peak"] = hwm_bytes() - base
        res["step_s"] = sum(times[1:]) / max(1, len(times) - 1)
        if spec.get("phases"):
            res["phases"] = phases(ddp, opt, batches[-1][0], obj, dcfg, gb, spec.get("loss_path", "fused"),
                                   spec.get("phase_reps", 3))
    gathered = [None] * ctx.world
    torch.distributed.all_gather_object(gathered, res)
    if ctx.rank == 0:
        with open(out_path, "w") as f:
            json.dump(gathered, f)
    destroy_parallel()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]), sys.argv[2])
