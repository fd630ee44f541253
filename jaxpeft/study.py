"""The BitFit study driver: a grid of training runs, resumable, several at a time on one device.

The grid (``configs/study.py``): tasks x settings (a method, its BitFit terms and a learning-rate
grid) x seeds. For every task and setting the learning rate is chosen on dev with the smallest seed
(the *selection seed*); the other seeds then run at the chosen rate. Every run is a subprocess that
writes its own folder ``<out>/<task>/<setting>/lr<lr>-seed<seed>/`` (``spec.json``, ``results.json``,
``log.jsonl``, ``output.log`` and, for BitFit settings, an ``adapter/`` folder). A run whose
``results.json`` (and adapter, where one is due) exists is skipped; a folder without them is wiped
and run again. The tables are built from the ``results.json`` files alone (:mod:`jaxpeft.study_table`).
"""

from __future__ import annotations

import dataclasses
import heapq
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from jaxpeft import config as config_lib
from jaxpeft.errors import UserError
from jaxpeft.masks import BERT_BIAS_TERMS, BITFIT_ALIASES

DEFAULT_STUDY = config_lib.CONFIG_DIR / "study.py"
#: Keys the grid decides; ``--set`` may not override them.
GRID_KEYS = ("method", "bitfit_terms", "task", "learning_rate", "seed", "output_dir", "config")
#: Config keys that may differ between an earlier run and now without making the run stale.
NOT_COMPARED = ("output_dir", "data_dir", "config", "progress")
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

    @property
    def saves_adapter(self) -> bool:
        return self.method == "bitfit"

    def matches(self, method: str, bitfit_terms: str | None) -> bool:
        """Whether a run of ``method`` with ``bitfit_terms`` is a run of this setting."""
        if method != self.method:
            return False
        return method != "bitfit" or canonical_terms(bitfit_terms) == canonical_terms(self.bitfit_terms)


@dataclasses.dataclass(frozen=True)
class Study:
    path: Path
    tasks: tuple[str, ...]
    seeds: tuple[int, ...]
    settings: dict[str, Setting]
    get_config: Callable[[str], dict]

    @property
    def selection_seed(self) -> int:
        return min(self.seeds)

    def setting_of(self, method: str, bitfit_terms: str | None) -> str | None:
        return next((n for n, s in self.settings.items() if s.matches(method, bitfit_terms)), None)

    def select(self, tasks: Sequence[str] | None = None, settings: Sequence[str] | None = None,
               seeds: Sequence[int] | None = None) -> "Study":
        """The same study restricted to some tasks / settings / seeds (each checked)."""
        from jaxpeft import data

        tasks = [data.get_task(t).name for t in tasks] if tasks else list(self.tasks)
        unknown = [s for s in settings or () if s not in self.settings]
        if unknown:
            raise UserError(f"unknown setting {unknown[0]!r}; settings of {self.path.name}: "
                            f"{', '.join(self.settings)}")
        chosen = {n: s for n, s in self.settings.items() if not settings or n in settings}
        seeds = tuple(seeds) if seeds else self.seeds
        if not seeds:
            raise UserError("no seeds to run")
        return dataclasses.replace(self, tasks=tuple(tasks), seeds=seeds, settings=chosen)


def load_study(path: str | Path | None = None) -> Study:
    """Reads a study config file (``get_config(task)`` and ``get_study()``)."""
    from jaxpeft import data, methods

    path = Path(path) if path else DEFAULT_STUDY
    if not path.is_file():
        raise UserError(f"study config {path} not found")
    spec = importlib.util.spec_from_file_location(f"jaxpeft_study_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        raw = dict(module.get_study())
        settings = {name: Setting(name=name, label=s.get("label", name), method=s["method"],
                                  learning_rates=tuple(float(x) for x in s["learning_rates"]),
                                  bitfit_terms=s.get("bitfit_terms"))
                    for name, s in raw["settings"].items()}
        study = Study(path, tuple(raw["tasks"]), tuple(int(x) for x in raw["seeds"]), settings,
                      module.get_config)
    except Exception as e:
        raise UserError(f"study config {path}: {type(e).__name__}: {e}") from None
    for t in study.tasks:
        data.get_task(t)
    for s in settings.values():
        methods.create(s.method, {"bitfit_terms": s.bitfit_terms})  # unknown method/term: fails here
        if not s.learning_rates:
            raise UserError(f"study config {path}: setting {s.name!r} has no learning rate")
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


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["max_steps=3", "dtype=bfloat16"]`` -> typed TrainConfig values."""
    types = config_lib._field_types()
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or key not in types:
            raise UserError(f"--set {item!r}: expected KEY=VALUE with KEY a training option "
                            f"(see scripts/train.py --help)")
        if key in GRID_KEYS:
            raise UserError(f"--set {key}: the study grid decides {key}")
        kind = types[key]
        try:
            out[key] = config_lib._parse_bool(value) if kind is bool else kind(value)
        except (ValueError, TypeError) as e:
            raise UserError(f"--set {item!r}: {e}") from None
    return out


class Plan:
    """The runs of a study for one output folder, and what each one's config is."""

    def __init__(self, study: Study, out: str | Path, *, model: str | None = None,
                 data_dir: str | None = None, overrides: Mapping[str, Any] | None = None):
        from jaxpeft import data

        self.study, self.out = study, Path(out)
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"output folder {str(out)!r} is a file")
        self.model = model or config_lib.TrainConfig.model
        from jaxpeft.models import hf_weights

        hf_weights.load_config(hf_weights.resolve_model_dir(self.model))  # a bad model fails now, once
        self.data_dir = str(Path(data_dir).resolve()) if data_dir else None
        self.overrides = dict(overrides or {})
        self.train_sizes: dict[str, int] = {}
        self.dev_sizes: dict[str, int] = {}
        for t in study.tasks:  # read now: a missing data folder fails before anything runs
            task = data.get_task(t)
            self.train_sizes[t] = len(data.load_split(task, "train", self.data_dir))
            self.dev_sizes[t] = sum(len(data.load_split(task, s, self.data_dir)) for s in task.eval_splits)

    def groups(self) -> list[tuple[str, str]]:
        return [(t, s) for t in self.study.tasks for s in self.study.settings]

    def grid_runs(self, group: tuple[str, str]) -> list[Run]:
        t, s = group
        return [Run(t, s, lr, self.study.selection_seed) for lr in self.study.settings[s].learning_rates]

    def seed_runs(self, group: tuple[str, str], lr: float) -> list[Run]:
        return [Run(*group, lr, seed) for seed in self.study.seeds if seed != self.study.selection_seed]

    def folder(self, run: Run) -> Path:
        return self.out / run.rel

    def config(self, run: Run) -> dict[str, Any]:
        """The full training config of ``run`` (as ``TrainConfig.to_dict()``)."""
        s = self.study.settings[run.setting]
        values = dict(self.study.get_config(run.task))
        values.update(self.overrides)
        values.update(method=s.method, bitfit_terms=s.bitfit_terms, task=run.task, seed=run.seed,
                      learning_rate=run.learning_rate, model=self.model, data_dir=self.data_dir,
                      output_dir=str(self.folder(run)), config=str(self.study.path))
        try:
            return config_lib.TrainConfig(**values).to_dict()
        except TypeError as e:
            raise UserError(f"study config {self.study.path}: {e}") from None

    def spec(self, run: Run) -> dict[str, Any]:
        return {"run": dataclasses.asdict(run), "config": self.config(run),
                "save_adapter": self.study.settings[run.setting].saves_adapter}

    # -- sizes ----------------------------------------------------------------------------
    def steps(self, run: Run) -> tuple[int, int]:
        """``(train steps, evaluations)`` of ``run``, as the trainer will count them."""
        cfg = self.config(run)
        n = self.train_sizes[run.task]
        if cfg["max_train_examples"]:
            n = min(n, cfg["max_train_examples"])
        spe = math.ceil(n / cfg["batch_size"])
        total = cfg["max_steps"] if cfg["max_steps"] > 0 else max(1, math.ceil(cfg["num_epochs"] * spe))
        every = cfg["eval_every"] if cfg["eval_every"] > 0 else spe
        return total, (total - 1) // every + 1

    def examples(self, run: Run) -> tuple[int, int]:
        """``(training examples, dev examples predicted)`` of ``run``."""
        cfg = self.config(run)
        total, evals = self.steps(run)
        dev = self.dev_sizes[run.task]
        if cfg["max_eval_examples"]:
            dev = min(dev, cfg["max_eval_examples"] * len(self._eval_splits(run.task)))
        return total * cfg["batch_size"], evals * dev

    @staticmethod
    def _eval_splits(task: str) -> tuple[str, ...]:
        from jaxpeft import data

        return data.get_task(task).eval_splits

    def cost(self, run: Run) -> float:
        cfg = self.config(run)
        return self.examples(run)[0] * cfg["max_seq_length"] * _STEP_COST.get(cfg["method"], 1.0)

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
        """Refuses to reuse finished runs whose config differs from what the study asks now."""
        stale = []
        for g in self.groups():
            s = self.study.settings[g[1]]
            for lr in s.learning_rates:
                for seed in self.study.seeds:
                    run = Run(*g, lr, seed)
                    if not self.is_complete(run):
                        continue
                    try:
                        old = json.loads((self.folder(run) / SPEC).read_text())["config"]
                    except (OSError, json.JSONDecodeError, KeyError):
                        old = None
                    new = self.config(run)
                    old = _as_current(old)
                    diff = [k for k in new if k not in NOT_COMPARED and (old or {}).get(k) != new[k]]
                    if old is None or diff:
                        stale.append((run, diff[:3]))
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


def _as_current(old: dict[str, Any] | None) -> dict[str, Any] | None:
    """A run config written by an earlier version, in today's terms: keys added since take their
    defaults (which is what that version did), except ``dropout_impl``, whose default changed: runs
    written before it existed used ``random`` masks. ``remat`` booleans become policy names."""
    if old is None:
        return None
    old = {"dropout_impl": "random", **old}
    defaults = {f.name: f.default for f in dataclasses.fields(config_lib.TrainConfig)
                if f.default is not dataclasses.MISSING}
    out = {**defaults, **old}
    if isinstance(out.get("remat"), bool):
        out["remat"] = "layer" if out["remat"] else "none"
    return out


def read_results(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def main_metric(results: Mapping[str, Any]) -> float:
    """The task's main dev metric at the end of training (``final_dev``)."""
    v = results["final_dev"][results["main_metric"]]
    return float("nan") if v is None else float(v)


def choose_lr(metrics: Mapping[float, float]) -> float | None:
    """The learning rate with the best metric; NaN counts as worst; a tie goes to the smaller rate."""
    if not metrics:
        return None
    key = lambda lr: (-math.inf if math.isnan(metrics[lr]) else metrics[lr], -lr)  # noqa: E731
    return max(metrics, key=key)


# ----------------------------------------------------------------------------- running


def worker_env(jobs: int, compile_cache: str | None) -> dict[str, str]:
    """Environment of a run: JAX takes GPU memory as needed (no preallocation) and at most its share
    of the device, so ``jobs`` runs share one GPU; compiled programs go to a persistent cache."""
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{min(0.9, 0.9 / max(jobs, 1)):.3f}")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("PYTHONUNBUFFERED", "1")
    if compile_cache:
        env.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(compile_cache).resolve()))
        env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    return env


_WORKER = ("import sys; sys.path.insert(0, {root!r}); from jaxpeft import cli, study; "
           "sys.exit(cli.guarded(lambda: study.run_one(sys.argv[1])))")


def run_one(folder: str | Path) -> int:
    """Trains the run described by ``folder/spec.json``; the Trainer exports its adapter to
    ``folder/adapter`` where one is due (the run's output dir is its folder)."""
    from jaxpeft import train

    folder = Path(folder)
    spec = json.loads((folder / SPEC).read_text())
    cfg = config_lib.TrainConfig(**{**spec["config"], "export_adapter": bool(spec.get("save_adapter")),
                                    "keep": 0})
    train.Trainer(cfg).run()
    return 0


def execute(plan: Plan, jobs: int = 1, compile_cache: str | None = None,
            echo: Callable[[str], None] = print, poll_s: float = 0.2) -> dict[str, Any]:
    """Runs every unfinished run of ``plan``, ``jobs`` at a time; returns a summary.

    Grid runs start longest first; the seeds of a group start once its grid is done.
    """
    plan.check_not_stale()
    plan.out.mkdir(parents=True, exist_ok=True)
    env = worker_env(jobs, compile_cache)
    root = str(Path(__file__).resolve().parent.parent)
    queue: list[tuple[float, str, Run]] = []
    waiting = {g: set(plan.grid_runs(g)) for g in plan.groups()}
    done, failed, skipped, blocked = [], [], [], []
    log = open(plan.out / "driver.jsonl", "a")

    def note(**rec):
        log.write(json.dumps(rec) + "\n")
        log.flush()

    def push(run: Run):
        if plan.is_complete(run):
            skipped.append(run)
            finished(run)
        else:
            heapq.heappush(queue, (-plan.cost(run), run.rel, run))

    def finished(run: Run):
        g = run.group
        if g in waiting and run in waiting[g]:
            waiting[g].discard(run)
            if not waiting[g]:
                del waiting[g]
                lr = choose_lr(plan.grid_metrics(g))
                echo(f"{g[0]}/{g[1]}: learning rate {lr:g} chosen on dev (seed {plan.study.selection_seed})")
                note(event="chosen", task=g[0], setting=g[1], learning_rate=lr)
                for r in plan.seed_runs(g, lr):
                    push(r)

    todo = sum(1 for r in plan.all_runs() if not plan.is_complete(r))
    echo(f"study: {len(plan.all_runs())} runs in {plan.out} ({todo} to run), {jobs} at a time")
    note(event="start", time=time.time(), jobs=jobs, runs=len(plan.all_runs()), to_run=todo)
    for g in plan.groups():
        for r in plan.grid_runs(g):
            push(r)
    running: dict[subprocess.Popen, tuple[Run, float]] = {}
    t0 = time.perf_counter()
    try:
        while queue or running:
            while queue and len(running) < jobs:
                _, _, run = heapq.heappop(queue)
                d = plan.folder(run)
                if d.exists():
                    shutil.rmtree(d)  # an unfinished earlier attempt
                d.mkdir(parents=True)
                (d / SPEC).write_text(json.dumps(plan.spec(run), indent=2) + "\n")
                with open(d / "output.log", "w") as out:
                    p = subprocess.Popen([sys.executable, "-c", _WORKER.format(root=root), str(d)],
                                         stdout=out, stderr=subprocess.STDOUT, env=env)
                running[p] = (run, time.perf_counter())
            time.sleep(poll_s)
            for p in [p for p in running if p.poll() is not None]:
                run, start = running.pop(p)
                secs = time.perf_counter() - start
                if p.returncode == 0 and plan.is_complete(run):
                    res = read_results(plan.folder(run) / RESULTS)
                    done.append(run)
                    echo(f"[{len(done) + len(failed)}/{todo}] {run.rel}: {res['main_metric']}="
                         f"{main_metric(res):.4f} ({secs:.0f}s)")
                    note(event="done", run=run.rel, seconds=secs, metric=main_metric(res),
                         train_seconds=res["train_seconds"], examples_per_second=res["examples_per_second"])
                    finished(run)
                else:
                    failed.append(run)
                    tail = (plan.folder(run) / "output.log").read_text().strip().splitlines()[-1:]
                    echo(f"[{len(done) + len(failed)}/{todo}] {run.rel}: FAILED (exit {p.returncode}): "
                         f"{tail[0] if tail else ''} -- see {plan.folder(run) / 'output.log'}")
                    note(event="failed", run=run.rel, seconds=secs, returncode=p.returncode)
                    if run.group in waiting:
                        blocked.append(run.group)
                        del waiting[run.group]
    except KeyboardInterrupt:
        for p in running:
            p.terminate()
        for p in running:
            p.wait()
        raise
    finally:
        wall = time.perf_counter() - t0
        note(event="end", wall_seconds=wall, done=len(done), failed=len(failed))
        log.close()
    echo(f"study: {len(done)} run(s) done, {len(skipped)} already there, {len(failed)} failed "
         f"in {wall:.0f}s" + (f"; seeds not run for {', '.join('/'.join(g) for g in blocked)}"
                              if blocked else ""))
    return {"done": done, "skipped": skipped, "failed": failed, "blocked": blocked, "wall_seconds": wall}


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
        lines.append(f"| {t} | {plan.train_sizes[t]:,} | {cfg['num_epochs']:g} | {cfg['max_seq_length']} | "
                     f"{cfg['batch_size']} | {plan.steps(rs[0])[0]:,} | {len(rs)} | {n_train:,} | {n_dev:,} |")
        tot_runs, tot_train, tot_dev = tot_runs + len(rs), tot_train + n_train, tot_dev + n_dev
    lines.append(f"| all | | | | | | {tot_runs} | {tot_train:,} | {tot_dev:,} |")
    return "\n".join(lines)
