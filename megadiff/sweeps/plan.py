"""IsoFLOP planning: (budgets x sizes x objectives) -> runs, each a base recipe + dotlist overrides.

For budget C and model shape: D = C / flops_per_token(shape, vocab, seq_len, causal=...)
(megadiff/model/flops.py, the formula the trainer reports; a causal kernel for objectives whose
traits say needs_causal_mask), steps = round(D / (global_batch x
seq_len)); the run then trains on exactly steps x global_batch x seq_len tokens, and its actual
compute (reported, and used by the fits) is flops_per_token x that. No torch import.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from megadiff import MegadiffError
from megadiff.config import load_config, train_data_dir
from megadiff.diffusion.catalog import OBJECTIVES
from megadiff.model.flops import count_params, flops_per_token
from megadiff.model.presets import PRESETS, padded_vocab_size, resolve_shape
from megadiff.tracking.sweep_runs import TAG_RUN, TAG_SWEEP  # the tags the MLflow side searches by


@dataclass
class PlannedRun:
    name: str
    objective: str
    budget: float  # nominal C
    size: str
    model_overrides: list[str]
    num_layers: int = 0
    hidden_size: int = 0
    n_params: int = 0  # total parameters (embeddings included)
    n_non_embedding: int = 0
    flops_per_token: float = 0.0  # in the sweep's convention (what turns C into D)
    flops_per_token_kernel: float = 0.0  # model/flops.py (attention counted; causal at half)
    flops_per_token_6nd: float = 0.0  # 6 x N_non-embedding (SMDM)
    flops_convention: str = "kernel"
    unique_tokens: int = 0  # data-constrained: the U-token prefix the run repeats (0: no limit)
    flag: str = ""  # a warning that does not refuse the run (e.g. tokens per parameter outside the window)
    seq_len: int = 0
    global_batch: int = 0
    micro_batch: int = 0
    steps: int = 0
    tokens: int = 0  # D actually trained on
    compute: float = 0.0  # C actually spent
    lr: float = 0.0
    min_lr: float = 0.0
    warmup_steps: int = 0
    schedule: str = ""
    decay_fraction: float = 0.0
    eval_interval: int = 0
    save_interval: int = 0
    run_dir: str = ""
    overrides: list[str] = field(default_factory=list)  # everything but tracking.parent_run_id
    ok: bool = True
    reason: str = ""

    @property
    def epochs(self) -> float:
        return self.tokens / self.unique_tokens if self.unique_tokens else 1.0

    @property
    def tokens_per_param(self) -> float:
        return self.tokens / self.n_params if self.n_params else 0.0

    def n_for_fit(self, kind: str) -> int:
        return self.n_non_embedding if kind == "non_embedding" else self.n_params

    def train_overrides(self, parent_run_id: str | None) -> list[str]:
        extra = [f"tracking.parent_run_id={parent_run_id}"] if parent_run_id else []
        return list(self.overrides) + extra


@dataclass
class Plan:
    sweep_id: str
    base_config: str
    out_dir: str
    tracking_uri: str
    experiment: str
    vocab_size: int
    seq_len: int
    runs: list[PlannedRun]

    @property
    def feasible(self) -> list[PlannedRun]:
        return [r for r in self.runs if r.ok]

    @property
    def refused(self) -> list[PlannedRun]:
        return [r for r in self.runs if not r.ok]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for r, rd in zip(self.runs, d["runs"]):
            rd["tokens_per_param"] = r.tokens_per_param
            rd["epochs"] = r.epochs
        return d

    @staticmethod
    def from_json(d: dict[str, Any]) -> Plan:
        runs = [PlannedRun(**{k: v for k, v in r.items() if k not in ("tokens_per_param", "epochs")})
                for r in d["runs"]]
        return Plan(**{**d, "runs": runs})

    def run(self, name: str) -> PlannedRun:
        for r in self.runs:
            if r.name == name:
                return r
        raise MegadiffError(f"sweep {self.sweep_id} has no run {name!r}")


def budget_label(c: float) -> str:
    return f"{float(c):.3g}".replace("+", "").replace("e0", "e")


def _sizes(spec: Any) -> list[tuple[str, list[str]]]:
    out: list[tuple[str, list[str]]] = []
    for p in spec.models.presets:
        if p not in PRESETS:
            raise MegadiffError(f"models.presets: unknown preset {p!r}; allowed: {', '.join(PRESETS)}")
        out.append((p, [f"model.preset={p}"]))

    def explicit(name: str, L: int, h: int, a: int, g: Any, f: Any) -> tuple[str, list[str]]:
        return name, ["model.preset=null", f"model.num_layers={L}", f"model.hidden_size={h}",
                      f"model.num_attention_heads={a}", f"model.num_query_groups={'null' if g is None else g}",
                      f"model.ffn_hidden_size={'null' if f is None else f}"]

    for m in spec.models.custom:
        out.append(explicit(m.name, m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups,
                            m.ffn_hidden_size))
    lad = spec.models.ladder
    for depth in lad.depths:
        width = -(-depth * lad.aspect_ratio // lad.head_dim) * lad.head_dim
        out.append(explicit(f"d{depth}w{width}", depth, width, width // lad.head_dim, None, None))
    names = [n for n, _ in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise MegadiffError(f"models: size names repeat: {dup}")
    return out


def _data_info(spec: Any, cfg: Any) -> tuple[int, int]:
    """(vocab, seq_len) as the trainer sees them: the data manifest; before the dataset exists, the
    sweep's vocab_size / seq_len (checked against the manifest once it exists)."""
    from megadiff.data.format import manifest_info, read_manifest

    d = train_data_dir(cfg)
    if (Path(d) / "manifest.json").is_file():
        info = manifest_info(read_manifest(d), d)
        for key, want, have in (("vocab_size", spec.vocab_size, info.vocab_size),
                                ("seq_len", spec.seq_len, info.seq_len)):
            if want and int(want) != have:
                raise MegadiffError(f"sweep {key}={want} but the dataset {d} has {key} {have}; fix or remove "
                                    f"{key} in the sweep file")
        return info.vocab_size, info.seq_len
    vocab = spec.vocab_size or cfg.model.vocab_size
    if not vocab or not spec.seq_len:
        raise MegadiffError(
            f"the planner needs the data's vocab size and seq_len for FLOPs/token: build the dataset {d} "
            "first, or set vocab_size and seq_len in the sweep file"
        )
    return int(vocab), int(spec.seq_len)


def _batch(spec: Any, budget: float | None, micro: int) -> int:
    h = spec.hparams
    gb = float(h.global_batch)
    if budget is not None:
        ref = float(h.batch_ref_budget or min(float(c) for c in spec.budgets))
        gb *= (budget / ref) ** h.batch_exponent
    unit = int(h.batch_multiple or micro)
    if unit % micro:
        raise MegadiffError(f"hparams.batch_multiple={unit} must be a multiple of the micro batch {micro}")
    return max(unit, int(round(gb / unit)) * unit)


@dataclass
class Size:
    """One model size of the ladder, as the trainer builds it, with both FLOPs-per-token conventions."""

    name: str
    overrides: list[str]
    num_layers: int
    hidden_size: int
    n_params: int
    n_non_embedding: int
    fpt_kernel: float
    fpt_6nd: float

    def fpt(self, convention: str) -> float:
        return self.fpt_kernel if convention == "kernel" else self.fpt_6nd


def _size_table(spec: Any, objective: str, vocab: int, seq_len: int) -> list[Size]:
    out = []
    for size, model_ovr in _sizes(spec):
        cfg = load_config(spec.base_config, list(spec.overrides) + model_ovr + [f"diffusion.objective={objective}"])
        shape = resolve_shape(cfg.model)
        vpad = padded_vocab_size(vocab, int(cfg.parallel.tp))  # what the trainer builds and counts
        pc = count_params(shape, vpad)
        n_ne = pc.non_embedding(shape.num_layers)
        out.append(Size(size, model_ovr, shape.num_layers, shape.hidden_size, pc.total(shape.num_layers), n_ne,
                        flops_per_token(shape, vpad, seq_len, causal=OBJECTIVES.traits(objective).needs_causal_mask),
                        6.0 * n_ne))
    return out


def _cells(spec: Any) -> list[tuple[float | None, float | None, float | None]]:
    """(budget, unique tokens, epochs) per grid cell: IsoFLOP budgets, or the data-constrained U x epochs."""
    if spec.data.unique_tokens:
        return [(None, float(u), float(e)) for u in sorted(spec.data.unique_tokens) for e in sorted(spec.data.epochs)]
    return [(float(c), None, None) for c in sorted(float(c) for c in spec.budgets)]


def _run_name(objective: str, budget: float | None, u: float | None, epochs: float | None, size: str) -> str:
    if budget is not None:
        return f"{objective}-c{budget_label(budget)}-{size}"
    return f"{objective}-u{budget_label(u)}-e{budget_label(epochs)}-{size}"


def plan_sweep(spec: Any) -> Plan:
    """Expand a loaded sweep spec into planned runs (feasible or refused with the reason)."""
    from megadiff.sweeps.grid import centred_sizes, flag_tokens_per_param
    from megadiff.sweeps.spec import tracking_uri

    base = load_config(spec.base_config, list(spec.overrides))
    vocab, seq_len = _data_info(spec, base)
    micro = int(spec.hparams.micro_batch or base.trainer.micro_batch)
    uri = tracking_uri(spec)
    runs: list[PlannedRun] = []
    for objective in spec.objectives:
        table = _size_table(spec, objective, vocab, seq_len)
        for budget, u, epochs in _cells(spec):
            sizes = table if budget is None else centred_sizes(spec, objective, budget, table)
            for sz in sizes:
                r = _plan_run(spec, objective, budget, u, epochs, sz, micro, seq_len)
                if budget is not None:
                    flag_tokens_per_param(spec, r)
                runs.append(r)
    plan = Plan(spec.name, spec.base_config, spec.out_dir, uri, spec.experiment, vocab, seq_len, runs)
    for r in runs:
        r.overrides = _overrides(spec, plan, r)
    return plan


def _plan_run(spec: Any, objective: str, budget: float | None, u: float | None, epochs: float | None, sz: Size,
              micro: int, seq_len: int) -> PlannedRun:
    h = spec.hparams
    fpt = sz.fpt(spec.flops)
    gb = _batch(spec, budget, micro)
    tps = gb * seq_len
    d_target = budget / fpt if budget is not None else u * epochs
    steps = int(round(d_target / tps))
    name = _run_name(objective, budget, u, epochs, sz.name)
    r = PlannedRun(
        name=name, objective=objective, budget=budget if budget is not None else fpt * d_target, size=sz.name,
        model_overrides=sz.overrides, num_layers=sz.num_layers, hidden_size=sz.hidden_size, n_params=sz.n_params,
        n_non_embedding=sz.n_non_embedding, flops_per_token=fpt, flops_per_token_kernel=sz.fpt_kernel,
        flops_per_token_6nd=sz.fpt_6nd, flops_convention=spec.flops, seq_len=seq_len, global_batch=gb,
        micro_batch=micro, steps=steps, tokens=steps * tps, compute=fpt * steps * tps, schedule=h.schedule,
        decay_fraction=h.decay_fraction, run_dir=str(Path(spec.out_dir) / name),
        unique_tokens=int(round(u)) if u is not None else 0,
    )
    what = "C / FLOPs-per-token" if budget is not None else "U x epochs"
    if d_target < tps:
        r.ok = False
        r.reason = f"D = {what} = {d_target:.3g} tokens is less than one batch ({gb} x {seq_len} = {tps} tokens)"
    elif steps < h.min_steps:
        r.ok = False
        r.reason = (f"{steps} steps < hparams.min_steps={h.min_steps} (this size needs "
                    + (f"C >= {h.min_steps * tps * fpt:.3g} FLOPs" if budget is not None
                       else f"U x epochs >= {h.min_steps * tps:.3g} tokens") + f" at global_batch={gb})")
    elif u is not None and u < seq_len:
        r.ok = False
        r.reason = f"data.unique_tokens={u:.3g} is less than one sequence ({seq_len} tokens)"
    _hparams(spec, r)
    return r


def _hparams(spec: Any, r: PlannedRun) -> None:
    h = spec.hparams
    r.lr = h.lr * (h.lr_ref_width / r.hidden_size) ** h.lr_width_exponent
    r.min_lr = r.lr * h.min_lr_ratio
    steps = max(r.steps, 1)
    stable_end = steps - int(math.ceil(h.decay_fraction * steps)) if h.schedule == "wsd" else steps - 1
    w = int(round(h.warmup_fraction * steps))
    w = min(max(w, h.warmup_min_steps), h.warmup_max_steps)
    r.warmup_steps = max(0, min(w, stable_end))
    r.eval_interval = max(1, steps // max(h.evals_per_run, 1))
    r.save_interval = max(1, steps // max(h.saves_per_run, 1))


def _q(v: Any) -> str:
    return "'" + str(v) + "'"  # a quoted dotlist value stays a string (MLflow tags are strings)


def _overrides(spec: Any, plan: Plan, r: PlannedRun) -> list[str]:
    ovr = list(spec.overrides) + list(r.model_overrides) + [
        f"diffusion.objective={r.objective}",
        f"trainer.max_steps={r.steps}",
        f"trainer.global_batch={r.global_batch}",
        f"trainer.micro_batch={r.micro_batch}",
        f"trainer.eval_interval={r.eval_interval}",
        f"trainer.save_interval={r.save_interval}",
        f"trainer.run_dir={r.run_dir}",
        f"optim.lr={r.lr!r}",
        f"optim.min_lr={r.min_lr!r}",
        f"optim.warmup_steps={r.warmup_steps}",
        f"optim.lr_schedule={r.schedule}",
        f"optim.decay_fraction={r.decay_fraction}",
        "tracking.enabled=true",
        f"tracking.uri={plan.tracking_uri}",
        f"tracking.experiment={plan.experiment}",
        f"tracking.run_name={r.name}",
    ] + ([f"data.unique_tokens={r.unique_tokens}"] if r.unique_tokens else [])
    tags = {TAG_SWEEP: plan.sweep_id, TAG_RUN: r.name, "objective": r.objective, "size": r.size,
            "N": r.n_params, "N_non_embedding": r.n_non_embedding, "D": r.tokens, "C": f"{r.compute:.6g}",
            "budget": f"{r.budget:.6g}", "flops": r.flops_convention,
            **({"U": r.unique_tokens, "epochs": f"{r.epochs:.6g}"} if r.unique_tokens else {})}
    ovr += [f"tracking.tags.{k}={_q(v)}" for k, v in tags.items()]
    return ovr


def check_overrides(plan: Plan) -> None:
    """Every feasible run's overrides load as a valid config (catches typos before launching)."""
    for r in plan.feasible:
        cfg = load_config(plan.base_config, r.train_overrides("0" * 32))
        if OmegaConf.select(cfg, "trainer.max_steps") != r.steps:
            raise MegadiffError(f"run {r.name}: overrides did not set trainer.max_steps")


def format_table(plan: Plan) -> str:
    dc = any(r.unique_tokens for r in plan.runs)
    conv = plan.runs[0].flops_convention if plan.runs else "kernel"
    hdr = ["run", "N", "D", "D/N"] + (["U", "epochs"] if dc else []) + [
        f"C ({conv})", "C (6nd)" if conv == "kernel" else "C (kernel)", "steps", "batch", "lr", "warmup", "status"]
    rows = []
    for r in plan.runs:
        dev = (r.compute / r.budget - 1) * 100 if r.ok else 0.0
        other = r.tokens * (r.flops_per_token_6nd if conv == "kernel" else r.flops_per_token_kernel)
        rows.append([r.name, f"{r.n_params / 1e6:.2f}M", f"{r.tokens:.3g}", f"{r.tokens_per_param:.1f}"]
                    + ([f"{r.unique_tokens:.3g}", f"{r.epochs:.3g}"] if dc else []) + [
            (f"{r.compute:.3g}" + ("" if dc else f" ({dev:+.1f}%)")) if r.ok else "-",
            f"{other:.3g}" if r.ok else "-", str(r.steps), str(r.global_batch),
            f"{r.lr:.2e}", str(r.warmup_steps), ("ok" + (" (!)" if r.flag else "")) if r.ok else "REFUSED",
        ])
    widths = [max(len(hdr[i]), *(len(row[i]) for row in rows)) for i in range(len(hdr))]
    fmt = "  ".join("{:<" + str(w) + "}" for w in widths)
    lines = [
        f"sweep {plan.sweep_id}: {len(plan.feasible)} runs planned, {len(plan.refused)} refused "
        f"(vocab {plan.vocab_size}, seq_len {plan.seq_len}; base {plan.base_config}; FLOPs convention {conv})",
        fmt.format(*hdr), fmt.format(*["-" * w for w in widths]),
    ]
    lines += [fmt.format(*row) for row in rows]
    for r in plan.refused:
        lines.append(f"refused {r.name}: {r.reason}")
    for r in plan.feasible:
        if r.flag:
            lines.append(f"(!) {r.name}: {r.flag}")
    if dc:
        return "\n".join(lines)
    budgets = sorted({r.budget for r in plan.runs})
    for obj in sorted({r.objective for r in plan.runs}):
        for b in budgets:
            n = sum(1 for r in plan.feasible if r.objective == obj and r.budget == b)
            if n == 0:
                lines.append(f"budget {b:.3g} ({obj}): too small for every model size in the ladder")
            elif n < 3:
                lines.append(f"budget {b:.3g} ({obj}): only {n} feasible sizes; its IsoFLOP parabola needs >= 3")
    return "\n".join(lines)
