"""megatron DDP + (distributed) optimizer, with weight-decay groups and our LR schedules."""

from __future__ import annotations

from typing import Any

import torch


def wrap_ddp(model, tconfig, ctx, parallel_cfg) -> Any:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=bool(parallel_cfg.overlap_grad_reduce) and ctx.device.type == "cuda",
        use_distributed_optimizer=bool(parallel_cfg.distributed_optimizer),
        bucket_size=None if ctx.device.type == "cpu" else 40_000_000,
    )
    return DistributedDataParallel(config=tconfig, ddp_config=ddp_cfg, module=model, pg_collection=ctx.pg)


def no_decay(param: torch.nn.Parameter, name: str) -> bool:
    """Norm weights, biases and embeddings get no weight decay (the default)."""
    return param.ndim == 1 or name.endswith(".bias") or "embedding" in name


def build_optimizer(ddp_model, optim_cfg, parallel_cfg, ctx, bf16: bool) -> Any:
    from megatron.core.optimizer import (
        OptimizerConfig,
        ParamGroupOverride,
        ParamKey,
        ParamWithNamePredicate,
        get_megatron_optimizer,
    )

    cfg = OptimizerConfig(
        optimizer="adam",
        lr=optim_cfg.lr,
        min_lr=optim_cfg.min_lr,
        weight_decay=optim_cfg.weight_decay,
        adam_beta1=optim_cfg.beta1,
        adam_beta2=optim_cfg.beta2,
        adam_eps=optim_cfg.adam_eps,
        clip_grad=optim_cfg.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=bool(parallel_cfg.distributed_optimizer),
    )
    overrides = None
    if not optim_cfg.decay_norms_and_embeddings:
        key = ParamKey(with_name_predicate=ParamWithNamePredicate(name="megadiff_no_decay", fn=no_decay))
        overrides = {key: ParamGroupOverride(wd_mult=0.0)}
    else:
        overrides = {}
    return get_megatron_optimizer(cfg, [ddp_model], config_overrides=overrides, use_gloo_process_groups=False,
                                  pg_collection=ctx.pg)


def set_lr(optimizer, lr: float, weight_decay: float) -> None:
    """Set this step's LR and weight decay; megatron's groups carry ``wd_mult`` (0 = no decay)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
        group["weight_decay"] = weight_decay * group.get("wd_mult", 1.0)
