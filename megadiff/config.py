"""The typed config tree (omegaconf structured configs).

One dataclass per concern; each field carries its meaning in the comment after it. A run's
config is ``MegadiffConfig``: YAML recipes in ``configs/`` fill it, ``key=value`` dotlist
overrides from the command line refine it, and :func:`load_config` checks it: an unknown key
or a wrong type fails with a message naming the key and what is allowed.

This module imports no torch, megatron or ray, so configs load on a login node in a second.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from megadiff import MegadiffError
from megadiff.diffusion.catalog import OBJECTIVES, SCHEDULES
from megadiff.model.catalog import ATTENTION_BACKENDS
from megadiff.train.lr import LR_SCHEDULES

# ----------------------------------------------------------------------------- data


@dataclass
class SourceConfig:
    name: str = MISSING  # short name, used in the manifest's per-source statistics
    paths: List[str] = field(default_factory=list)  # globs or fsspec URLs of .txt/.jsonl[.gz|.zst]/.parquet
    format: str = "auto"  # auto | txt | jsonl | parquet (auto: by file suffix)
    text_field: str = "text"  # field holding the document text in jsonl/parquet
    weight: float = 1.0  # mixture weight: documents are repeated floor(w) times + a seeded fraction
    doc_split: str = "file"  # file: one document per file | blank_line: split .txt at blank lines


@dataclass
class TokenizerConfig:
    kind: str = "bpe"  # bpe: train a byte-level BPE here | gpt2: GPT-2 ranks + [MASK] | file: path below
    path: Optional[str] = None  # tokenizer.json to use (kind=file) or where the trained one is written
    vocab_size: int = 8192  # target vocab for kind=bpe (special tokens included)
    sample_bytes: int = 50_000_000  # corpus bytes read to train the BPE


@dataclass
class DatasetRef:
    path: str = MISSING  # directory holding manifest.json
    split: str = "train"  # split inside the manifest
    weight: float = 1.0  # mixture weight across datasets (loader)


@dataclass
class NearDedupConfig:
    enabled: bool = False  # MinHash + LSH near-duplicate removal (data_pipelines/dedup.py)
    ngram: int = 5  # word n-gram shingles
    bands: int = 14  # LSH bands; documents sharing one band's hash are candidates
    rows: int = 8  # MinHash values per band (bands x rows permutations)


@dataclass
class DataConfig:
    # --- pipeline (raw text -> shards), used by `megadiff data tokenize`
    sources: List[SourceConfig] = field(default_factory=list)
    out_dir: str = "runs/data"  # where shards + manifest.json are written
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    seq_len: int = 512  # tokens per packed sample
    min_chars: int = 1  # filter: drop documents shorter than this (after normalization)
    max_chars: int = 10_000_000  # filter: drop documents longer than this
    valid_fraction: float = 0.01  # documents (by content hash) written to the 'valid' split
    samples_per_shard: int = 2048  # packed samples per .tar shard
    num_workers: int = 2  # Ray workers (parallelism of the tokenize stage)
    seed: int = 1234  # seeds mixture sampling and the valid split
    partition_bytes: int = 64 << 20  # work unit: jsonl byte ranges / parquet row groups of about this size
    filters: Dict[str, Any] = field(default_factory=dict)  # quality filters {name: {param: value}} (data_pipelines/filters.py)
    near_dedup: NearDedupConfig = field(default_factory=NearDedupConfig)
    # --- loader (shards -> batches), used by training and evaluation
    train: List[DatasetRef] = field(default_factory=list)  # default: [{path: out_dir, split: train}]
    valid: List[DatasetRef] = field(default_factory=list)  # default: [{path: out_dir, split: valid}]
    shuffle_seed: int = 1234
    skip_corrupt: bool = False  # count and skip unreadable samples instead of failing
    document_mask: bool = False  # attention stays inside each packed document (shards must record doc starts)
    unique_tokens: Optional[int] = None  # data-constrained runs: a U-token prefix of the shuffled split, repeated


# ----------------------------------------------------------------------------- model


@dataclass
class ModelConfig:
    preset: Optional[str] = None  # size preset (see `megadiff model info --list`); fills the fields below
    arch: str = "llama"  # llama (RMSNorm, SwiGLU, RoPE, no bias, GQA) | gpt2 (LayerNorm, GELU, learned pos)
    num_layers: int = 2
    hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # GQA groups (None = MHA)
    ffn_hidden_size: Optional[int] = None  # None: 4h (gpt2) or SwiGLU 8h/3 rounded to 64 (llama)
    max_seq_len: int = 512
    vocab_size: Optional[int] = None  # real vocab incl. [MASK]; None = read from the data manifest
    tie_embeddings: bool = True
    attention_backend: str = "auto"  # auto | a backend of megadiff/model/catalog.py (sdpa | flex | flash | te; masks: sdpa, flex)
    reset_position_ids: bool = False  # positions restart at 0 in every packed document (needs data.document_mask)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    recompute: str = "none"  # activation recompute: none | selective (core attention + MLP) | full (whole layers)
    recompute_num_layers: Optional[int] = None  # full: layers recomputed per pipeline stage (None: all of them)


# ----------------------------------------------------------------------------- diffusion


@dataclass
class DiffusionConfig:
    objective: str = "mdlm"  # mdlm (continuous-time NELBO, SUBS) | llada (1/t, per-length) | ar (next token) | bd3lm
    block_size: int = 0  # bd3lm: tokens per block (must divide the sequence length); 0 for other objectives
    mask_rate_min: float = 0.0  # bd3lm clipped schedule: per-block mask rates ~ U[min, max] in training
    mask_rate_max: float = 1.0
    schedule: str = "loglinear"  # loglinear | linear | cosine | poly
    schedule_power: float = 1.0  # exponent of the poly schedule
    eps: float = 1e-3  # t ~ U(eps, 1)
    antithetic: bool = True  # low-discrepancy time sampling across the global batch
    random_length_prob: float = 0.0  # LLaDA: with this probability crop the batch to a random length
    seed: int = 0  # corruption noise is a function of (seed, step, global sample index)
    # objective options (each acts only with the objectives whose catalogue traits list it; see docs/diffusion.md)
    shift: bool = False  # mdlm_adapt: position i predicts token i+1 (AR output alignment, DiffuLLaMA/Dream)
    complementary: bool = False  # mdlm_adapt, ar_mdlm: each sequence trained with a mask and its complement
    ar_weight: float = 1.0  # ar_mdlm: weight of the next-token loss
    diffusion_weight: float = 0.3  # ar_mdlm: weight of the shifted masked-diffusion loss
    uniform_fraction: float = 0.1  # gidd: share of uniform-token (vs [MASK]) corruption; 1 = uniform diffusion
    anneal_steps: int = 0  # mdlm/llada/mdlm_adapt/gidd: attention opens causal -> bidirectional over these steps; 0 off
    block_curriculum_start: int = 0  # bd3lm: first block size of the warmup-stable-decay block curriculum; 0 = off
    block_curriculum_warmup_steps: int = 0  # bd3lm curriculum: first steps, blocks start, 2 start, ... < seq_len
    block_curriculum_decay_steps: int = 0  # bd3lm curriculum: last steps, blocks seq_len/2, ... down to block_size


# ----------------------------------------------------------------------------- optimisation


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    lr_schedule: str = "cosine"  # cosine (warmup + cosine) | wsd (warmup-stable-decay) | constant
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd: final fraction of steps spent decaying
    decay_norms_and_embeddings: bool = False  # weight decay on norms/biases/embeddings


# ----------------------------------------------------------------------------- parallelism


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor-parallel size
    pp: int = 1  # pipeline-parallel size
    sequence_parallel: bool = False  # needs TE or apex norms
    distributed_optimizer: bool = True  # shard optimizer state over data-parallel ranks
    overlap_grad_reduce: bool = False
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | nccl | gloo


# ----------------------------------------------------------------------------- trainer


@dataclass
class TrainerConfig:
    run_dir: str = "runs/default"  # checkpoints, logs, config, MLflow store (if no URI given)
    max_steps: int = 1000
    micro_batch: int = 8  # sequences per micro batch per data-parallel rank
    global_batch: int = 32  # = micro_batch x grad accumulation x DP (checked)
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    loss_path: str = "fused"  # fused: loss rows only, vocab-parallel chunked linear+CE | logits: full logits (reference)
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 1234  # model init
    log_interval: int = 10
    eval_interval: int = 100  # 0 disables
    eval_batches: int = 8  # validation micro batches per eval
    eval_n_t: int = 8  # time points per sequence in the eval NELBO
    save_interval: int = 100  # 0 disables periodic saves (a final save still happens)
    keep_last: int = 3  # retention: keep the last K checkpoints
    keep_every: int = 0  # ... and every M-th step (0: none)
    async_save: bool = False  # write checkpoints in a background process (megatron dist_checkpointing async)
    resume: str = "latest"  # latest | latest_valid (fall back to the newest checkpoint that verifies) | step_XXXXXX
    max_wall_minutes: float = 0.0  # >0: save and exit with the requeue code after this long
    stop_after: int = 0  # >0: save and exit 75 (requeue) when a run reaches this step; a rerun goes on past it
    steps_per_invocation: int = 0  # >0: each invocation trains at most this many steps, saves, exits 75 (chunked jobs)
    nan_max_consecutive: int = 5  # abort after this many non-finite steps in a row
    peak_tflops: float = 0.0  # for MFU; 0 = detect (bf16 dense datasheet peak of known GPUs)
    progress: bool = True
    num_samples: int = 2  # samples generated at the end of training (0: none)
    sample_steps: int = 64


# ----------------------------------------------------------------------------- tracking


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI or sqlite:///<run_dir>/mlflow.db
    experiment: str = "megadiff"
    run_name: Optional[str] = None
    tags: dict = field(default_factory=dict)  # extra MLflow tags (sweeps set megadiff.sweep_id, N, D, C, ...)
    parent_run_id: Optional[str] = None  # nest this run under a parent MLflow run (sweeps)


@dataclass
class MegadiffConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# ----------------------------------------------------------------------------- loading

CHOICES: dict[str, tuple[str, ...]] = {  # registries' names come from their torch-free catalogues
    "data.tokenizer.kind": ("bpe", "gpt2", "file"),
    "model.arch": ("llama", "gpt2"),
    "model.attention_backend": ("auto", *ATTENTION_BACKENDS.names()),
    "model.recompute": ("none", "selective", "full"),
    "diffusion.objective": tuple(OBJECTIVES.names()),
    "diffusion.schedule": tuple(SCHEDULES.names()),
    "optim.lr_schedule": tuple(LR_SCHEDULES.names()),
    "parallel.backend": ("auto", "nccl", "gloo"),
    "trainer.precision": ("auto", "bf16", "fp32"),
    "trainer.loss_path": ("fused", "logits"),
    "trainer.device": ("auto", "cpu", "cuda"),
}

# Keys older megadiff versions wrote into saved configs (checkpoints, shards): dropped when such a config is
# read back, refused with the reason when a user passes them.
RETIRED_KEYS = {
    "model.causal": "the objective decides the attention mask (diffusion.objective=ar is causal)",
}


def _fields_of(node: Any) -> list[str]:
    t = OmegaConf.get_type(node)
    if t is not None and dataclasses.is_dataclass(t):
        return [f.name for f in dataclasses.fields(t)]
    return list(node.keys()) if isinstance(node, DictConfig) else []


def _explain(err: OmegaConfBaseException, schema: DictConfig, source: str) -> MegadiffError:
    key = getattr(err, "full_key", None) or getattr(err, "key", None) or "?"
    msg = str(err).splitlines()[0]
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)):
        if key in RETIRED_KEYS:
            return MegadiffError(f"{source}: config key {key!r} was removed: {RETIRED_KEYS[key]}; delete it")
        parent_key = key.rsplit(".", 1)[0] if "." in key else ""
        parent = OmegaConf.select(schema, parent_key) if parent_key else schema
        allowed = ", ".join(_fields_of(parent)) if parent is not None else "?"
        return MegadiffError(
            f"{source}: unknown config key {key!r}. Allowed keys in "
            f"{parent_key or 'the top level'}: {allowed}"
        )
    return MegadiffError(f"{source}: bad value for config key {key!r}: {msg}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> MegadiffConfig:
    """Load a YAML recipe, apply ``key=value`` overrides, check types, keys and choices.

    Returns a typed ``MegadiffConfig`` (an omegaconf DictConfig acting as the dataclass).
    """
    schema = OmegaConf.structured(MegadiffConfig)
    cfg = schema
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise MegadiffError(f"config file {str(p)!r} not found; pass a YAML recipe such as configs/demo.yaml")
        try:
            loaded = OmegaConf.load(p)
        except Exception as e:  # yaml syntax errors
            raise MegadiffError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        try:
            cfg = OmegaConf.merge(cfg, loaded)
        except OmegaConfBaseException as e:
            raise _explain(e, schema, f"config file {str(p)!r}") from None
    for ov in overrides or []:
        if "=" not in ov:
            raise MegadiffError(f"command-line override {ov!r} must look like key=value (e.g. trainer.max_steps=100)")
    for ov in overrides or []:
        key, value = ov.split("=", 1)
        key = re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", key.strip())  # data.sources.0.x -> data.sources[0].x
        try:
            OmegaConf.update(cfg, key, OmegaConf.from_dotlist([f"v={value}"]).v, merge=True)
        except OmegaConfBaseException as e:
            raise _explain(e, cfg, f"command-line override {ov!r}") from None
    validate(cfg)
    _check_resume(cfg.trainer.resume)
    return cfg  # type: ignore[return-value]


def _check_resume(value: str) -> None:
    if value not in ("latest", "latest_valid") and not re.fullmatch(r"step_\d{6,}", str(value)):
        raise MegadiffError(f"config key 'trainer.resume' is {value!r}; allowed: latest, latest_valid or a step "
                            f"directory name such as step_000280 (`megadiff checkpoint verify RUN_DIR` lists them)")


def validate(cfg: Any) -> None:
    """Check choice fields and cross-field rules; raise MegadiffError naming the key."""
    for key, allowed in CHOICES.items():
        val = OmegaConf.select(cfg, key)
        if val not in allowed:
            raise MegadiffError(f"config key {key!r} is {val!r}; allowed values: {', '.join(allowed)}")
    for i, src in enumerate(cfg.data.sources):
        if src.format not in ("auto", "txt", "jsonl", "parquet"):
            raise MegadiffError(
                f"config key 'data.sources[{i}].format' is {src.format!r}; allowed values: auto, txt, jsonl, parquet"
            )
        if src.doc_split not in ("file", "blank_line"):
            raise MegadiffError(
                f"config key 'data.sources[{i}].doc_split' is {src.doc_split!r}; allowed values: file, blank_line"
            )
        if src.weight <= 0:
            raise MegadiffError(f"config key 'data.sources[{i}].weight' must be > 0, got {src.weight}")
    positive = {
        "data.seq_len": cfg.data.seq_len,
        "trainer.micro_batch": cfg.trainer.micro_batch,
        "trainer.global_batch": cfg.trainer.global_batch,
        "parallel.tp": cfg.parallel.tp,
        "parallel.pp": cfg.parallel.pp,
        "model.num_layers": cfg.model.num_layers,
        "model.hidden_size": cfg.model.hidden_size,
    }
    for key, val in positive.items():
        if val <= 0:
            raise MegadiffError(f"config key {key!r} must be positive, got {val}")
    n_rc = cfg.model.recompute_num_layers
    if n_rc is not None and (cfg.model.recompute != "full" or n_rc <= 0):
        raise MegadiffError(f"config key 'model.recompute_num_layers'={n_rc} needs model.recompute=full and a "
                            f"positive value (got recompute={cfg.model.recompute!r}); unset it or set model.recompute=full")
    if not 0.0 <= cfg.data.valid_fraction < 1.0:
        raise MegadiffError(f"config key 'data.valid_fraction' must be in [0, 1), got {cfg.data.valid_fraction}")
    if not 0.0 < cfg.diffusion.eps < 1.0:
        raise MegadiffError(f"config key 'diffusion.eps' must be in (0, 1), got {cfg.diffusion.eps}")
    _validate_objective_options(cfg)
    _validate_blocks(cfg)


def _validate_objective_options(cfg: Any) -> None:
    """diffusion.* objective options: set only with an objective that reads them (its traits' ``options``)."""
    d, tr = cfg.diffusion, OBJECTIVES.traits(cfg.diffusion.objective)
    defaults = DiffusionConfig()
    for key in sorted({k for n in OBJECTIVES.names() for k in OBJECTIVES.traits(n).options}):
        if d[key] != getattr(defaults, key) and key not in tr.options:
            users = [n for n in OBJECTIVES.names() if key in OBJECTIVES.traits(n).options]
            raise MegadiffError(f"config key 'diffusion.{key}' acts only with diffusion.objective in "
                                f"{', '.join(users)} (it is {d.objective!r}); remove it or change the objective")
    if d.ar_weight < 0 or d.diffusion_weight < 0 or d.ar_weight + d.diffusion_weight <= 0:
        raise MegadiffError(f"config keys 'diffusion.ar_weight/diffusion_weight' are {d.ar_weight}/"
                            f"{d.diffusion_weight}; both must be >= 0 and not both 0 (e.g. 1.0 and 0.3)")
    if d.anneal_steps < 0:
        raise MegadiffError(f"config key 'diffusion.anneal_steps' must be >= 0 (0 = bidirectional from step 0), "
                            f"got {d.anneal_steps}")
    if not 0.0 <= d.uniform_fraction <= 1.0:
        raise MegadiffError(f"config key 'diffusion.uniform_fraction' must be in [0, 1], got {d.uniform_fraction}")
    if tr.stacks_rows and cfg.parallel.pp > 1:
        raise MegadiffError(f"diffusion.objective={d.objective} stacks several inputs per sample along the batch, "
                            f"which pipeline parallelism (parallel.pp={cfg.parallel.pp}) does not size for yet; "
                            f"use parallel.pp=1")


def _validate_blocks(cfg: Any) -> None:
    """Block-diffusion and document-mask keys: set only where they act, consistent with each other."""
    d = cfg.diffusion
    if OBJECTIVES.traits(d.objective).block_diffusion:
        if d.block_size <= 0 or cfg.data.seq_len % d.block_size:
            raise MegadiffError(f"config key 'diffusion.block_size' is {d.block_size}; diffusion.objective=bd3lm "
                                f"needs a block size > 0 that divides data.seq_len={cfg.data.seq_len} (e.g. 16)")
        if d.random_length_prob > 0:
            raise MegadiffError("config key 'diffusion.random_length_prob' must be 0 with diffusion.objective=bd3lm "
                                "(a random crop would break the block grid)")
        if not 0.0 <= d.mask_rate_min < d.mask_rate_max <= 1.0:
            raise MegadiffError(f"config keys 'diffusion.mask_rate_min/max' are [{d.mask_rate_min}, "
                                f"{d.mask_rate_max}]; need 0 <= min < max <= 1")
        _validate_block_curriculum(cfg)
    if cfg.model.reset_position_ids and not cfg.data.document_mask:
        raise MegadiffError("config key 'model.reset_position_ids' is true but data.document_mask is false; "
                            "positions restart per document only with document masks: set data.document_mask=true")


def _validate_block_curriculum(cfg: Any) -> None:
    """The length-free checks of diffusion.block_curriculum_*; the trainer checks the sizes against the data's
    sequence length (``megadiff.diffusion.curricula.block_curriculum``)."""
    d = cfg.diffusion
    keys = ("block_curriculum_start", "block_curriculum_warmup_steps", "block_curriculum_decay_steps")
    for key in keys:
        if d[key] < 0:
            raise MegadiffError(f"config key 'diffusion.{key}' must be >= 0, got {d[key]}")
    if d.block_curriculum_start == 0:
        if d.block_curriculum_warmup_steps or d.block_curriculum_decay_steps:
            raise MegadiffError("config keys 'diffusion.block_curriculum_warmup_steps/decay_steps' act only with "
                                "diffusion.block_curriculum_start > 0 (the first block size); set it or remove them")
        return
    if d.block_curriculum_warmup_steps + d.block_curriculum_decay_steps > cfg.trainer.max_steps:
        raise MegadiffError(f"config keys 'diffusion.block_curriculum_warmup_steps' + '..._decay_steps' = "
                            f"{d.block_curriculum_warmup_steps} + {d.block_curriculum_decay_steps} exceed "
                            f"trainer.max_steps={cfg.trainer.max_steps}; shorten them or train longer")


def check_batch_layout(cfg: Any, dp: int) -> int:
    """Return gradient-accumulation steps; fail unless global = micro x accum x DP."""
    mb, gb = cfg.trainer.micro_batch, cfg.trainer.global_batch
    if gb % (mb * dp) != 0:
        raise MegadiffError(
            f"trainer.global_batch={gb} must be a multiple of trainer.micro_batch x data-parallel size "
            f"= {mb} x {dp} = {mb * dp}; e.g. set trainer.global_batch={mb * dp * max(1, gb // (mb * dp))}"
        )
    return gb // (mb * dp)


def default_dataset_refs(cfg: Any) -> None:
    """Fill data.train / data.valid from data.out_dir when the recipe leaves them empty."""
    if not cfg.data.train:
        cfg.data.train = [DatasetRef(path=cfg.data.out_dir, split="train")]
    if not cfg.data.valid:
        cfg.data.valid = [DatasetRef(path=cfg.data.out_dir, split="valid")]


def train_data_dir(cfg: Any) -> str:
    """The dataset directory a run trains on (the first data.train entry, else data.out_dir): it holds the
    run's tokenizer and manifest."""
    return cfg.data.train[0].path if cfg.data.train else cfg.data.out_dir


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def to_flat_dict(cfg: Any) -> dict[str, Any]:
    """Flatten the resolved config into ``{"a.b.c": value}`` (for MLflow params)."""
    out: dict[str, Any] = {}

    def rec(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                rec(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(node, list):
            out[prefix] = repr(node)
        else:
            out[prefix] = node

    rec("", OmegaConf.to_container(cfg, resolve=True))
    return out


def _drop_retired(node: DictConfig) -> DictConfig:
    for key in RETIRED_KEYS:
        parent, _, leaf = key.rpartition(".")
        sub = OmegaConf.select(node, parent)
        if isinstance(sub, DictConfig) and leaf in sub:
            sub.pop(leaf)
    return node


def from_yaml_text(text: str) -> MegadiffConfig:
    """Rebuild a typed config from YAML saved beside an output (checkpoint, shards); keys that older
    versions wrote and that no longer exist (RETIRED_KEYS) are dropped."""
    saved = _drop_retired(OmegaConf.create(text))
    return OmegaConf.merge(OmegaConf.structured(MegadiffConfig), saved)  # type: ignore[return-value]


def is_causal(cfg: Any) -> bool:
    """The model of this run attends causally (its objective's trait)."""
    return OBJECTIVES.traits(cfg.diffusion.objective).needs_causal_mask
