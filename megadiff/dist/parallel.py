"""Process groups are made here, in one place, and passed to everything else.

``init_parallel`` starts torch.distributed (from torchrun's environment, or a one-process group),
applies the CPU shim when there is no GPU, builds megatron's TP/PP/DP groups and returns a
``ParallelContext`` holding the ``ProcessGroupCollection`` the model, optimizer and trainer use.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megadiff import MegadiffError


@dataclass
class ParallelContext:
    rank: int
    world: int
    local_rank: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    device: torch.device
    pg: Any  # megatron ProcessGroupCollection

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_logging_rank(self) -> bool:
        """The rank that logs: the last pipeline stage's first TP/DP rank (it sees the loss)."""
        return self.tp_rank == 0 and self.dp_rank == 0 and self.is_last_stage

    @property
    def layout(self) -> str:
        return f"tp{self.tp}-pp{self.pp}-dp{self.dp}"


def pick_device(pref: str) -> torch.device:
    if pref == "cuda" and not torch.cuda.is_available():
        raise MegadiffError("trainer.device=cuda but no CUDA device is visible; use trainer.device=auto or cpu")
    if pref == "cpu" or not torch.cuda.is_available():
        vis = os.environ.get("CUDA_VISIBLE_DEVICES")
        if pref == "auto" and vis not in (None, "", "-1") and os.environ.get("RANK", "0") == "0":
            print(f"CUDA_VISIBLE_DEVICES={vis} but CUDA is not usable here (torch {torch.__version__}, "
                  f"cuda available: False): training falls back to CPU with gloo", flush=True)
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def init_parallel(tp: int = 1, pp: int = 1, device: str = "auto", backend: str = "auto",
                  seed: int = 1234) -> ParallelContext:
    dev = pick_device(device)
    if dev.type == "cpu":
        from megadiff.dist import cpu_shim

        cpu_shim.install()
    else:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        be = ("nccl" if dev.type == "cuda" else "gloo") if backend == "auto" else backend
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            try:
                dist.init_process_group(be)
            except dist.DistNetworkError as e:
                raise MegadiffError(
                    f"rendezvous at MASTER_ADDR={os.environ.get('MASTER_ADDR')} "
                    f"MASTER_PORT={os.environ.get('MASTER_PORT')} failed ({str(e).splitlines()[-1]}); "
                    "pick a free port (--master-port) or unset RANK/WORLD_SIZE/MASTER_* left over from another job"
                ) from None
        else:
            # one process: an in-memory store, no TCP port and no MASTER_* environment to leak into
            # child processes (a stale MASTER_PORT made sweep children fail with "address in use")
            dist.init_process_group(be, store=dist.HashStore(), rank=0, world_size=1)
    world, rank = dist.get_world_size(), dist.get_rank()
    if dev.type == "cpu" and world > 1:
        torch.set_num_threads(1)  # 2+ threads per rank on few cores made steps spike 30-100x
    if world % (tp * pp) != 0:
        raise MegadiffError(
            f"world size {world} is not divisible by parallel.tp x parallel.pp = {tp} x {pp}; "
            f"launch a multiple of {tp * pp} processes or change parallel.tp / parallel.pp"
        )
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.process_groups_config import ProcessGroupCollection

    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    pg = ProcessGroupCollection.use_mpu_process_groups()
    return ParallelContext(
        rank=rank, world=world, local_rank=int(os.environ.get("LOCAL_RANK", 0)), tp=tp, pp=pp,
        dp=world // (tp * pp), tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(), dp_rank=ps.get_data_parallel_rank(), device=dev, pg=pg,
    )


def destroy_parallel() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
