"""The sweep file: a typed omegaconf schema (no torch).

A sweep file names a base training recipe, compute budgets, a model-size ladder, objectives and
the rules that turn (budget, size) into a run's hyperparameters. See docs/sweeps.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from megadiff import MegadiffError


@dataclass
class CustomModel:
    name: str = MISSING  # size name used in run names
    num_layers: int = MISSING
    hidden_size: int = MISSING
    num_attention_heads: int = MISSING
    num_query_groups: Optional[int] = None
    ffn_hidden_size: Optional[int] = None


@dataclass
class LadderRule:
    """nanochat-style depth ladder: width = depth x aspect_ratio rounded up to a multiple of head_dim."""

    depths: List[int] = field(default_factory=list)
    aspect_ratio: int = 64
    head_dim: int = 64


@dataclass
class ModelsSpec:
    presets: List[str] = field(default_factory=list)  # names from megadiff/model/presets.py
    custom: List[CustomModel] = field(default_factory=list)
    ladder: LadderRule = field(default_factory=LadderRule)


@dataclass
class HParamsSpec:
    """Rules from (budget C, model shape, steps) to per-run hyperparameters."""

    global_batch: int = 32  # sequences per step at the reference budget
    micro_batch: Optional[int] = None  # None: the base recipe's trainer.micro_batch
    batch_exponent: float = 0.0  # global_batch x (C / batch_ref_budget)^batch_exponent, rounded to batch_multiple
    batch_multiple: Optional[int] = None  # None: micro_batch; set micro_batch x data-parallel size for multi-GPU runs
    batch_ref_budget: Optional[float] = None  # None: the smallest budget
    lr: float = 3e-3  # peak LR at lr_ref_width
    lr_ref_width: int = 256
    lr_width_exponent: float = 0.0  # lr x (lr_ref_width / hidden_size)^lr_width_exponent (1.0: muP-like 1/width)
    min_lr_ratio: float = 0.1  # min_lr = lr x this (reached exactly at the final step)
    schedule: str = "wsd"  # wsd (warmup-stable-decay) | cosine; both end at trainer.max_steps
    decay_fraction: float = 0.2  # wsd: fraction of the steps spent decaying
    warmup_fraction: float = 0.05  # warmup steps = round(fraction x steps), clamped below
    warmup_min_steps: int = 1
    warmup_max_steps: int = 1000
    min_steps: int = 20  # refuse runs shorter than this
    evals_per_run: int = 4  # eval_interval = steps // evals_per_run (the trainer also evaluates at the end)
    saves_per_run: int = 4  # save_interval = steps // saves_per_run


@dataclass
class DataSpec:
    """Data-constrained sweeps (Muennighoff et al. 2023): runs over unique-token budgets U x epochs.

    Each run trains on a deterministic U-token prefix of the shuffled training split, repeated for
    ``epochs`` passes (D = U x epochs); the run gets ``data.unique_tokens=U`` (the loader's limit).
    With both lists set, the grid is sizes x U x epochs and ``budgets`` is not used.
    """

    unique_tokens: List[float] = field(default_factory=list)
    epochs: List[float] = field(default_factory=list)


@dataclass
class GridSpec:
    """Budget-centred grids: per budget, the ladder sizes within [N_opt / span, N_opt x span] of a prior law."""

    center: str = "none"  # none (every size at every budget) | chinchilla | fit (prior_fit) | params (prior_params)
    prior_fit: Optional[str] = None  # a fit.json of an earlier sweep (its Approach 3 law per objective)
    prior_params: dict = field(default_factory=dict)  # {E, A, B, alpha, beta} with C = 6 N D
    span: float = 3.0  # sizes from N_opt / span to N_opt x span
    min_sizes: int = 3  # if fewer ladder sizes fall in the span, the nearest ones (an IsoFLOP parabola needs 3)
    tokens_per_param: List[float] = field(default_factory=lambda: [2.0, 200.0])  # flag runs outside [lo, hi]


@dataclass
class FitSpec:
    metric: str = "val/nelbo"  # MLflow metric read for every run
    tail: int = 1  # average the last `tail` logged values (1: the final evaluation)
    n_kind: str = "total"  # total | non_embedding: which parameter count is N in the fits
    bootstrap: int = 200  # bootstrap replicates for the intervals
    ci_level: float = 0.95
    seed: int = 0
    compare_at: List[float] = field(default_factory=list)  # extra C values for predictions / MDM-vs-AR


@dataclass
class LaunchSpec:
    train_command: List[str] = field(default_factory=list)  # default: [python, -m, megadiff.cli, train]
    parallel: int = 1  # local executor: runs at a time
    slurm: dict = field(default_factory=dict)  # passed to the Slurm launcher (nodes, gpus_per_node, time, ...)


@dataclass
class SweepSpec:
    name: str = MISSING  # sweep id: MLflow tag `sweep_id`, experiment and directory names
    base_config: str = MISSING  # training recipe every run starts from (path relative to CWD or this file)
    out_dir: Optional[str] = None  # None: runs/sweeps/<name>; each run writes <out_dir>/<run name>
    tracking_uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<out_dir>/mlflow.db
    experiment: Optional[str] = None  # None: sweep-<name>
    objectives: List[str] = field(default_factory=lambda: ["mdlm"])  # names from megadiff/diffusion/catalog.py
    budgets: List[float] = field(default_factory=list)  # training FLOPs per run (in the `flops` convention)
    flops: str = "kernel"  # kernel (model/flops.py: attention counted, causal at half) | 6nd (6 N_non-emb D)
    vocab_size: Optional[int] = None  # only before the dataset exists (then its manifest is used and checked)
    seq_len: Optional[int] = None  # likewise: the data's seq_len
    models: ModelsSpec = field(default_factory=ModelsSpec)
    hparams: HParamsSpec = field(default_factory=HParamsSpec)
    overrides: List[str] = field(default_factory=list)  # dotlist applied to every run, before the sweep's own
    data: DataSpec = field(default_factory=DataSpec)
    grid: GridSpec = field(default_factory=GridSpec)
    fit: FitSpec = field(default_factory=FitSpec)
    launch: LaunchSpec = field(default_factory=LaunchSpec)


def load_sweep(path: str | os.PathLike, overrides: list[str] | None = None) -> Any:
    """Load and check a sweep file; returns a typed SweepSpec (omegaconf) with paths resolved."""
    p = Path(path)
    if not p.is_file():
        raise MegadiffError(f"sweep file {str(p)!r} not found; see configs/sweeps/ for examples")
    try:
        spec = OmegaConf.merge(OmegaConf.structured(SweepSpec), OmegaConf.load(p))
        if overrides:
            spec = OmegaConf.merge(spec, OmegaConf.from_dotlist(list(overrides)))
        if OmegaConf.is_missing(spec, "name"):
            spec.name = p.stem
        if OmegaConf.is_missing(spec, "base_config"):
            raise MegadiffError(f"{p}: set base_config: the training recipe every run starts from")
    except OmegaConfBaseException as e:
        raise MegadiffError(f"{p}: {str(e).splitlines()[0]} (key {getattr(e, 'full_key', '?')})") from None
    base = Path(spec.base_config)
    if not base.is_file() and (p.parent / base).is_file():
        base = p.parent / base
    if not base.is_file():
        raise MegadiffError(f"{p}: base_config {spec.base_config!r} not found (relative to the CWD or the sweep file)")
    spec.base_config = str(base.resolve())
    spec.out_dir = str(Path(spec.out_dir or f"runs/sweeps/{spec.name}").resolve())
    spec.experiment = spec.experiment or f"sweep-{spec.name}"
    check_sweep(spec, str(p))
    return spec


def check_sweep(spec: Any, where: str) -> None:
    if not spec.name or any(ch in spec.name for ch in "/ '\""):
        raise MegadiffError(f"{where}: name {spec.name!r} must be non-empty without '/', spaces or quotes")
    dc = spec.data
    if bool(dc.unique_tokens) != bool(dc.epochs):
        raise MegadiffError(f"{where}: data.unique_tokens and data.epochs go together (a data-constrained grid is "
                            "U x epochs); set both or neither")
    if dc.unique_tokens and (any(float(u) <= 0 for u in dc.unique_tokens) or any(float(e) <= 0 for e in dc.epochs)):
        raise MegadiffError(f"{where}: data.unique_tokens and data.epochs must be positive")
    if spec.flops not in ("kernel", "6nd"):
        raise MegadiffError(f"{where}: flops is {spec.flops!r}; allowed: kernel, 6nd")
    g = spec.grid
    if g.center not in ("none", "chinchilla", "fit", "params"):
        raise MegadiffError(f"{where}: grid.center is {g.center!r}; allowed: none, chinchilla, fit, params")
    if g.center == "fit" and not g.prior_fit:
        raise MegadiffError(f"{where}: grid.center: fit needs grid.prior_fit (a fit.json of an earlier sweep)")
    if g.center == "params" and set(g.prior_params) != {"E", "A", "B", "alpha", "beta"}:
        raise MegadiffError(f"{where}: grid.center: params needs grid.prior_params with E, A, B, alpha, beta")
    if g.span <= 1 or len(g.tokens_per_param) != 2:
        raise MegadiffError(f"{where}: grid.span must be > 1 and grid.tokens_per_param a [low, high] pair")
    if dc.unique_tokens:
        if spec.budgets or g.center != "none":
            raise MegadiffError(f"{where}: a data-constrained sweep (data.unique_tokens x data.epochs) sets D itself; "
                                "remove budgets and grid.center (run an IsoFLOP sweep separately)")
        return _check_rest(spec, where)
    if not spec.budgets:
        raise MegadiffError(f"{where}: budgets is empty; list training FLOPs per run, e.g. [1e17, 3e17, 1e18]")
    if any(float(c) <= 0 for c in spec.budgets):
        raise MegadiffError(f"{where}: budgets must be positive FLOPs, got {list(spec.budgets)}")
    if len(set(float(c) for c in spec.budgets)) != len(spec.budgets):
        raise MegadiffError(f"{where}: budgets has duplicates: {list(spec.budgets)}")
    _check_rest(spec, where)


def _check_rest(spec: Any, where: str) -> None:
    from megadiff.diffusion.catalog import OBJECTIVES

    bad = [o for o in spec.objectives if o not in OBJECTIVES]
    if bad or not spec.objectives:
        raise MegadiffError(f"{where}: objectives {list(spec.objectives)}; allowed: {', '.join(OBJECTIVES.names())}")
    if not (spec.models.presets or spec.models.custom or spec.models.ladder.depths):
        raise MegadiffError(f"{where}: no model sizes; set models.presets, models.custom or models.ladder.depths")
    h = spec.hparams
    if h.schedule not in ("wsd", "cosine"):
        raise MegadiffError(f"{where}: hparams.schedule is {h.schedule!r}; allowed: wsd, cosine")
    if not 0 < h.decay_fraction <= 1:
        raise MegadiffError(f"{where}: hparams.decay_fraction must be in (0, 1], got {h.decay_fraction}")
    if h.global_batch <= 0 or any(v is not None and v <= 0 for v in (h.micro_batch, h.batch_multiple)):
        raise MegadiffError(f"{where}: hparams.global_batch, micro_batch and batch_multiple must be positive")
    if spec.fit.n_kind not in ("total", "non_embedding"):
        raise MegadiffError(f"{where}: fit.n_kind is {spec.fit.n_kind!r}; allowed: total, non_embedding")
    if spec.fit.tail < 1:
        raise MegadiffError(f"{where}: fit.tail must be >= 1")


def tracking_uri(spec: Any) -> str:
    if spec.tracking_uri:
        return str(spec.tracking_uri)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(spec.out_dir).resolve()}/mlflow.db"
