"""PNG plots of a sweep fit (matplotlib, Agg backend): IsoFLOP profiles, frontier, MDM vs AR."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from megadiff.sweeps import fit as F

_MARKERS = ("o", "^", "s", "D", "v", "P")
_COLORS = ("tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange", "tab:brown")


def _style(obs, obj: str) -> tuple[str, str]:
    """(colour, marker) of an objective: by its position among the sweep's objectives (no name tests)."""
    i = sorted({o.objective for o in obs}).index(obj) if obj in {o.objective for o in obs} else 0
    return _COLORS[i % len(_COLORS)], _MARKERS[i % len(_MARKERS)]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:  # a panel with nothing fitted has nothing to label
        ax.legend(fontsize=8)


def _tidy_log_x(ax) -> None:
    from matplotlib.ticker import NullFormatter

    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels on a short log axis overlap


def _flag(fig, fits) -> None:
    warned = [obj for obj, f in fits.items() if f.get("approach3") is not None and f["approach3"].warnings()]
    if warned:
        fig.text(0.5, 0.005, f"Approach 3 flagged for {', '.join(warned)}: the runs do not pin the law down "
                 "(see the notes in fit.txt)", ha="center", va="bottom", fontsize=9, color="tab:red")


def _save(plt, fig, title: str, fits, path: Path) -> Path:
    """Title, layout with room for the Approach 3 flag line, the flag, PNG, close."""
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    _flag(fig, fits)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _c_range(obs: Sequence[F.Observation], extra: Sequence[float] = ()) -> np.ndarray:
    cs = [o.budget for o in obs] + list(extra)
    return np.geomspace(min(cs) / 2, max(cs) * 4, 200)


def plot_isoflop(obs, fits, path: Path, title: str) -> Path:
    plt = _plt()
    objectives = sorted({o.objective for o in obs})
    fig, axes = plt.subplots(1, len(objectives), figsize=(6.5 * len(objectives), 4.8), squeeze=False)
    budgets = sorted({o.budget for o in obs})
    cmap = plt.get_cmap("viridis")
    for ax, obj in zip(axes[0], objectives):
        iso = fits.get(obj, {}).get("approach2")
        p3 = fits.get(obj, {}).get("approach3")
        profiles = {p.budget: p for p in iso.profiles} if iso else {}
        for i, b in enumerate(budgets):
            col = cmap(i / max(1, len(budgets) - 1) * 0.9)
            rows = sorted((o for o in obs if o.objective == obj and o.budget == b), key=lambda o: o.n)
            if not rows:
                continue
            n = np.array([o.n for o in rows])
            ax.scatter(n, [o.loss for o in rows], color=col, zorder=3, label=f"C={b:.2g}")
            grid = np.geomspace(n.min() / 1.5, n.max() * 1.5, 100)
            pr = profiles.get(b)
            if pr is not None:
                c0, c1, c2 = pr.coeffs
                x = np.log(grid)
                ax.plot(grid, c0 + c1 * x + c2 * x * x, color=col, lw=1.5)
                ax.scatter([pr.n_opt], [pr.l_opt], marker="*", s=180, color=col, edgecolor="k", zorder=4)
            if p3 is not None:
                ax.plot(grid, F.predict_loss(p3.params, grid, b / p3.law(grid)), color=col, lw=1, ls="--")
        ax.set_xscale("log")
        _tidy_log_x(ax)
        ax.set_xlabel("parameters N")
        ax.set_ylabel("validation NELBO (nats/token)")
        ax.set_title(f"{obj}: IsoFLOP profiles\n(solid: parabola in log N, *: minimum; dashed: Approach 3)")
        ax.grid(True, which="both", alpha=0.3)
        _legend(ax)
    return _save(plt, fig, title, fits, path)


def plot_frontier(obs, fits, path: Path, title: str, extra_c: Sequence[float] = ()) -> Path:
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    cgrid = _c_range(obs, extra_c)
    for obj in sorted({o.objective for o in obs}):
        col, mk = _style(obs, obj)
        rows = [o for o in obs if o.objective == obj]
        p3 = fits.get(obj, {}).get("approach3")
        cv = p3.convention if p3 is not None else "kernel"
        ax1.scatter([o.compute(cv) for o in rows], [o.loss for o in rows], color=col, marker=mk, alpha=0.5, s=25,
                    label=f"{obj} runs")
        iso = fits.get(obj, {}).get("approach2")
        if p3 is not None:
            opt = F.optimal_allocation(p3.params, cgrid, p3.law)
            ax1.plot(cgrid, opt["L_opt"], color=col, lw=2, label=f"{obj} Approach 3 frontier")
            ex = p3.exponents
            ax2.plot(cgrid, opt["N_opt"], color=col, lw=2, label=f"{obj} N_opt ∝ C^{ex['a']:.2f}")
            ax2.plot(cgrid, opt["D_opt"], color=col, lw=2, ls="--", label=f"{obj} D_opt ∝ C^{ex['b']:.2f}")
        if iso is not None and iso.profiles:
            cs = [p.budget for p in iso.profiles]
            ax1.scatter(cs, [p.l_opt for p in iso.profiles], color=col, marker="*", s=160, edgecolor="k",
                        zorder=4, label=f"{obj} IsoFLOP minima")
            ax2.scatter(cs, [p.n_opt for p in iso.profiles], color=col, marker="*", s=140, edgecolor="k", zorder=4)
            ax2.scatter(cs, [p.d_opt for p in iso.profiles], color=col, marker="D", s=50, edgecolor="k", zorder=4)
    ax1.set_xscale("log")
    ax1.set_xlabel("training compute C (FLOPs)")
    ax1.set_ylabel("validation NELBO (nats/token)")
    ax1.set_title("loss vs compute")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("training compute C (FLOPs)")
    ax2.set_ylabel("N_opt (params), D_opt (tokens)")
    ax2.set_title("compute-optimal allocation\n(lines: Approach 3; * N, ◆ D: IsoFLOP minima)")
    for ax in (ax1, ax2):
        ax.grid(True, which="both", alpha=0.3)
        _legend(ax)
        _tidy_log_x(ax)
    return _save(plt, fig, title, fits, path)


def plot_mdm_vs_ar(obs, fits, comparison: dict[str, Any], path: Path, title: str,
                   extra_c: Sequence[float] = ()) -> Path | None:
    plt = _plt()
    key = next((k for k, v in comparison.items() if v.get("approach3")), None)
    if key is None:
        return None
    mdm, arn = key.split("_vs_")
    pm, pa = fits[mdm]["approach3"], fits[arn]["approach3"]
    cgrid = _c_range(obs, extra_c)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    for obj, p in ((mdm, pm), (arn, pa)):
        col, mk = _style(obs, obj)
        ax1.plot(cgrid, F.frontier_loss(p.params, p.law, cgrid), color=col, lw=2,
                 label=f"{obj} frontier (E={p.params['E']:.3g})")
        rows = [o for o in obs if o.objective == obj]
        ax1.scatter([o.compute(p.convention) for o in rows], [o.loss for o in rows], color=col, marker=mk,
                    alpha=0.5, s=25)
    ax1.set_xscale("log")
    ax1.set_xlabel("training compute C (FLOPs)")
    ax1.set_ylabel("validation NELBO / NLL (nats/token)")
    ax1.set_title(f"{mdm} vs {arn}: compute-optimal loss ({pm.convention} FLOPs)")
    mult = np.array([F.compute_multiplier(pm.params, pm.law, pa.params, pa.law, c) for c in cgrid[::5]])
    cgrid = cgrid[::5]
    ok = np.isfinite(mult) & (mult > 0)
    ax2.plot(cgrid[ok], mult[ok], color="k", lw=2, label="point estimate")
    rows = comparison[key]["approach3"]
    with_ci = [r for r in rows if "multiplier_ci" in r and np.all(np.isfinite(r["multiplier_ci"]))]
    if with_ci:
        cs = np.array([r["C"] for r in with_ci])
        lo = np.array([r["multiplier_ci"][0] for r in with_ci])
        hi = np.array([r["multiplier_ci"][1] for r in with_ci])
        mid = np.array([r["multiplier"] for r in with_ci])
        ax2.errorbar(cs, mid, yerr=[np.maximum(mid - lo, 0), np.maximum(hi - mid, 0)], fmt="o", color="tab:purple",
                     capsize=4, label="bootstrap interval")
    if not ok.all():
        ax2.text(0.02, 0.02, f"{(~ok).sum()} of {len(ok)} C values: the MDM never reaches the AR loss",
                 transform=ax2.transAxes, fontsize=8)
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.axhline(1.0, color="gray", lw=1, ls=":")
    ax2.set_xlabel("AR compute C (FLOPs)")
    ax2.set_ylabel(f"compute multiplier ({mdm} C' / C)")
    ax2.set_title(f"compute {mdm} needs to match {arn}'s loss at C")
    for ax in (ax1, ax2):
        ax.grid(True, which="both", alpha=0.3)
        _legend(ax)
        _tidy_log_x(ax)
    return _save(plt, fig, title, {k: v for k, v in fits.items() if k in (mdm, arn)}, path)


def plot_residuals(obs, fits, excluded, path: Path, title: str) -> Path | None:
    """Approach 3 log-residuals per run (excluded runs as crosses, against the same fit)."""
    objectives = [o for o in sorted({o.objective for o in obs}) if fits.get(o, {}).get("approach3") is not None]
    if not objectives:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for obj in objectives:
        p3 = fits[obj]["approach3"]
        col, mk = _style(obs, obj)
        for rows, marker, lab in (([o for o in obs if o.objective == obj], mk, f"{obj} fitted"),
                                  ([o for o in excluded if o.objective == obj], "x", f"{obj} excluded")):
            if not rows:
                continue
            pred = F.predict_loss(p3.params, [o.n for o in rows], [o.d for o in rows])
            res = np.log([o.loss for o in rows]) - np.log(pred)
            axes[0].scatter([o.n for o in rows], res, color=col, marker=marker, s=30, label=lab)
            axes[1].scatter([o.d for o in rows], res, color=col, marker=marker, s=30, label=lab)
    for ax, xl in zip(axes, ("parameters N", "training tokens D")):
        ax.axhline(0.0, color="gray", lw=1, ls=":")
        ax.set_xscale("log")
        ax.set_xlabel(xl)
        ax.set_ylabel("log(loss / Approach 3 prediction)")
        ax.grid(True, which="both", alpha=0.3)
        _legend(ax)
        _tidy_log_x(ax)
    axes[0].set_title("residuals vs N")
    axes[1].set_title("residuals vs D")
    return _save(plt, fig, title, fits, path)


def plot_loss_vs_epochs(obs, dfits, path: Path, title: str) -> Path | None:
    """Data-constrained runs: loss vs epochs per objective, one line per (U, N), with the fitted law."""
    objectives = sorted({o.objective for o in obs if o.epochs > 1.01})
    if not objectives:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(objectives), figsize=(6.5 * len(objectives), 4.8), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, obj in zip(axes[0], objectives):
        rows = [o for o in obs if o.objective == obj]
        groups = sorted({(o.unique_tokens, o.n) for o in rows})
        f = dfits.get(obj)
        for i, (u, n) in enumerate(groups):
            col = cmap(i / max(1, len(groups) - 1) * 0.9)
            g = sorted((o for o in rows if (o.unique_tokens, o.n) == (u, n)), key=lambda o: o.epochs)
            ax.scatter([o.epochs for o in g], [o.loss for o in g], color=col, zorder=3,
                       label=f"U={u:.2g}, N={n:.2g}")
            if f is not None:
                ep = np.geomspace(min(o.epochs for o in g), max(o.epochs for o in g) * 2, 60)
                ax.plot(ep, f.predict(np.full_like(ep, n), u * ep, np.full_like(ep, u)), color=col, lw=1.2)
        ax.set_xscale("log")
        _tidy_log_x(ax)
        ax.set_xlabel("epochs over the U unique tokens")
        ax.set_ylabel("validation loss (nats/token)")
        extra = f"; fit R_D*={f.rd_star:.3g}, R_N*={f.rn_star:.3g}" if f is not None else ""
        ax.set_title(f"{obj}: loss vs epochs{extra}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def make_all(obs, fits, comparison, out_dir: Path, title: str, extra_c: Sequence[float] = (),
             excluded: Sequence = (), dfits: dict | None = None) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    out = [plot_isoflop(obs, fits, out_dir / "isoflop.png", title),
           plot_frontier(obs, fits, out_dir / "frontier.png", title, extra_c)]
    for p in (plot_mdm_vs_ar(obs, fits, comparison, out_dir / "mdm_vs_ar.png", title, extra_c),
              plot_residuals(obs, fits, excluded, out_dir / "residuals.png", title),
              plot_loss_vs_epochs(list(obs) + list(excluded), dfits or {}, out_dir / "loss_vs_epochs.png", title)):
        if p is not None:
            out.append(p)
    return out
