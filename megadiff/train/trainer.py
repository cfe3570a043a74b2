"""The trainer: set-up, a short ``fit()`` loop, and callbacks for everything else.

    trainer = Trainer(cfg, callbacks)   # parallel groups, data, model, DDP, optimizer, objective, resume
    reason = trainer.fit()              # "done" | "preempted" (exit code 75 asked of the launcher)

The caller chooses the callbacks (``megadiff train`` builds them in ``train/cli.py``: metrics file,
progress, NaN guard, checkpoint and eval cadence, chunked-job stops, MLflow, end-of-run samples); the
trainer itself owns only what its loop cannot do without: the preemption flag, which every rank must
agree on within the step's one collective.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from megadiff import EXIT_REQUEUE, MegadiffError
from megadiff.checkpoint.manager import CheckpointManager, step_dir_name
from megadiff.config import check_batch_layout, default_dataset_refs, is_causal, to_yaml
from megadiff.train import callbacks as cb
from megadiff.train.lr import lr_at
from megadiff.train.step import StepContext, global_sum, run_forward_backward, step_length, to_device


class Trainer:
    def __init__(self, cfg: Any, callbacks: list[cb.Callback] | None = None):
        from megadiff.data.loader import GlobalBatchLoader, ShardDataset, check_compat, limit_unique_tokens
        from megadiff.diffusion.curricula import block_curriculum
        from megadiff.diffusion.objectives import make_objective
        from megadiff.diffusion.schedules import make_schedule
        from megadiff.dist.parallel import init_parallel
        from megadiff.model.build import build_model
        from megadiff.model.flops import flops_per_token, peak_tflops_for
        from megadiff.train.optim import build_optimizer, wrap_ddp

        self.cfg = cfg
        tc, pc = cfg.trainer, cfg.parallel
        default_dataset_refs(cfg)
        self.ctx = ctx = init_parallel(pc.tp, pc.pp, tc.device, pc.backend, seed=tc.seed)
        self.accum = check_batch_layout(cfg, ctx.dp)
        self.run_dir = Path(tc.run_dir)
        if ctx.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        cb.barrier()

        # data
        ds = [ShardDataset(r.path, r.split, skip_corrupt=cfg.data.skip_corrupt) for r in cfg.data.train]
        ds = limit_unique_tokens(ds, cfg.data.unique_tokens, cfg.data.shuffle_seed)  # data-constrained runs
        self.info = ds[0].info
        self.seq_len = self.info.seq_len
        self.loader = GlobalBatchLoader(ds, [r.weight for r in cfg.data.train], tc.global_batch, tc.micro_batch,
                                        ctx.dp_rank, ctx.dp, seed=cfg.data.shuffle_seed)
        self.valid = [ShardDataset(r.path, r.split) for r in cfg.data.valid if _has_split(r)]
        for v in self.valid:
            check_compat(v.info, vocab_size=self.info.vocab_size, mask_id=self.info.mask_id,
                         tokenizer_sha256=self.info.tokenizer_sha256)
        if cfg.model.vocab_size is not None and cfg.model.vocab_size != self.info.vocab_size:
            raise MegadiffError(
                f"model.vocab_size={cfg.model.vocab_size} but the data in {cfg.data.train[0].path} was tokenized with "
                f"a vocab of {self.info.vocab_size}; set model.vocab_size={self.info.vocab_size} (or leave it unset)"
            )
        if self.seq_len > cfg.model.max_seq_len:
            raise MegadiffError(f"data seq_len {self.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}; "
                                f"raise model.max_seq_len")

        # model
        self.bf16 = tc.precision == "bf16" or (tc.precision == "auto" and ctx.device.type == "cuda")
        dtype = torch.bfloat16 if self.bf16 else torch.float32
        causal = is_causal(cfg)
        from megatron.core import parallel_state as ps

        # the vocab is padded for this TP; a checkpoint saved at another TP (other padding) still loads:
        # megatron marks the embedding/output shards allow_shape_mismatch (rows beyond the vocab are unused)
        built = build_model(cfg.model, self.info.vocab_size, causal=causal, tp=pc.tp, pp=pc.pp, pg_collection=ctx.pg,
                            pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
                            device=ctx.device.type, dtype=dtype, sequence_parallel=pc.sequence_parallel,
                            masked=bool(cfg.data.document_mask or cfg.diffusion.block_size
                                        or cfg.diffusion.anneal_steps))
        self.built = built
        if ctx.rank == 0:
            from megadiff.model.build import describe_fusions

            print(describe_fusions(built.fusions), flush=True)
        tconf = built.config
        tconf.calculate_per_token_loss = True
        self.model = wrap_ddp(built.model, tconf, ctx, pc)
        self.optimizer = build_optimizer(self.model, cfg.optim, pc, ctx, self.bf16)
        from megatron.core.distributed import finalize_model_grads

        tconf.finalize_model_grads_func = finalize_model_grads
        tconf.grad_scale_func = self.optimizer.scale_loss

        # objective
        self.schedule = make_schedule(cfg.diffusion)
        self.objective = make_objective(cfg.diffusion, self.schedule, self.info.mask_id, self.info.vocab_size)
        self.sc = StepContext(self.objective, cfg.diffusion, tc.global_batch, noise_seed=cfg.diffusion.seed,
                              document_mask=cfg.data.document_mask, reset_position_ids=cfg.model.reset_position_ids,
                              loss_path=tc.loss_path, anneal_steps=cfg.diffusion.anneal_steps,
                              block_curriculum=block_curriculum(cfg.diffusion, tc.max_steps, self.seq_len))

        # accounting
        self.flops_tok = flops_per_token(built.shape, built.padded_vocab_size, self.seq_len, causal=causal)
        if self.objective.traits.block_diffusion:  # the model reads [x_t ‖ x_0]: 2 positions per data token
            self.flops_tok = 2 * flops_per_token(built.shape, built.padded_vocab_size, 2 * self.seq_len, causal=causal)
        self.flops_tok *= self.objective.rows_per_sample  # stacked rows (complementary masks, AR + diffusion)
        peak = tc.peak_tflops or (peak_tflops_for(torch.cuda.get_device_name()) if ctx.device.type == "cuda" else 0)
        self.peak_tflops = float(peak or 0.0)
        self.max_steps = tc.max_steps
        self.step = 0
        self.tokens_seen = 0
        self.skipped_steps = 0  # non-finite steps whose update was skipped
        self.ckpt = CheckpointManager(self.run_dir, tc.keep_last, tc.keep_every, async_save=tc.async_save)
        self.preemption = cb.Preemption(tc.max_wall_minutes)
        self.callbacks: list[cb.Callback] = [self.preemption, *(callbacks or [])]
        self.resume()

    # ---------------------------------------------------------------- checkpoints
    def resume(self) -> None:
        step = self.ckpt.resume_step(self.cfg.trainer.resume)
        if step is None:
            return
        extra = self.ckpt.load(step, self.model, self.optimizer)
        self.step = int(extra["step"])
        self.tokens_seen = int(extra.get("tokens", 0))
        self.loader.load_state_dict(extra["loader"])
        if "torch_rng" in extra:
            torch.manual_seed(int(extra["torch_rng"]))
        if self.ctx.rank == 0:
            print(f"resumed from {self.ckpt.root / step_dir_name(step)} (step {self.step}, layout "
                  f"{extra.get('layout')} -> {self.ctx.layout})", flush=True)

    def save(self) -> Path:
        extra = {"tokens": self.tokens_seen, "loader": self.loader.state_dict(), "layout": self.ctx.layout,
                 "torch_rng": int(self.cfg.trainer.seed + self.step), "objective": self.cfg.diffusion.objective,
                 "padded_vocab_size": self.built.padded_vocab_size, "vocab_size": self.info.vocab_size,
                 "tokenizer_sha256": self.info.tokenizer_sha256}
        return self.ckpt.save(self.step, self.model, self.optimizer, extra, to_yaml(self.cfg))

    # ---------------------------------------------------------------- loop
    def train_step(self) -> dict[str, Any]:
        from megadiff.train.optim import set_lr

        t0 = time.perf_counter()
        mbs = self.loader.next_global()
        length = step_length(self.sc, self.step, self.seq_len)
        mbs = to_device(mbs, self.ctx.device, length)
        t_data = time.perf_counter() - t0
        lr = lr_at(self.step, self.cfg.optim, self.max_steps)
        set_lr(self.optimizer, lr, self.cfg.optim.weight_decay)
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        local = run_forward_backward(self.model, mbs, self.sc, self.step, self.ctx, forward_only=False)
        flag = torch.tensor([1.0 if self.preemption.local_flag() else 0.0], dtype=torch.float64,
                            device=self.ctx.device)
        stats = global_sum(torch.cat([local, flag]), self.ctx)  # one collective: loss, tokens, stop
        loss_sum, tokens, stop = stats.tolist()
        loss = loss_sum / max(tokens, 1.0)
        skipped = not math.isfinite(loss)
        self.skipped_steps += skipped
        grad_norm = float("nan")
        if not skipped:
            _, grad_norm, _ = self.optimizer.step()
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        if self.ctx.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        self.step += 1
        n_tok = self.cfg.trainer.global_batch * length
        self.tokens_seen += n_tok
        from megadiff.model.flops import mfu

        tps = n_tok / dt
        if stop > 0:
            self.preemption.requested = True
        return {
            "step": self.step, "loss": loss,
            "nelbo": loss if self.objective.traits.train_loss_is_val_metric else float("nan"),
            "grad_norm": grad_norm, "lr": lr, "tokens": self.tokens_seen, "tokens_per_s": tps,
            "tflops": tps * self.flops_tok / 1e12 / self.ctx.world, "mfu": mfu(tps / self.ctx.world, self.flops_tok,
                                                                               self.peak_tflops),
            "data_wait_s": t_data, "mem_gib": cb.memory_gib(self.ctx.device), "skipped": skipped,
            "skipped_steps": self.skipped_steps, "step_s": dt,
        }

    def fit(self) -> str:
        for c in self.callbacks:
            c.on_fit_start(self)
        reason = "done"
        try:
            while self.step < self.max_steps:
                stats = self.train_step()
                for c in self.callbacks:
                    c.on_step_end(self, stats)
                self.ckpt.poll()  # an async save in flight: finalised (latest moved) once every rank wrote it
                if self.preemption.requested:
                    reason = "preempted"
                    break
            self.save()
            self.ckpt.wait()
            for c in self.callbacks:
                c.on_train_end(self, reason)
        finally:
            for c in self.callbacks:
                c.on_fit_end(self, reason)
        if reason == "preempted" and self.ctx.rank == 0:
            print(f"preempted ({self.preemption.reason}) at step {self.step}: checkpoint saved, exiting with "
                  f"{EXIT_REQUEUE} (requeue)", flush=True)
        return reason

    # ---------------------------------------------------------------- eval
    @torch.no_grad()
    def evaluate(self, n_batches: int | None = None, n_t: int | None = None) -> dict[str, float]:
        """The validation metric (``objective.traits.val_metric``, nats/token) on the validation split:
        ``n_batches`` global batches (the first rows of the split in a fixed seeded order) x ``n_t``
        antithetic time points, identical for every call and every TP/PP/DP layout, so evals are
        comparable; distributed through megatron's forward-only schedule. Diffusion objectives report the
        NELBO of the run's schedule (whatever their training weighting) with t cut where the mask
        probability is diffusion.eps; ``ar`` reports the exact NLL (n_t = 1). Returned under "nelbo"."""
        from megadiff.data.loader import GlobalBatchLoader

        tc = self.cfg.trainer
        n_batches = n_batches or tc.eval_batches
        n_t = n_t or (1 if self.objective.traits.is_autoregressive else tc.eval_n_t)
        gb = tc.global_batch  # layout-invariant: the same validation rows and noise for any TP/PP/DP
        loader = GlobalBatchLoader(self.valid, None, gb, tc.micro_batch, self.ctx.dp_rank, self.ctx.dp, seed=0)
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.ctx.device)
        sc = StepContext(self.objective.for_validation(), self.cfg.diffusion, gb,
                         noise_seed=10_000 + self.cfg.diffusion.seed,
                         t_min=self.schedule.t_at_mask_prob(self.cfg.diffusion.eps),
                         document_mask=self.sc.document_mask, reset_position_ids=self.sc.reset_position_ids,
                         loss_path=tc.loss_path)
        for _ in range(n_batches):
            mbs = to_device(loader.next_global(), self.ctx.device)
            for k in range(n_t):
                total += run_forward_backward(self.model, mbs, sc, k, self.ctx, forward_only=True)
        self.model.train()
        s = global_sum(total, self.ctx)
        nelbo = float(s[0] / s[1].clamp(min=1))
        return {"nelbo": nelbo, "ppl_bound": math.exp(min(nelbo, 700)), "tokens": float(s[1]) / n_t}

    def evaluate_and_log(self) -> dict[str, float]:
        metrics = self.evaluate()
        for c in self.callbacks:
            c.on_eval(self, self.step, metrics)
        return metrics


def _has_split(ref) -> bool:
    from megadiff.data.format import read_manifest

    try:
        split = read_manifest(Path(ref.path))["splits"].get(ref.split)
    except MegadiffError:
        return False
    if not split or not split.get("samples", 0):
        print(f"warning: validation split {ref.split!r} of {ref.path} is missing or empty; no eval on it", flush=True)
        return False
    return True


def run_training(cfg: Any, callbacks: list[cb.Callback] | None = None) -> int:
    """Train with these callbacks; returns the process exit code (0 done, 75 preempted)."""
    from megadiff.checkpoint.rundir import remove_if_setup_fails
    from megadiff.dist.parallel import destroy_parallel
    from megadiff.utils.runlock import hold_run_dir

    # a run dir this launch created is removed if set-up fails (after the lock inside it is released)
    with remove_if_setup_fails(cfg.trainer.run_dir) as setup:
        with hold_run_dir(cfg.trainer.run_dir):  # one writer per run dir (rank 0 holds it)
            trainer = Trainer(cfg, callbacks)
            setup.done()
            reason = trainer.fit()
            cb.barrier()
            destroy_parallel()
    return EXIT_REQUEUE if reason == "preempted" else 0


__all__ = ["Trainer", "run_training"]
