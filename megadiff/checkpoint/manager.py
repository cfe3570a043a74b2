"""Checkpoints with megatron-core ``dist_checkpointing`` (torch_dist format).

Layout::

    run_dir/checkpoints/step_000100/     one dist checkpoint (model + optimizer, sharded)
                        step_000100/megadiff.json   step, tokens, loader state, RNG, resolved config
    run_dir/checkpoints/latest            text file "step_000100", replaced atomically only after
                                          every rank finished writing the step directory

A save first writes ``step_XXXXXX.tmp`` and renames it to ``step_XXXXXX`` on rank 0 after a
barrier, then moves ``latest``; a crash at any point leaves the previous ``latest`` loadable.
The layout (TP/PP/DP) may change between save and load: dist_checkpointing reshards.

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

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from megadiff import MegadiffError
from megadiff.utils.io import atomic_write_json, atomic_write_text

STEP_RE = re.compile(r"^step_(\d{6,})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


class CheckpointManager:
    def __init__(self, run_dir: str | os.PathLike, keep_last: int = 3, keep_every: int = 0):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.keep_every = keep_every

    # ------------------------------------------------------------------ discovery
    def latest_step(self) -> Optional[int]:
        p = self.root / "latest"
        if not p.exists():
            return None
        name = p.read_text().strip()
        m = STEP_RE.match(name)
        if not m:
            raise MegadiffError(f"checkpoint pointer {p} is corrupt (holds {name!r}); delete it to restart from "
                                f"scratch or write the name of a good step directory into it")
        if not (self.root / name / "megadiff.json").exists():
            raise MegadiffError(f"checkpoint pointer {p} names {name}, but {self.root / name}/megadiff.json is "
                                f"missing: the checkpoint is incomplete; point 'latest' at an older step directory")
        return int(m.group(1))

    def steps(self) -> list[int]:
        if not self.root.exists():
            return []
        return sorted(int(m.group(1)) for d in self.root.iterdir() if (m := STEP_RE.match(d.name)) and d.is_dir())

    # ------------------------------------------------------------------ save
    def save(self, step: int, model, optimizer, extra: dict[str, Any], config_yaml: str) -> Path:
        from megatron.core import dist_checkpointing

        final = self.root / step_dir_name(step)
        tmp = self.root / (step_dir_name(step) + ".tmp")
        rank = dist.get_rank()
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        sd = sharded_state_dict(model, optimizer)
        dist_checkpointing.save(sd, str(tmp), content_metadata=CKPT_METADATA)
        dist.barrier()
        if rank == 0:
            atomic_write_text(tmp / "config.yaml", config_yaml)
            atomic_write_json(tmp / "megadiff.json", {**extra, "step": step, "saved_at": time.time()})
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            atomic_write_text(self.root / "latest", final.name + "\n")
            self._retain(step)
        dist.barrier()
        return final

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
            raise MegadiffError(f"could not load checkpoint {d}: {type(e).__name__}: {str(e)[:500]}. The "
                                f"checkpoint is corrupt, incomplete or from a different model shape; point "
                                f"{self.root / 'latest'} at an older step directory or fix the model config") from e
        return extra


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
