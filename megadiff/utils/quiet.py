"""Known-harmless warnings of our dependencies, filtered where they are raised.

A training launch used to print ~20 warnings per process (40 for the 2-process demo) that a user
cannot act on. Each entry below names the module that raises it, the message, and why it is
harmless; nothing else is filtered. ``megadiff --verbose COMMAND`` (or ``MEGADIFF_VERBOSE=1``,
which child processes inherit) shows them all again. Messages a user can act on stay visible:
the "Transformer Engine / Apex are not installed" notices are filtered only on machines without an
NVIDIA GPU (on a GPU node they mean slower kernels: run ``make setup-gpu``; ``megadiff doctor``
reports the same).
"""

from __future__ import annotations

import glob
import logging
import os
import re
import warnings
from dataclasses import dataclass

VERBOSE_ENV = "MEGADIFF_VERBOSE"


@dataclass(frozen=True)
class Known:
    module: str  # regex on the module that raises it (warnings) or the logger name (log records)
    message: str  # regex matched at the start of the message
    why: str  # why it is harmless for megadiff
    category: type[Warning] = Warning
    cpu_only: bool = False  # filtered only where no NVIDIA GPU is visible


KNOWN_WARNINGS: tuple[Known, ...] = (
    Known(r"megatron\.", r"(Transformer Engine and Apex are|Apex is) not installed",
          "CPU: the torch fallbacks are the intended kernels (on GPU: install them, `make setup-gpu`)",
          UserWarning, cpu_only=True),
    Known(r"megatron\.core\.transformer\.transformer_config", r"full scope is deprecated",
          "megatron-core's own default cuda_graph_scope='full'; CUDA graphs are not used", UserWarning),
    Known(r"megatron\.core\.optimizer\.optimizer", r"The \.grad attribute of a Tensor that is not a leaf",
          "megatron probes param.main_grad/grad with hasattr on every parameter; it reads the leaf's grad",
          UserWarning),
    Known(r"torch\.distributed\.c10d_logger",
          r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor|_all_gather_base|_reduce_scatter_base)`"
          r" is deprecated", "called by megatron-core 0.16 (DDP buffers, distributed optimizer); same collective",
          FutureWarning),
    Known(r"megatron\.core\.dist_checkpointing\.strategies\.torch", r"`load_state_dict` is deprecated",
          "megatron-core 0.16 loads checkpoints through torch DCP's older entry point; same load", FutureWarning),
    Known(r"torch\.distributed\.checkpoint\.", r"Please use DTensor instead and we are deprecating ShardedTensor",
          "megatron-core 0.16's dist_checkpointing describes shards as ShardedTensor; nothing to change here",
          FutureWarning),
)

KNOWN_LOG_RECORDS: tuple[Known, ...] = (
    Known(r"ray\._private\.authentication\.authentication_token_setup", r"Token authentication is enabled",
          "Ray 2.5x notice for the local, single-user cluster the data pipeline starts on this machine"),
    Known(r"mlflow\.store\.db\.utils", r"(Creating initial MLflow database tables|Updating database tables)",
          "MLflow creating the run directory's sqlite store on first use"),
)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def _gpu_visible() -> bool:
    return bool(glob.glob("/dev/nvidia[0-9]*")) and os.environ.get("CUDA_VISIBLE_DEVICES", "x") not in ("", "-1")


class _DropKnown(logging.Filter):
    def __init__(self, known: Known):
        super().__init__()
        self.pattern = re.compile(known.message)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def install(force_verbose: bool = False) -> int:
    """Filter the known-harmless warnings (unless verbose); returns how many filters were installed."""
    if force_verbose:
        os.environ[VERBOSE_ENV] = "1"
    if verbose():
        return 0
    gpu = _gpu_visible()
    n = 0
    for k in KNOWN_WARNINGS:
        if k.cpu_only and gpu:
            continue
        warnings.filterwarnings("ignore", message=k.message, category=k.category, module=k.module)
        n += 1
    for k in KNOWN_LOG_RECORDS:  # a logger-level filter: only records created on that logger are dropped
        logging.getLogger(k.module.replace("\\", "")).addFilter(_DropKnown(k))
        n += 1
    return n
