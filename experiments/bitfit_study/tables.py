"""The study's tables, built from the ``results.json`` files of an output folder and nothing else.

Each file says its task, method (+ BitFit terms), learning rate, seed, dev metrics and trainable
share; the study config only names and orders the settings. Per task and setting: the learning rate
whose run with the smallest seed has the best final dev metric is chosen, and the cell is the mean
+- sample standard deviation over the seeds at that rate.
"""

from __future__ import annotations

import dataclasses
import math
import re
import statistics
from pathlib import Path
from typing import Any

from experiments.bitfit_study.study import ADAPTER, RESULTS, Study, choose_lr, main_metric, read_results
from jaxpeft.errors import UserError

PEER_GLOB = "peer-lr*-seed*.json"
PEER_NAME = re.compile(r"peer-lr(.+)-seed(\d+)\.json")
_METRIC_NAMES = {"accuracy": "acc", "matthews_correlation": "MCC", "f1": "F1", "pearson": "Pearson"}


@dataclasses.dataclass
class Group:
    """The runs of one task and setting: ``{(learning_rate, seed): (results, folder)}``."""

    runs: dict[tuple[float, int], tuple[dict[str, Any], Path]] = dataclasses.field(default_factory=dict)
    #: The PyTorch peer's results (``peer-lr<lr>-seed<seed>.json``): ``{(learning_rate, seed): results}``.
    peers: dict[tuple[float, int], dict[str, Any]] = dataclasses.field(default_factory=dict)

    @property
    def selection_seed(self) -> int:
        return min(seed for _, seed in self.runs)

    def grid(self) -> dict[float, float]:
        s = self.selection_seed
        return {lr: main_metric(res) for (lr, seed), (res, _) in self.runs.items() if seed == s}

    def chosen_lr(self) -> float:
        return choose_lr(self.grid())  # type: ignore[return-value]

    def at_chosen(self) -> list[tuple[int, dict[str, Any], Path]]:
        lr = self.chosen_lr()
        return sorted((seed, res, d) for (r, seed), (res, d) in self.runs.items() if r == lr)

    def values(self) -> list[float]:
        return [main_metric(res) for _, res, _ in self.at_chosen()]

    def peer_values(self) -> list[float]:
        """The peer's final dev metrics at the chosen learning rate (one per seed it ran)."""
        lr = self.chosen_lr()
        return [main_metric(res) for (r, _), res in sorted(self.peers.items()) if r == lr]

    def trainable_pct(self) -> float:
        return next(iter(self.runs.values()))[0]["trainable_pct"]


def collect(out: str | Path, study: Study) -> tuple[dict[tuple[str, str], Group], int]:
    """``({(task, setting): Group}, number of results files read)`` for the study's tasks/settings."""
    out = Path(out)
    if not out.is_dir():
        raise UserError(f"results folder {str(out)!r} does not exist")
    groups: dict[tuple[str, str], Group] = {}
    n = 0
    for path in sorted(out.rglob(RESULTS)):
        res = read_results(path)
        try:
            setting = study.setting_at(path.parent.parent.name, res["method"],
                                       (res.get("method_options") or {}).get("bitfit_terms"))
            key = (res["task"], setting)
            lr, seed = float(res["config"]["learning_rate"]), int(res["seed"])
            main_metric(res)
        except (TypeError, KeyError, ValueError):
            continue  # not a results file of a finished run
        if setting is None or res["task"] not in study.tasks:
            continue
        groups.setdefault(key, Group()).runs[(lr, seed)] = (res, path.parent)
        n += 1
    for (task, setting), g in groups.items():
        for path in sorted((out / task / setting).glob(PEER_GLOB)):
            res = read_results(path)
            try:
                lr, seed = PEER_NAME.fullmatch(path.name).groups()
                res["final_dev"][res["main_metric"]]
            except (AttributeError, TypeError, KeyError):
                continue
            g.peers[(float(lr), int(seed))] = res
    return groups, n


def _task_header(task: str, metric: str) -> str:
    from jaxpeft.tasks import glue

    name = glue.get_task(task).folder if task in glue.TASKS else task.upper()   # pos, ner, squad
    return f"{name} ({_METRIC_NAMES.get(metric, metric)})"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}" if not math.isnan(x) else "nan"


def _lr(x: float) -> str:
    return f"{x:.0e}".replace("e-0", "e-")


def _span(values: list[float]) -> str:
    lo, hi = f"{min(values):.4f}", f"{max(values):.4f}"
    return lo if lo == hi else f"{lo}–{hi}"


def render(groups: dict[tuple[str, str], Group], study: Study, n_files: int, source: str) -> str:
    """Markdown: the accuracy table, then the learning-rate sweep."""
    tasks = [t for t in study.tasks if any((t, s) in groups for s in study.settings)]
    if not tasks:
        raise UserError(f"no results files of this study in {source}")
    metrics = {t: next(g for (tt, _), g in groups.items() if tt == t).at_chosen()[0][1]["main_metric"]
               for t in tasks}
    n_seeds = len(study.seeds)
    head = ["setting", "trainable %"] + [_task_header(t, metrics[t]) for t in tasks] + ["avg"]
    lines = ["| " + " | ".join(head) + " |", "|---|---:|" + "---:|" * (len(tasks) + 1)]
    notes = set()
    for name, s in study.settings.items():
        row, means, pcts = [s.label], [], []
        for t in tasks:
            g = groups.get((t, name))
            if g is None:
                row.append("—")
                continue
            vals = g.values()
            pcts += [res["trainable_pct"] for res, _ in g.runs.values()]
            mean = statistics.fmean(vals)
            means.append(mean)
            cell = _pct(mean) + (f" ± {_pct(statistics.stdev(vals))}" if len(vals) > 1 else "")
            if len(vals) != n_seeds:
                cell += f" (n={len(vals)})"
            if len(g.grid()) < len(study.learning_rates(t, name)):
                cell += " *"
                notes.add("* learning-rate grid not complete in the results files.")
            row.append(cell)
        row.insert(1, _span(pcts) if pcts else "—")
        row.append(_pct(statistics.fmean(means)) if len(means) == len(tasks) else "—")
        lines.append("| " + " | ".join(row) + " |")
    devices = sorted({res.get("devices", "?") for g in groups.values() for res, _ in g.runs.values()})
    lines += ["", f"Final dev metric x100, mean ± sample std over seeds at the chosen learning rate "
              f"({n_files} results files in `{source}`; {', '.join(devices)}). Trainable % counts the "
              "task head." + (" " + " ".join(sorted(notes)) if notes else ""), ""]
    # the sweep: one row per setting and learning rate
    lines += ["| setting | lr | " + " | ".join(_task_header(t, metrics[t]) for t in tasks) + " |",
              "|---|---:|" + "---:|" * len(tasks)]
    edge = False
    for name, s in study.settings.items():
        lrs = sorted({lr for t in tasks for (lr, _) in groups.get((t, name), Group()).runs})
        for lr in lrs:
            row = [s.label, _lr(lr)]
            for t in tasks:
                g = groups.get((t, name))
                grid = g.grid() if g else {}
                if lr not in grid:
                    row.append("—")
                    continue
                cell = _pct(grid[lr])
                if lr == g.chosen_lr():
                    at_edge = len(grid) > 1 and lr in (min(grid), max(grid))
                    edge |= at_edge
                    cell = f"**{cell}**" + ("†" if at_edge else "")
                row.append(cell)
            lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Dev metric x100 of the selection seed (the smallest) at each learning rate; bold: "
              "chosen." + (" †: chosen at the edge of the grid (a wider grid might do better)."
                           if edge else "")]
    if any(g.peers for g in groups.values()):
        lines += ["", *peer_table(groups, study, tasks, metrics)]
    return "\n".join(lines)


def peer_table(groups: dict[tuple[str, str], Group], study: Study, tasks: list[str],
               metrics: dict[str, str]) -> list[str]:
    """Ours against the PyTorch peer at the same config (the chosen learning rate): ``ours / peer``,
    each the mean over its seeds, and the difference."""
    lines = ["| setting | " + " | ".join(_task_header(t, metrics[t]) for t in tasks) + " |",
             "|---|" + "---:|" * len(tasks)]
    for name, s in study.settings.items():
        row = [s.label]
        for t in tasks:
            g = groups.get((t, name))
            peer = g.peer_values() if g else []
            if not peer:
                row.append("—")
                continue
            ours, theirs = statistics.fmean(g.values()), statistics.fmean(peer)
            row.append(f"{_pct(ours)} / {_pct(theirs)} ({100 * (ours - theirs):+.1f})")
        lines.append("| " + " | ".join(row) + " |")
    n_peer = sorted({len(g.peer_values()) for g in groups.values() if g.peers})
    lines += ["", "Ours / the PyTorch peer (transformers + peft, `benchmarks/peft_job.py`, the same config at "
              f"the chosen learning rate; {'/'.join(map(str, n_peer))} seed(s)), final dev metric x100, and "
              "ours minus the peer's."]
    return lines


def markers(name: str = "study-table") -> tuple[str, str]:
    """The two comment lines that enclose a driver-made table called ``name`` in a document."""
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def write_between_markers(doc: str | Path, table: str, name: str = "study-table") -> None:
    """Replaces what lies between the ``name`` markers of ``doc`` with ``table``."""
    doc = Path(doc)
    if not doc.is_file():
        raise UserError(f"document {doc} not found")
    begin, end = markers(name)
    text = doc.read_text()
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise UserError(f"{doc} needs one line {begin} followed by one line {end}")
    before, rest = text.split(begin)
    after = rest.split(end)[1]
    doc.write_text(f"{before}{begin}\n{table}\n{end}{after}")


def draw_curves(groups: dict[tuple[str, str], Group], study: Study, prefix: str | Path) -> list[Path]:
    """One figure per task, ``PREFIX_<task>.png``: the dev metric and the training loss against the
    step of every setting's run at its chosen learning rate (the selection seed). Empty when
    matplotlib is missing."""
    from jaxpeft.training import curves

    out = []
    for task in study.tasks:
        runs, metric = {}, "accuracy"
        for name, setting in study.settings.items():
            g = groups.get((task, name))
            if g is None:
                continue
            seed, res, folder = g.at_chosen()[0]
            metric = res["main_metric"]
            runs[f"{setting.label} ({_lr(g.chosen_lr())})"] = curves.read_log(folder)
        if runs:
            path = curves.plot_runs(runs, f"{prefix}_{task}.png", metric=metric,
                                    title=f"{task}: each setting at its chosen learning rate, seed {seed}")
            if path is not None:
                out.append(path)
    return out


def chosen_adapters(groups: dict[tuple[str, str], Group], tasks: list[str], setting: str) -> list[Path]:
    """Adapter folders of the runs at the chosen learning rate (all seeds) of ``setting``."""
    out = []
    for t in tasks:
        g = groups.get((t, setting))
        if g is not None:
            out += [d / ADAPTER for _, _, d in g.at_chosen() if (d / ADAPTER).is_dir()]
    return out
