"""Plots a person would rather look at than read: the loss curve of a run."""

from __future__ import annotations

import json
from pathlib import Path

from megadiff.utils.io import atomic_output_file


def plot_loss_curve(metrics_jsonl: Path, out_png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, loss, vsteps, vnelbo = [], [], [], []
    for line in Path(metrics_jsonl).read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            steps.append(rec["step"])
            loss.append(rec["loss"])
        if "val/nelbo" in rec:
            vsteps.append(rec["step"])
            vnelbo.append(rec["val/nelbo"])
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, loss, lw=1, alpha=0.8, label="train loss (NELBO estimate)")
    if vsteps:
        ax.plot(vsteps, vnelbo, "o-", lw=2, label="validation NELBO")
    ax.set_xlabel("step")
    ax.set_ylabel("nats / token")
    ax.set_title(f"{Path(metrics_jsonl).parent.name}: training curve")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_output_file(out_png) as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return out_png
