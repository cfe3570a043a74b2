"""PNG plots of a sweep fit (matplotlib, Agg backend): IsoFLOP profiles, frontier, MDM vs AR."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from megadiff.sweeps import fit as F

MARKERS = {"mdlm": "o", "llada": "s", "ar": "^"}
COLORS = {"mdlm": "tab:blue", "llada": "tab:green", "ar": "tab:red"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
                ax.plot(grid, F.predict_loss(p3.params, grid, b / (p3.k * grid)), color=col, lw=1, ls="--")
        ax.set_xscale("log")
        _tidy_log_x(ax)
        ax.set_xlabel("parameters N")
        ax.set_ylabel("validation NELBO (nats/token)")
        ax.set_title(f"{obj}: IsoFLOP profiles\n(solid: parabola in log N, *: minimum; dashed: Approach 3)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    return _save(plt, fig, title, fits, path)


def plot_frontier(obs, fits, path: Path, title: str, extra_c: Sequence[float] = ()) -> Path:
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    cgrid = _c_range(obs, extra_c)
    for obj in sorted({o.objective for o in obs}):
        col, mk = COLORS.get(obj, "k"), MARKERS.get(obj, "o")
        rows = [o for o in obs if o.objective == obj]
        ax1.scatter([o.c for o in rows], [o.loss for o in rows], color=col, marker=mk, alpha=0.5, s=25,
                    label=f"{obj} runs")
        p3 = fits.get(obj, {}).get("approach3")
        iso = fits.get(obj, {}).get("approach2")
        if p3 is not None:
            opt = F.optimal_allocation(p3.params, cgrid, p3.k)
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
        ax.legend(fontsize=8)
        _tidy_log_x(ax)
    return _save(plt, fig, title, fits, path)


def plot_mdm_vs_ar(obs, fits, comparison: dict[str, Any], path: Path, title: str,
                   extra_c: Sequence[float] = ()) -> Path | None:
    plt = _plt()
    key = next((k for k, v in comparison.items() if v.get("approach3")), None)
    if key is None:
        return None
    mdm = key.split("_vs_")[0]
    pm, pa = fits[mdm]["approach3"], fits["ar"]["approach3"]
    cgrid = _c_range(obs, extra_c)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    for obj, p in ((mdm, pm), ("ar", pa)):
        ax1.plot(cgrid, F.frontier_loss(p.params, p.k, cgrid), color=COLORS.get(obj, "k"), lw=2,
                 label=f"{obj} frontier (E={p.params['E']:.3g})")
        rows = [o for o in obs if o.objective == obj]
        ax1.scatter([o.c for o in rows], [o.loss for o in rows], color=COLORS.get(obj, "k"),
                    marker=MARKERS.get(obj, "o"), alpha=0.5, s=25)
    ax1.set_xscale("log")
    ax1.set_xlabel("training compute C (FLOPs)")
    ax1.set_ylabel("validation NELBO / NLL (nats/token)")
    ax1.set_title(f"{mdm} vs ar: compute-optimal loss")
    mult = np.array([F.compute_multiplier(pm.params, pm.k, pa.params, pa.k, c) for c in cgrid])
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
    ax2.set_title(f"compute {mdm} needs to match ar's loss at C")
    for ax in (ax1, ax2):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        _tidy_log_x(ax)
    return _save(plt, fig, title, {k: v for k, v in fits.items() if k in (mdm, "ar")}, path)


def make_all(obs, fits, comparison, out_dir: Path, title: str, extra_c: Sequence[float] = ()) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    out = [plot_isoflop(obs, fits, out_dir / "isoflop.png", title),
           plot_frontier(obs, fits, out_dir / "frontier.png", title, extra_c)]
    p = plot_mdm_vs_ar(obs, fits, comparison, out_dir / "mdm_vs_ar.png", title, extra_c)
    return out + ([p] if p else [])
