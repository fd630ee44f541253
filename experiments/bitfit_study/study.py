"""The BitFit study: its grid, the runs it makes and what each one trains with.

The grid (``config.py`` beside this file): tasks x settings (a method, its BitFit terms and a
learning-rate grid) x seeds. For every task and setting the learning rate is chosen on dev with the
smallest seed (the *selection seed*); the other seeds then run at the chosen rate. Every run writes
its own folder ``<out>/<task>/<setting>/lr<lr>-seed<seed>/`` (``spec.json``, ``results.json``,
``log.jsonl``, ``output.log`` and, for BitFit settings, an ``adapter/`` folder), in a worker process
it shares with the rest of its group's grid or seeds. A run whose ``results.json`` (and adapter,
where one is due) exists is skipped; a folder without them is wiped and run again; a finished run
made with other settings than the study asks for now is refused (:mod:`records
<experiments.bitfit_study.records>`). :mod:`driver <experiments.bitfit_study.driver>` runs the runs;
the tables are built from the ``results.json`` files alone (:mod:`tables
<experiments.bitfit_study.tables>`).

Every run's settings are ``jaxpeft.config.TrainConfig`` settings by flag name: the study config's
``get_config(task)``, then ``--set KEY=VALUE`` (:func:`parse_overrides`), then the grid's own
(:data:`GRID_KEYS`). A study whose ``get_study()`` says ``method_configs=True`` starts every run from
its method's own config for the task (``jaxpeft/configs/<method>.py``, what ``jaxpeft-train`` uses
by default) under ``get_config(task)``; its settings may leave ``learning_rates`` out to run at that
config's rate only (``config_defaults.py``: every method's defaults on every task).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import typing
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from experiments.bitfit_study import records
from jaxpeft import compute as compute_lib
from jaxpeft import config as config_lib
from jaxpeft import methods, options
from jaxpeft.errors import UserError
from jaxpeft.masks import BERT_BIAS_TERMS, BITFIT_ALIASES

DEFAULT_STUDY = Path(__file__).resolve().parent / "config.py"
#: Settings the grid decides; ``--set`` may not override them.
GRID_KEYS = ("method", "bitfit_terms", "task", "learning_rate", "seed", "output_dir", "config")
#: Settings the study's own flags decide (``--model``, ``--data_dir``).
OWN_FLAGS = ("model", "data_dir")
RESULTS, SPEC, ADAPTER = "results.json", "spec.json", "adapter"
#: Relative cost of a step, for the order runs start in (longest first).
_STEP_COST = {"full": 1.0, "bitfit": 0.68, "frozen": 0.34}


# ----------------------------------------------------------------------------- the grid


def canonical_terms(terms: str | None) -> frozenset[str] | None:
    """``"query,b_m2"`` -> ``{"query", "intermediate"}``; ``None`` (every bias) stays ``None``."""
    if not terms:
        return None
    out = set()
    for t in terms.split(","):
        t = BITFIT_ALIASES.get(t.strip().lower(), t.strip())
        if t:
            if t not in BERT_BIAS_TERMS:
                raise UserError(f"unknown BitFit term {t!r}; known terms: {', '.join(BERT_BIAS_TERMS)}")
            out.add(t)
    return frozenset(out)


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    label: str
    method: str
    learning_rates: tuple[float, ...]
    bitfit_terms: str | None = None
    #: Other training settings by flag name that this setting fixes (e.g. ``pooling="mean"``,
    #: ``packing=False``), as sorted ``(key, value)`` pairs; they apply over ``get_config(task)``.
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def saves_adapter(self) -> bool:
        return self.method == "bitfit"

    def method_options(self) -> dict[str, Any]:
        """The method's options this setting fixes (BitFit: its terms, ``None`` for every bias)."""
        return {"bitfit_terms": self.bitfit_terms} if self.method == "bitfit" or self.bitfit_terms else {}

    def matches(self, method: str, bitfit_terms: str | None) -> bool:
        """Whether a run of ``method`` with ``bitfit_terms`` is a run of this setting (settings that
        differ only in :attr:`options` are told apart by their folder; a method's earlier name is
        that method)."""
        if methods.ALIASES.get(method, method) != self.method:
            return False
        return method != "bitfit" or canonical_terms(bitfit_terms) == canonical_terms(self.bitfit_terms)


@dataclasses.dataclass(frozen=True)
class Study:
    path: Path
    tasks: tuple[str, ...]
    seeds: tuple[int, ...]
    settings: dict[str, Setting]
    get_config: Callable[[str], dict]
    method_configs: bool = False

    def base_config(self, task: str, method: str, model: str | None = None) -> dict[str, Any]:
        """What a run of ``method`` on ``task`` starts from: its method's config for the task (and
        ``model``'s width, where the config reads it; with ``method_configs``), then ``get_config(task)``."""
        values = dict(config_lib.load_config_file(config_lib.method_config_file(method), task, model)) \
            if self.method_configs else {}
        values.update(self.get_config(task))
        return values

    def learning_rates(self, task: str, setting: str, model: str | None = None) -> tuple[float, ...]:
        """The grid of ``setting`` on ``task``: its own rates, or the config's rate for the task
        (and ``model``)."""
        s = self.settings[setting]
        if s.learning_rates:
            return s.learning_rates
        values = self.base_config(task, s.method, model)
        return (float(values.get("learning_rate", config_lib.Optim.learning_rate)),)

    @property
    def selection_seed(self) -> int:
        return min(self.seeds)

    def setting_of(self, method: str, bitfit_terms: str | None) -> str | None:
        return next((n for n, s in self.settings.items() if s.matches(method, bitfit_terms)), None)

    def setting_at(self, folder: str, method: str, bitfit_terms: str | None) -> str | None:
        """The setting of a run of ``method`` with ``bitfit_terms`` found in the setting folder
        ``folder``: that folder's setting where the run matches it, else the first that matches."""
        s = self.settings.get(folder)
        return folder if s is not None and s.matches(method, bitfit_terms) else self.setting_of(method, bitfit_terms)

    def select(self, tasks: Sequence[str] | None = None, settings: Sequence[str] | None = None,
               seeds: Sequence[int] | None = None) -> "Study":
        """The same study restricted to some tasks / settings / seeds (each checked)."""
        tasks = [task_name(t) for t in tasks] if tasks else list(self.tasks)
        unknown = [s for s in settings or () if s not in self.settings]
        if unknown:
            raise UserError(f"unknown setting {unknown[0]!r}; settings of {self.path.name}: "
                            f"{', '.join(self.settings)}")
        chosen = {n: s for n, s in self.settings.items() if not settings or n in settings}
        seeds = tuple(seeds) if seeds else self.seeds
        if not seeds:
            raise UserError("no seeds to run")
        return dataclasses.replace(self, tasks=tuple(tasks), seeds=seeds, settings=chosen)


def task_name(task: str) -> str:
    """A study task's name: GLUE's (aliases resolved) or a named task of ``jaxpeft.tasks`` (pos, ner,
    squad: one data folder each, so a study of them runs one task per ``--tasks=T --data_dir=D``)."""
    from jaxpeft import tasks
    from jaxpeft.tasks import glue

    return task.lower() if task.lower() in tasks.NAMED else glue.get_task(task).name


def load_study(path: str | Path | None = None) -> Study:
    """Reads a study config file (``get_config(task)`` and ``get_study()``)."""
    path = Path(path) if path else DEFAULT_STUDY
    if not path.is_file():
        raise UserError(f"study config {path} not found")
    spec = importlib.util.spec_from_file_location(f"bitfit_study_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        raw = dict(module.get_study())
        settings = {name: Setting(name=name, label=s.get("label", name),
                                  method=methods.ALIASES.get(s["method"], s["method"]),
                                  learning_rates=tuple(float(x) for x in s.get("learning_rates") or ()),
                                  bitfit_terms=s.get("bitfit_terms"),
                                  options=tuple(sorted(dict(s.get("options") or {}).items())))
                    for name, s in raw["settings"].items()}
        study = Study(path, tuple(raw["tasks"]), tuple(int(x) for x in raw["seeds"]), settings,
                      module.get_config, bool(raw.get("method_configs", False)))
    except Exception as e:
        raise UserError(f"study config {path}: {type(e).__name__}: {e}") from None
    for t in study.tasks:
        task_name(t)
    for s in settings.values():
        methods.create(s.method, s.method_options())  # unknown method/term: fails here
        for key, _ in s.options:
            if key not in setting_types() or key in GRID_KEYS or key in OWN_FLAGS:
                raise UserError(f"study config {path}: setting {s.name!r}: {key!r} is not an option a "
                                "setting may fix (a flag of jaxpeft-train other than the grid's own)")
        if not s.learning_rates and not study.method_configs:
            raise UserError(f"study config {path}: setting {s.name!r} has no learning rate (only a study "
                            "with method_configs=True runs at its configs' rates)")
    return study


@dataclasses.dataclass(frozen=True)
class Run:
    task: str
    setting: str
    learning_rate: float
    seed: int

    @property
    def rel(self) -> str:
        return f"{self.task}/{self.setting}/lr{self.learning_rate:g}-seed{self.seed}"

    @property
    def group(self) -> tuple[str, str]:
        return self.task, self.setting


def setting_types() -> dict[str, tuple[type, bool]]:
    """Every setting by flag name: ``(its type, whether it may be None)``. The flag names of
    ``jaxpeft.config.TrainConfig``: its own fields, its groups', the compute fields and every
    method's options."""
    owners: list[tuple[type, Iterable[str]]] = [
        (config_lib.TrainConfig, [f.name for f in dataclasses.fields(config_lib.TrainConfig)
                                  if f.name not in config_lib.GROUPS and f.default is not dataclasses.MISSING]),
        *[(cls, [f.name for f in dataclasses.fields(cls)]) for cls in config_lib.GROUPS.values()],
        (compute_lib.Compute, list(compute_lib.fields())),
        *[(cls, [f.name for f in dataclasses.fields(cls)]) for cls in methods.REGISTRY.values()]]
    out: dict[str, tuple[type, bool]] = {}
    for cls, names in owners:
        hints = typing.get_type_hints(cls)
        for name in names:
            out.setdefault(name, (options.field_type(cls, name), type(None) in typing.get_args(hints[name])))
    return out


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["max_steps=3", "dtype=bfloat16"]`` -> ``{"max_steps": 3, "dtype": "bfloat16"}``, typed by
    the setting's field. Ranges, choices and whether a method takes an option are checked with the
    rest of each run's settings (``jaxpeft.config.from_flat``) when the :class:`Plan` is made."""
    types = setting_types()
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or key not in types:
            raise UserError(f"--set {item!r}: expected KEY=VALUE with KEY a training option "
                            f"(a flag of jaxpeft-train; see jaxpeft-train --help)")
        if key in GRID_KEYS:
            raise UserError(f"--set {key}: the study grid decides {key}")
        if key in OWN_FLAGS:
            raise UserError(f"--set {key}: use the study's --{key}")
        kind, optional = types[key]
        try:
            if optional and value.strip().lower() in ("none", "null"):
                out[key] = None
            else:
                out[key] = options.parse_bool(value) if kind is bool else kind(value)
        except Exception as e:  # noqa: BLE001 -- ValueError, argparse.ArgumentTypeError
            raise UserError(f"--set {item!r}: {e}") from None
    return out


class Plan:
    """The runs of a study for one output folder, and what each one's config is."""

    def __init__(self, study: Study, out: str | Path, *, model: str | None = None,
                 data_dir: str | None = None, overrides: Mapping[str, Any] | None = None):
        from types import SimpleNamespace

        from jaxpeft import tasks as jtasks
        from jaxpeft.tasks import glue

        self.study, self.out = study, Path(out)
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"output folder {str(out)!r} is a file")
        self.model = model or config_lib.TrainConfig.model
        from jaxpeft.models import hf_weights

        hf_weights.load_config(hf_weights.resolve_model_dir(self.model))  # a bad model fails now, once
        self.data_dir = str(Path(data_dir).resolve()) if data_dir else None
        self.overrides = dict(overrides or {})
        self._configs: dict[Run, config_lib.TrainConfig] = {}
        self.train_sizes: dict[str, int] = {}
        self.dev_sizes: dict[str, int] = {}
        for t in study.tasks:  # read now: a missing data folder fails before anything runs
            if t.lower() not in jtasks.NAMED:
                task = glue.get_task(t)
                self.train_sizes[t] = len(glue.load_split(task, "train", self.data_dir))
                self.dev_sizes[t] = sum(len(glue.load_split(task, s, self.data_dir)) for s in task.eval_splits)
                continue
            # pos, ner, squad: sentences / questions; their windows (the rows a run steps over) are at
            # least as many, so plan's steps and examples of these tasks are lower bounds
            named = jtasks.get(t, SimpleNamespace(data_dir=self.data_dir), 0)
            self.train_sizes[t] = named.size(named.read("train"))
            self.dev_sizes[t] = sum(named.size(named.read(s)) for s in named.eval_splits)
        for g in self.groups():  # a bad setting in the study config or --set fails now, once
            for run in self.grid_runs(g):
                self.config(run)

    def groups(self) -> list[tuple[str, str]]:
        return [(t, s) for t in self.study.tasks for s in self.study.settings]

    def grid_runs(self, group: tuple[str, str]) -> list[Run]:
        t, s = group
        return [Run(t, s, lr, self.study.selection_seed) for lr in self.study.learning_rates(t, s, self.model)]

    def known_lr(self, group: tuple[str, str]) -> float | None:
        """The group's rate when its grid has only one (nothing to choose, so no need to wait for
        the grid's result), else None."""
        rates = self.study.learning_rates(*group, self.model)
        return rates[0] if len(rates) == 1 else None

    def seed_runs(self, group: tuple[str, str], lr: float) -> list[Run]:
        return [Run(*group, lr, seed) for seed in self.study.seeds if seed != self.study.selection_seed]

    def folder(self, run: Run) -> Path:
        return self.out / run.rel

    def config(self, run: Run) -> config_lib.TrainConfig:
        """The training config of ``run``: the study config's settings for its task, ``--set``, then
        the grid's."""
        if run in self._configs:
            return self._configs[run]
        s = self.study.settings[run.setting]
        values = self.study.base_config(run.task, s.method, self.model)
        values.update(s.options)
        values.update(self.overrides)
        values.pop("bitfit_terms", None)   # the grid decides it (only settings of BitFit have it)
        values.update(method=s.method, **s.method_options(), task=run.task, seed=run.seed,
                      learning_rate=run.learning_rate, model=self.model, data_dir=self.data_dir,
                      output_dir=str(self.folder(run)), config=str(self.study.path))
        try:
            cfg = config_lib.from_flat(values)
        except UserError as e:
            raise UserError(f"{self.study.path.name}, run {run.rel}: {e}") from None
        self._configs[run] = cfg
        return cfg

    def spec(self, run: Run) -> dict[str, Any]:
        """What ``spec.json`` records: the run, its settings by flag name, whether it saves an adapter."""
        return {"run": dataclasses.asdict(run), "config": self.config(run).to_flat(),
                "save_adapter": self.study.settings[run.setting].saves_adapter}

    # -- sizes ----------------------------------------------------------------------------
    def steps(self, run: Run) -> tuple[int, int]:
        """``(train steps, evaluations)`` of ``run``, as a run counts them (a packed run's epochs fill
        as many steps as their packed rows do: at most these)."""
        cfg = self.config(run)
        o = cfg.optim
        n = self.train_sizes[run.task]
        if cfg.data.max_train_examples:
            n = min(n, cfg.data.max_train_examples)
        spe = math.ceil(n / o.batch_size)
        total = o.max_steps if o.max_steps > 0 else max(1, math.ceil(o.num_epochs * spe))
        every = cfg.run.eval_every if cfg.run.eval_every > 0 else spe
        return total, (total - 1) // every + 1

    def examples(self, run: Run) -> tuple[int, int]:
        """``(training examples, dev examples predicted)`` of ``run``."""
        cfg = self.config(run)
        total, evals = self.steps(run)
        dev = self.dev_sizes[run.task]
        if cfg.data.max_eval_examples:
            dev = min(dev, cfg.data.max_eval_examples * len(self._eval_splits(run.task)))
        return total * cfg.optim.batch_size, evals * dev

    @staticmethod
    def _eval_splits(task: str) -> tuple[str, ...]:
        from jaxpeft import tasks
        from jaxpeft.tasks import glue

        return ("dev",) if task in tasks.NAMED else glue.get_task(task).eval_splits

    def cost(self, run: Run) -> float:
        cfg = self.config(run)
        return self.examples(run)[0] * cfg.data.max_seq_length * _STEP_COST.get(cfg.method, 1.0)

    def all_runs(self) -> list[Run]:
        """Every run the full study makes: grid runs, then the seeds of each group -- at the chosen
        rate where the group's grid is done; else, to count them, at a rate where another seed has
        finished already, or at the grid's first rate."""
        out = []
        for g in self.groups():
            grid = self.grid_runs(g)
            lr = choose_lr(self.grid_metrics(g)) if all(map(self.is_complete, grid)) else None
            if lr is None:
                seen = [r.learning_rate for r in grid for r in self.seed_runs(g, r.learning_rate)
                        if self.is_complete(r)]
                lr = seen[0] if seen else grid[0].learning_rate
            out += grid + self.seed_runs(g, lr)
        return out

    # -- state on disk ----------------------------------------------------------------------
    def is_complete(self, run: Run) -> bool:
        d = self.folder(run)
        try:
            json.loads((d / RESULTS).read_text())
        except (OSError, json.JSONDecodeError):
            return False
        return not self.study.settings[run.setting].saves_adapter or \
            (d / ADAPTER / "adapter_model.safetensors").is_file()

    def check_not_stale(self) -> None:
        """Refuses to reuse finished runs made with other settings than the study asks for now
        (:func:`records.differences <experiments.bitfit_study.records.differences>`)."""
        stale = []
        for g in self.groups():
            for lr in self.study.learning_rates(*g, self.model):
                for seed in self.study.seeds:
                    run = Run(*g, lr, seed)
                    if not self.is_complete(run):
                        continue
                    try:
                        old = json.loads((self.folder(run) / SPEC).read_text())["config"]
                    except (OSError, json.JSONDecodeError, KeyError, TypeError):
                        old = None
                    results = read_results(self.folder(run) / RESULTS) or {}
                    diff = records.differences(old, results, self.config(run))
                    if diff is None or diff:
                        stale.append((run, (diff or [])[:3]))
        if stale:
            run, diff = stale[0]
            raise UserError(f"{len(stale)} finished run(s) in {self.out} were made with other settings, "
                            f"e.g. {run.rel} (differs in {', '.join(diff) or 'spec.json'}); "
                            f"use another --out or delete them")

    def grid_metrics(self, group: tuple[str, str]) -> dict[float, float]:
        """Dev metric of the selection seed at each learning rate, from the results files."""
        out = {}
        for run in self.grid_runs(group):
            res = read_results(self.folder(run) / RESULTS)
            if res is not None:
                out[run.learning_rate] = main_metric(res)
        return out


# ----------------------------------------------------------------------------- results


def read_results(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def main_metric(results: Mapping[str, Any]) -> float:
    """The task's main dev metric at the end of training (``final_dev``), as a fraction: span tasks
    report SQuAD's EM and F1 in percent, as the official script does."""
    v = results["final_dev"][results["main_metric"]]
    if v is None:
        return float("nan")
    return float(v) / (100.0 if results.get("task_kind") == "span" else 1.0)


def choose_lr(metrics: Mapping[float, float]) -> float | None:
    """The learning rate with the best metric; NaN counts as worst; a tie goes to the smaller rate."""
    if not metrics:
        return None
    key = lambda lr: (-math.inf if math.isnan(metrics[lr]) else metrics[lr], -lr)  # noqa: E731
    return max(metrics, key=key)


def describe_plan(plan: Plan) -> str:
    """The budget of the whole study: runs, steps and examples per task."""
    lines = ["| task | train | epochs | seq | batch | steps/run | runs | train examples | dev examples |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    runs = plan.all_runs()
    tot_runs = tot_train = tot_dev = 0
    for t in plan.study.tasks:
        rs = [r for r in runs if r.task == t]
        ex = [plan.examples(r) for r in rs]
        cfg = plan.config(rs[0])
        n_train, n_dev = sum(e[0] for e in ex), sum(e[1] for e in ex)
        lines.append(f"| {t} | {plan.train_sizes[t]:,} | {cfg.optim.num_epochs:g} | {cfg.data.max_seq_length} | "
                     f"{cfg.optim.batch_size} | {plan.steps(rs[0])[0]:,} | {len(rs)} | {n_train:,} | {n_dev:,} |")
        tot_runs, tot_train, tot_dev = tot_runs + len(rs), tot_train + n_train, tot_dev + n_dev
    lines.append(f"| all | | | | | | {tot_runs} | {tot_train:,} | {tot_dev:,} |")
    return "\n".join(lines)
