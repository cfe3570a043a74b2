"""Trainer callbacks: the side concerns of training, each in its own small class.

Hooks: ``on_fit_start(trainer)``, ``on_step_end(trainer, stats)``, ``on_eval(trainer, step, metrics)``,
``on_train_end(trainer, reason)`` (after the final save), ``on_fit_end(trainer, reason)`` (always, last).
``stats`` is a dict with at least step, loss, nelbo, grad_norm, lr, tokens_per_s, tflops, mfu,
data_wait_s, mem_gib, skipped, skipped_steps. Callbacks run on every rank, in list order; those that
write check the rank. A callback that stops the run asks ``trainer.preemption.request(reason)``.
"""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megadiff import MegadiffError


class Callback:
    def on_fit_start(self, trainer) -> None: ...

    def on_step_end(self, trainer, stats: dict[str, Any]) -> None: ...

    def on_eval(self, trainer, step: int, metrics: dict[str, float]) -> None: ...

    def on_train_end(self, trainer, reason: str) -> None: ...

    def on_fit_end(self, trainer, reason: str) -> None: ...


class MetricsFile(Callback):
    """Rank-0 ``metrics.jsonl``: one JSON line per step (and per eval), truncated on resume."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "metrics.jsonl"

    def on_fit_start(self, trainer) -> None:
        if not trainer.ctx.is_logging_rank or not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a kill
            if rec.get("step", 0) <= trainer.step:
                keep.append(line)
        from megadiff.utils.io import atomic_write_text

        atomic_write_text(self.path, "".join(k + "\n" for k in keep))

    def _append(self, rec: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def on_step_end(self, trainer, stats):
        if trainer.ctx.is_logging_rank:
            self._append({k: v for k, v in stats.items() if not isinstance(v, torch.Tensor)})

    def on_eval(self, trainer, step, metrics):
        if trainer.ctx.is_logging_rank:
            self._append({"step": step, **{f"val/{k}": v for k, v in metrics.items()}})


class ProgressBar(Callback):
    """A tqdm bar on the logging rank with loss, tokens/s and MFU; a log line every log_interval."""

    def __init__(self, enabled: bool, log_interval: int):
        self.enabled = enabled
        self.log_interval = max(1, log_interval)
        self.bar = None

    def on_fit_start(self, trainer):
        if self.enabled and trainer.ctx.is_logging_rank:
            from tqdm import tqdm

            self.bar = tqdm(total=trainer.max_steps, initial=trainer.step, desc="train", unit="step",
                            dynamic_ncols=True, mininterval=1.0)

    def on_step_end(self, trainer, stats):
        if not trainer.ctx.is_logging_rank:
            return
        if self.bar is not None:
            self.bar.update(1)
            util = {"mfu": f"{stats['mfu']:.1%}"} if trainer.peak_tflops > 0 else {"tflops": f"{stats['tflops']:.2f}"}
            self.bar.set_postfix(loss=f"{stats['loss']:.4f}", tok_s=f"{stats['tokens_per_s']:.0f}", **util,
                                 refresh=False)
        if stats["step"] % self.log_interval == 0 or stats["step"] == trainer.max_steps:
            # MFU only where the device's peak is known (trainer.peak_tflops or a known GPU), never "0.0%"
            mfu = f" | mfu {stats['mfu']:.1%}" if trainer.peak_tflops > 0 else ""
            msg = (f"step {stats['step']:>6} | loss {stats['loss']:.4f} | nelbo {stats['nelbo']:.4f} | "
                   f"grad {stats['grad_norm']:.3f} | lr {stats['lr']:.2e} | {stats['tokens_per_s']:.0f} tok/s | "
                   f"{stats['tflops']:.2f} TFLOP/s{mfu} | data {stats['data_wait_s'] * 1e3:.1f} ms | "
                   f"mem {stats['mem_gib']:.2f} GiB")
            (self.bar.write if self.bar is not None else print)(msg)

    def on_eval(self, trainer, step, metrics):
        if trainer.ctx.is_logging_rank:
            tr = trainer.objective.traits
            ppl = "ppl bound" if tr.val_is_bound else "ppl"
            msg = (f"eval  step {step:>6} | val {tr.val_metric} {metrics['nelbo']:.4f} nats/token | "
                   f"{ppl} {metrics['ppl_bound']:.2f}")
            (self.bar.write if self.bar is not None else print)(msg)

    def on_fit_end(self, trainer, reason):
        if self.bar is not None:
            self.bar.close()


class NaNGuard(Callback):
    """Aborts after K non-finite steps in a row (the trainer skips their update and counts them)."""

    def __init__(self, max_consecutive: int):
        self.max_consecutive = max_consecutive
        self.consecutive = 0

    def on_step_end(self, trainer, stats):
        if stats["skipped"]:
            self.consecutive += 1
            if self.consecutive >= self.max_consecutive:
                raise MegadiffError(
                    f"training diverged: {self.consecutive} consecutive steps had a non-finite loss "
                    f"(last at step {stats['step']}, {stats['skipped_steps']} skipped in all). Lower optim.lr, raise "
                    f"optim.warmup_steps, or resume from an earlier checkpoint in {trainer.ckpt.root}"
                )
        else:
            self.consecutive = 0


_EARLY_SIGNAL: list[str] = []


def install_early_signal_handlers() -> None:
    """Catch SIGTERM/SIGUSR1 from process start (before the model is built); the Preemption
    callback takes the flag over. Without this a signal during start-up kills the rank."""

    def early(signum, _frame):
        _EARLY_SIGNAL.append(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, early)


class Preemption(Callback):
    """SIGTERM / SIGUSR1 or the wall-clock budget → finish the step, save, exit 75 (requeue)."""

    def __init__(self, max_wall_minutes: float):
        self.requested = False
        self.reason = ""
        self.deadline = time.time() + max_wall_minutes * 60 if max_wall_minutes > 0 else math.inf
        self._old: dict[int, Any] = {}

    def _handler(self, signum, _frame):
        self.request(signal.Signals(signum).name)

    def request(self, reason: str) -> None:
        """Stop after this step: save, exit with EXIT_REQUEUE (the first reason is kept)."""
        if not self.requested:
            self.requested, self.reason = True, reason

    def on_fit_start(self, trainer):
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._old[sig] = signal.signal(sig, self._handler)
        if _EARLY_SIGNAL:
            self.requested, self.reason = True, _EARLY_SIGNAL[0]

    def local_flag(self) -> bool:
        if time.time() >= self.deadline and not self.requested:
            self.requested, self.reason = True, "time budget (trainer.max_wall_minutes)"
        return self.requested

    def on_fit_end(self, trainer, reason):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Checkpointing(Callback):
    """A save every ``interval`` steps (the final save is the trainer's)."""

    def __init__(self, interval: int):
        self.interval = interval

    def on_step_end(self, trainer, stats):
        if self.interval > 0 and stats["step"] % self.interval == 0 and stats["step"] < trainer.max_steps:
            trainer.save()


class EvalCadence(Callback):
    """Validation every ``interval`` steps and at the last step (0: never); results go to every callback."""

    def __init__(self, interval: int):
        self.interval = interval

    def on_step_end(self, trainer, stats):
        step = stats["step"]
        if self.interval > 0 and trainer.valid and (step % self.interval == 0 or step == trainer.max_steps):
            trainer.evaluate_and_log()


class ChunkedStop(Callback):
    """Chunked jobs: stop (save, exit 75 = requeue) when this invocation *reaches* ``stop_after`` from below,
    or after ``steps_per_invocation`` steps of this invocation. Re-running the same command resumes and
    goes on: a run already at or past ``stop_after`` is not stopped by it again."""

    def __init__(self, stop_after: int = 0, steps_per_invocation: int = 0):
        self.stop_after, self.per_invocation = stop_after, steps_per_invocation
        self.start = 0

    def on_fit_start(self, trainer):
        self.start = trainer.step

    def on_step_end(self, trainer, stats):
        step = stats["step"]
        if step >= trainer.max_steps:
            return
        if 0 < self.stop_after == step and self.start < self.stop_after:
            trainer.preemption.request(f"trainer.stop_after={step}")
        elif self.per_invocation > 0 and step - self.start >= self.per_invocation:
            trainer.preemption.request(f"trainer.steps_per_invocation={self.per_invocation}")


def memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**30
    except Exception:
        return 0.0


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
