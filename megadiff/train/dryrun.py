"""`megadiff train CONFIG --dry-run --world-size N`: build every distinct rank's partition, allocate nothing.

Each pipeline stage is a distinct partition (the TP and DP ranks of a stage hold tensors of the same
shapes). For each stage we join torch's *fake* process group (``torch.testing``'s FakeStore: every
collective returns at once, no peers needed) as a rank of that stage at the full world size, let
megatron-core build its TP/PP/DP groups (without its gloo side groups, which the fake backend cannot
serve), and build the stage's GPTModel under ``torch.device("meta")`` without initialisation: shapes
only, no weight memory. We print the parameters each stage holds (checked against the memory model's
count), the per-rank memory forecast (megadiff/model/memory.py) and fail when a stage cannot fit
``--gpu-mem-gib``.
"""

from __future__ import annotations

import time
from typing import Any

from megadiff import MegadiffError


def stage_rank(stage: int, world: int, pp: int) -> int:
    """A global rank on pipeline stage ``stage`` (megatron's default order tp-cp-ep-dp-pp: PP is outermost)."""
    return stage * (world // pp)


def build_stage(cfg: Any, vocab_size: int, world: int, stage: int) -> dict:
    """Build one stage's partition on the meta device under the fake process group; return its counts."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from megadiff.config import is_causal
    from megadiff.model.build import build_model

    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    dist.init_process_group("fake", store=FakeStore(), rank=stage_rank(stage, world, pp), world_size=world)
    try:
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                     create_gloo_process_groups=False)
        assert ps.get_pipeline_model_parallel_rank() == stage
        pg = ProcessGroupCollection.use_mpu_process_groups()
        bf16 = cfg.trainer.precision in ("bf16", "auto")
        with torch.device("meta"):
            built = build_model(cfg.model, vocab_size, causal=is_causal(cfg), tp=tp, pp=pp, pg_collection=pg,
                                pre_process=stage == 0, post_process=stage == pp - 1, device="meta",
                                dtype=torch.bfloat16 if bf16 else torch.float32, init_weights=False,
                                sequence_parallel=cfg.parallel.sequence_parallel)
        params = sum(p.numel() for p in built.model.parameters())
        assert all(p.is_meta for p in built.model.parameters())
        return {"stage": stage, "params": params, "layers": len(built.model.decoder.layers),
                "padded_vocab": built.padded_vocab_size, "shape": built.shape}
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()


def dry_run_vocab(cfg: Any) -> int:
    if cfg.model.vocab_size is not None:
        return int(cfg.model.vocab_size)
    from megadiff.config import train_data_dir
    from megadiff.data.format import read_manifest

    try:
        return int(read_manifest(train_data_dir(cfg))["vocab_size"])
    except MegadiffError:
        raise MegadiffError("the dry run needs the vocab size: set model.vocab_size in the recipe (or tokenize "
                            f"the data first: no manifest in {train_data_dir(cfg)})") from None


def dry_run(cfg: Any, world: int, gpu_mem_gib: float | None = None) -> int:
    """Print per-stage parameters and the memory forecast of ``cfg`` at ``world`` ranks; exit code."""
    from megadiff.config import check_batch_layout
    from megadiff.dist import cpu_shim
    from megadiff.model.memory import GIB, Layout, forecast, format_forecast

    t0 = time.perf_counter()
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    if world % (tp * pp):
        raise MegadiffError(f"--world-size {world} is not divisible by parallel.tp x parallel.pp = {tp} x {pp}")
    dp = world // (tp * pp)
    accum = check_batch_layout(cfg, dp)
    vocab = dry_run_vocab(cfg)
    cpu_shim.install()  # megatron asks torch.cuda for a device while building; none is needed here
    stages = [build_stage(cfg, vocab, world, s) for s in range(pp)]
    shape, vpad = stages[0]["shape"], stages[0]["padded_vocab"]
    bf16 = cfg.trainer.precision in ("bf16", "auto")
    seq = cfg.data.seq_len
    layout = Layout(tp=tp, pp=pp, dp=dp, micro_batch=cfg.trainer.micro_batch, seq=seq, num_micro=accum,
                    recompute=cfg.model.recompute, recompute_num_layers=cfg.model.recompute_num_layers, bf16=bf16,
                    distributed_optimizer=cfg.parallel.distributed_optimizer,
                    loss_path=cfg.trainer.loss_path)
    fc = forecast(shape, vpad, layout)
    print(f"dry run: {world} ranks = TP {tp} x PP {pp} x DP {dp}; micro batch {cfg.trainer.micro_batch} x "
          f"{accum} accumulation x DP {dp} = global batch {cfg.trainer.global_batch}, seq {seq}, "
          f"{'bf16' if bf16 else 'fp32'}, recompute {cfg.model.recompute}")
    print(f"model: {shape.arch}, {shape.num_layers} layers, hidden {shape.hidden_size}, vocab {vocab} -> {vpad}")
    total = 0
    for st, f in zip(stages, fc):
        if st["params"] != f.params:  # the memory model counts what megatron built, or it is wrong
            raise MegadiffError(f"memory model counts {f.params:,} parameters on stage {st['stage']} but megatron "
                                f"built {st['params']:,}: megadiff/model/memory.py is out of date")
        total += st["params"] * tp
        print(f"stage {st['stage']}: {st['layers']} layers, {st['params']:,} parameters per rank")
    print(f"parameters (all stages, all TP ranks): {total:,}")
    print(format_forecast(fc))
    worst = max(fc, key=lambda s: s.total)
    print(f"built in {time.perf_counter() - t0:.1f} s")
    if gpu_mem_gib is not None and worst.total / GIB > gpu_mem_gib:
        raise MegadiffError(
            f"layout does not fit: stage {worst.pp_rank} needs {worst.total / GIB:.1f} GiB per rank > --gpu-mem-gib "
            f"{gpu_mem_gib}; raise parallel.tp/pp, lower trainer.micro_batch, or set model.recompute=full")
    return 0
