"""Learning curves: the training loss and the dev metric against the step, drawn from a run's
``log.jsonl`` next to its ``results.json`` (matplotlib is a dependency: every run draws them)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

CURVES_FILE = "learning_curves.png"


def read_log(run_dir: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The ``train`` and ``eval`` records of a run's ``log.jsonl`` (a resumed run's later records
    replace the earlier ones of the same step)."""
    train: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        return [], []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("event") == "train":
            train[rec["step"]] = rec
        elif rec.get("event") == "eval":
            evals[rec["step"]] = rec
    return [train[k] for k in sorted(train)], [evals[k] for k in sorted(evals)]


def plot_run(run_dir: str | Path, title: str = "", metric: str = "accuracy") -> Path | None:
    """Draws ``learning_curves.png`` in ``run_dir``; ``None`` when the log has nothing to draw."""
    train, evals = read_log(run_dir)
    if not train and not evals:
        return None
    return plot_runs({"": (train, evals)}, Path(run_dir) / CURVES_FILE, title=title, metric=metric)


def plot_runs(runs: dict[str, tuple[Sequence[dict], Sequence[dict]]], out: str | Path, *, title: str = "",
              metric: str = "accuracy") -> Path:
    """One figure: the dev ``metric`` (left) and the training loss (right) of each labelled run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_m, ax_l) = plt.subplots(1, 2, figsize=(11, 4))
    for label, (train, evals) in runs.items():
        if evals:
            ax_m.plot([r["step"] for r in evals], [r.get(metric, float("nan")) for r in evals], marker="o",
                      ms=3, label=label or None)
        if train:
            ax_l.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, label=label or None)
    ax_m.set(xlabel="step", ylabel=f"dev {metric}", title="dev metric")
    ax_l.set(xlabel="step", ylabel="training loss", title="training loss")
    for ax in (ax_m, ax_l):
        ax.grid(alpha=0.3)
        if any(runs):
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
