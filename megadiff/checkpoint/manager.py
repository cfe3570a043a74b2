"""Checkpoints with megatron-core ``dist_checkpointing`` (torch_dist format).

Layout::

    run_dir/checkpoints/step_000100/     one dist checkpoint (model + optimizer, sharded)
                        step_000100/megadiff.json   step, tokens, loader state, RNG, resolved config
    run_dir/checkpoints/latest            text file "step_000100", replaced atomically only after
                                          every rank finished writing the step directory

A save first writes ``step_XXXXXX.tmp`` and renames it to ``step_XXXXXX`` on rank 0 after a
barrier, then moves ``latest``; a crash at any point leaves the previous ``latest`` loadable.
The last file written before the rename is ``contents.json`` (every file and its size,
:mod:`megadiff.checkpoint.contents`), so a checkpoint can be verified without loading it.
The layout (TP/PP/DP) may change between save and load: dist_checkpointing reshards.

Asynchronous save (``trainer.async_save=true``): megatron dist_checkpointing's async path. The
tensors are staged (GPU -> host) and a forked writer process writes the shards while training
goes on; the finalisation (megadiff.json, contents.json, rename, ``latest``) runs on every rank
only after every rank's writer has finished (:meth:`CheckpointManager.poll` checks once per step,
:meth:`CheckpointManager.wait` blocks; the next save and the end of training wait). A kill while the
writer runs leaves ``step_XXXXXX.tmp`` behind and ``latest`` on the previous step.

Failures while saving: a full disk (``ENOSPC``) removes the partial ``.tmp`` directory at once and
raises :class:`DiskFullError` (one line: path, free space, checkpoint size, last good step, the
``trainer.keep_last`` fix; exit code :data:`DISK_FULL_EXIT_CODE`). Resuming checks the checkpoint
first (:meth:`CheckpointManager.resume_step`): a damaged one is named with its missing or unreadable
file and the newest checkpoint that verifies is offered (``trainer.resume=step_XXXXXX``), or taken
with a loud warning under ``trainer.resume=latest_valid``.

Three megatron-core DistributedOptimizer defects on the path without apex/TE (0.16.1) are
worked around here (see :func:`_init_optimizer_state`, :func:`_fix_shared_adam_step`):
1. building a fresh optimizer's sharded state dict asserts ``len(steps) == 1`` because no
   Adam state exists yet — we initialise the state (zeros, step 0) before building it;
2. loading then fails with ``KeyError: 'step'`` for the same reason — fixed by the same init;
3. after loading, Adam's ``step`` is ONE tensor shared by every parameter, so ``torch.optim.Adam``
   advances it once per parameter per step — bias correction then silently drifts. We give each
   parameter its own copy (tested: the step counter after resume equals the step count).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from megadiff import EXIT_DISK_FULL, MegadiffError
from megadiff.checkpoint.contents import (
    STEP_RE,
    RunCheckpoints,
    checkpoint_bytes,
    human_bytes,
    step_dir_name,
    write_contents,
)
from megadiff.utils.io import atomic_write_json, atomic_write_text

RESUME_MODES = ("latest", "latest_valid")  # or a step directory name: step_000280
DISK_FULL_EXIT_CODE = EXIT_DISK_FULL  # 74, sysexits EX_IOERR: the checkpoint could not be written (disk full)


class DiskFullError(MegadiffError):
    """The disk filled up while a checkpoint was written; the partial directory is already removed."""

    exit_code = DISK_FULL_EXIT_CODE


def _related_exceptions(e: BaseException) -> list[BaseException]:
    """``e``, its causes and contexts, and (torch DCP's CheckpointException) the per-rank failures it wraps."""
    out: list[BaseException] = []
    todo: list[Any] = [e]
    while todo:
        x = todo.pop()
        if isinstance(x, tuple):  # DCP failures are (exception, traceback) pairs
            todo += list(x)
        elif isinstance(x, BaseException) and all(x is not y for y in out):
            out.append(x)
            todo += [x.__cause__, x.__context__, *getattr(x, "failures", {}).values()]
    return out


# torch's zip writer reports a short write (the disk filled up) as "[enforce fail ...] unexpected pos N vs M"
DISK_FULL_TEXT = ("No space left on device", "[Errno 28]", "unexpected pos")


def _is_disk_full(e: BaseException) -> bool:
    for x in _related_exceptions(e):
        if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(m in str(x) for m in DISK_FULL_TEXT):
            return True
    return False


def _out_of_space(path: Path, below: int = 1 << 20) -> bool:
    """The filesystem holding ``path`` has (almost) no space left for this user."""
    try:
        return shutil.disk_usage(path).free < below
    except OSError:
        return False


class CheckpointManager(RunCheckpoints):
    def __init__(self, run_dir: str | os.PathLike, keep_last: int = 3, keep_every: int = 0,
                 async_save: bool = False):
        super().__init__(run_dir)
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.async_save = async_save
        self._queue = None  # megatron AsyncCallsQueue, made on the first async save
        self._pending: Optional[int] = None  # step of the async save not finalised yet

    def latest_step(self) -> Optional[int]:
        name = self.latest_name()
        if name is None:
            return None
        if not (self.root / name / "megadiff.json").exists():
            raise MegadiffError(f"checkpoint pointer {self.root / 'latest'} names {name}, but "
                                f"{self.root / name}/megadiff.json is missing: the checkpoint is incomplete; "
                                f"point 'latest' at an older step directory")
        return int(STEP_RE.match(name).group(1))

    def resume_step(self, mode: str = "latest", warn: Callable[[str], None] | None = None) -> Optional[int]:
        """The step to resume from (None: start from scratch) under ``trainer.resume=mode``.

        ``latest``: the step ``latest`` names; if it does not verify, fail naming the damaged file and
        offering the newest checkpoint that verifies. ``latest_valid``: fall back to that one with a
        loud warning. ``step_XXXXXX``: exactly that checkpoint (it must verify)."""
        if mode not in RESUME_MODES and not STEP_RE.match(str(mode)):
            raise MegadiffError(f"config key 'trainer.resume' is {mode!r}; allowed: latest, latest_valid or a step "
                                f"directory name such as step_000280 (see `megadiff checkpoint verify "
                                f"{self.root.parent}`)")
        if STEP_RE.match(str(mode)):
            step = int(STEP_RE.match(mode).group(1))
            problems = self.verify(step)
            if problems:
                raise MegadiffError(f"trainer.resume={mode}: {self._damage(problems)}{self._offer(None)}")
            return step
        name = self.latest_name()
        if name is None:
            return None
        step = int(STEP_RE.match(name).group(1))
        problems = self.verify(step)
        if not problems:
            return step
        good = self.newest_valid(below=step) or self.newest_valid()
        if mode == "latest_valid" and good is not None:
            (warn or _loud_warning)(
                f"checkpoint {self.root / name} is damaged ({self._damage(problems)}); trainer.resume=latest_valid: "
                f"resuming from {step_dir_name(good)}, the newest checkpoint that verifies. Steps after {good} "
                f"are trained again.")
            return good
        raise MegadiffError(f"cannot resume from {self.root / name} ('latest'): {self._damage(problems)}"
                            f"{self._offer(good)}")

    @staticmethod
    def _damage(problems: list[str]) -> str:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        return problems[0] + more

    def _offer(self, good: Optional[int]) -> str:
        good = self.newest_valid() if good is None else good
        if good is None:
            return (f". No checkpoint in {self.root} verifies: delete {self.root / 'latest'} to start from scratch, "
                    f"or restore the missing file")
        return (f". The newest checkpoint that verifies is {step_dir_name(good)}: rerun with "
                f"trainer.resume={step_dir_name(good)} (or trainer.resume=latest_valid to fall back automatically); "
                f"`megadiff checkpoint verify {self.root.parent}` lists every checkpoint")

    # ------------------------------------------------------------------ save
    def save(self, step: int, model, optimizer, extra: dict[str, Any], config_yaml: str) -> Path:
        """Write checkpoint ``step``. Synchronous: returns once ``latest`` names it. Asynchronous: returns
        once the writer is started; ``latest`` moves when :meth:`poll`/:meth:`wait` finalise it."""
        from megatron.core import dist_checkpointing

        self.wait()  # one save in flight at a time: the previous one finishes (and moves latest) first
        final = self.root / step_dir_name(step)
        tmp = self.root / (step_dir_name(step) + ".tmp")
        rank = dist.get_rank()
        try:
            if rank == 0:
                for stale in self.root.glob("step_*.tmp"):  # partial saves of a killed or failed earlier run
                    shutil.rmtree(stale, ignore_errors=True)
                tmp.mkdir(parents=True)
            dist.barrier()
            sd = sharded_state_dict(model, optimizer)
            meta = {**extra, "step": step, "saved_at": time.time()}
            if self.async_save:
                req = dist_checkpointing.save(sd, str(tmp), content_metadata=CKPT_METADATA, async_sharded_save=True)
                req.add_finalize_fn(lambda: self._finalize(step, tmp, final, meta, config_yaml))
                self._async_queue().schedule_async_request(req)
                self._pending = step
                return final
            dist_checkpointing.save(sd, str(tmp), content_metadata=CKPT_METADATA)
            self._finalize(step, tmp, final, meta, config_yaml)
        except BaseException as e:
            self._on_save_error(e, step, tmp)
            raise
        return final

    def _finalize(self, step: int, tmp: Path, final: Path, meta: dict, config_yaml: str) -> None:
        """On every rank once every rank's shards are written: metadata, rename, ``latest``, retention."""
        dist.barrier()
        if dist.get_rank() == 0:
            atomic_write_text(tmp / "config.yaml", config_yaml)
            atomic_write_json(tmp / "megadiff.json", meta)
            write_contents(tmp, step)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            atomic_write_text(self.root / "latest", final.name + "\n")
            self._retain(step)
        dist.barrier()

    def _async_queue(self):
        if self._queue is None:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self._queue = AsyncCallsQueue(persistent=False)
        return self._queue

    def poll(self) -> None:
        """Finalise the async save if every rank's writer has finished (call on every rank, once a step)."""
        self._finish_pending(blocking=False)

    def wait(self) -> None:
        """Block until the async save in flight (if any) is written and ``latest`` names it."""
        self._finish_pending(blocking=True)

    @property
    def pending_step(self) -> Optional[int]:
        return self._pending

    def _finish_pending(self, blocking: bool) -> None:
        if self._pending is None:
            return
        step = self._pending
        try:
            done = self._queue.maybe_finalize_async_calls(blocking=blocking)
        except BaseException as e:
            self._pending = None
            self._on_save_error(e, step, self.root / (step_dir_name(step) + ".tmp"))
            raise
        if done:
            self._pending = None

    def _on_save_error(self, e: BaseException, step: int, tmp: Path) -> None:
        """Remove the partial directory at once; turn a full disk into one line (DiskFullError)."""
        full = _is_disk_full(e) or _out_of_space(self.root)  # torch's writer may hide ENOSPC ("unexpected pos")
        shutil.rmtree(tmp, ignore_errors=True)
        if not full:
            return
        raise DiskFullError(self._disk_full_message(step)) from None

    def _disk_full_message(self, step: int) -> str:
        good = self.latest_name()
        free = shutil.disk_usage(self.root).free if self.root.exists() else None
        size = checkpoint_bytes(self.root / good) if good else None
        last = (f"the last good checkpoint is {good} ('latest' still names it)" if good
                else "no earlier checkpoint exists")
        fix = (f"free space or keep fewer checkpoints (trainer.keep_last={max(1, self.keep_last - 1)}; now "
               f"{self.keep_last}{f', keep_every={self.keep_every}' if self.keep_every else ''}), then rerun the "
               f"same command to resume")
        return (f"disk full while saving checkpoint {step_dir_name(step)} to {self.root}: {human_bytes(free)} free, a "
                f"checkpoint takes {human_bytes(size)}; {last}; the partial {step_dir_name(step)}.tmp was removed. Fix: "
                f"{fix} (exit code {DISK_FULL_EXIT_CODE})")

    def _retain(self, newest: int) -> None:
        steps = self.steps()
        keep = set(steps[-self.keep_last:]) if self.keep_last > 0 else set(steps)
        if self.keep_every > 0:
            keep |= {s for s in steps if s % self.keep_every == 0}
        keep.add(newest)
        for s in steps:
            if s not in keep:
                shutil.rmtree(self.root / step_dir_name(s), ignore_errors=True)

    # ------------------------------------------------------------------ load
    def load(self, step: int, model, optimizer) -> dict[str, Any]:
        from megatron.core import dist_checkpointing

        d = self.root / step_dir_name(step)
        meta = d / "megadiff.json"
        if not meta.exists():
            raise MegadiffError(f"checkpoint {d} is missing megadiff.json; it is incomplete or not a megadiff "
                                f"checkpoint. Point {self.root / 'latest'} at a complete step directory")
        extra = json.loads(meta.read_text())
        try:
            if optimizer is not None:
                _init_optimizer_state(optimizer)
            sd = sharded_state_dict(model, optimizer, is_loading=True)
            state = dist_checkpointing.load(sd, str(d))
            model.load_state_dict(state["model"], strict=False)
            if optimizer is not None:
                _patch_state_setter(optimizer)
                optimizer.load_state_dict(state["optimizer"])
                _fix_shared_adam_step(optimizer)
        except MegadiffError:
            raise
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # torch DCP's CheckpointException is a BaseException; corrupt/missing shards
            other = self.newest_valid(below=step)
            raise MegadiffError(f"could not load checkpoint {d}: {type(e).__name__}: {str(e)[:500]}. The "
                                f"checkpoint is corrupt, incomplete or from a different model shape; fix the model "
                                f"config{self._offer(other) if other is not None else ''}") from e
        return extra


def _loud_warning(msg: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        bar = "!" * 100
        print(f"{bar}\nWARNING: {msg}\n{bar}", file=sys.stderr, flush=True)


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


# 'fully_reshardable': optimizer state saved in the canonical per-parameter layout, so a checkpoint
# loads under any TP/PP/DP layout (the default flattened format cannot be built in 0.16.1).
CKPT_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "singleton_local_shards": False}


def sharded_state_dict(model, optimizer=None, is_loading: bool = False) -> dict[str, Any]:
    model_sd = _unwrap(model).sharded_state_dict(prefix="", metadata=CKPT_METADATA)
    sd: dict[str, Any] = {"model": model_sd}
    if optimizer is not None:
        sd["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=CKPT_METADATA)
    return sd


def _inner_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    subs = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return [s.optimizer for s in subs]


def _init_optimizer_state(optimizer) -> None:
    """Defects 1 and 2: give every parameter an Adam state (zeros, step 0) before building a
    sharded state dict for loading (megatron expects exactly one shared step value)."""
    for inner in _inner_optimizers(optimizer):
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state[p]
                if "step" not in st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _patch_state_setter(optimizer) -> None:
    """Defect 2: the fully-reshardable load copies every key of the live Adam state (incl. 'step',
    which the checkpoint keeps in the param groups, not per tensor) -> KeyError. Copy the keys the
    checkpoint has; 'step' is restored from the param groups by load_state_dict itself."""
    import types

    subs = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    for sub in subs:
        if not hasattr(sub, "_set_main_param_and_optimizer_states") or \
                sub.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            continue

        def setter(self, model_param, tensors):
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            dst = {"param": main_param, **self.optimizer.state[main_param]}
            for key, src in tensors.items():
                if key in dst and key != "step":
                    dst[key].copy_(src)

        sub._set_main_param_and_optimizer_states = types.MethodType(setter, sub)


def _fix_shared_adam_step(optimizer) -> None:
    """Defect 3: after load every state shares ONE step tensor; give each parameter its own."""
    for inner in _inner_optimizers(optimizer):
        for st in inner.state.values():
            if "step" in st and torch.is_tensor(st["step"]):
                st["step"] = st["step"].detach().clone()


def adam_steps(optimizer) -> set[float]:
    """Distinct Adam step counters (for the resume test: one value, equal to the step count)."""
    out: set[float] = set()
    for inner in _inner_optimizers(optimizer):
        for st in inner.state.values():
            if "step" in st:
                out.add(float(st["step"]))
    return out
