#!/usr/bin/env python
"""The BitFit study: full fine-tuning, BitFit and its ablations, Frozen, on GLUE; resumable. Run from
the repository root:

    python -m experiments.bitfit_study.run plan  --data_dir=$GLUE            # runs and budget
    python -m experiments.bitfit_study.run run   --data_dir=$GLUE --jobs=8   # every run not done yet
    python -m experiments.bitfit_study.run peer  --data_dir=$GLUE --jobs=8   # the PyTorch peer, chosen lr
    python -m experiments.bitfit_study.run table --doc=docs/results.md       # tables from results files
    python -m experiments.bitfit_study.run adapters --setting=bitfit --tasks=rte  # adapter folders, chosen lr

The grid and per-task budget are in experiments/bitfit_study/config.py (--config for another, e.g.
experiments/bitfit_study/config_cpu.py). Results go to --out (default runs/study), one folder per
run. --set KEY=VALUE takes any jaxpeft-train flag (e.g. --set dtype=bfloat16) for every run. The
logic is in experiments/bitfit_study/ (study.py, driver.py, records.py, tables.py).
"""

import argparse
import sys
from pathlib import Path

from jaxpeft import cli


def _csv(kind=str):
    return lambda s: [kind(x.strip()) for x in s.split(",") if x.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["run", "plan", "peer", "table", "adapters"])
    p.add_argument("--config", help="study config file (default: experiments/bitfit_study/config.py)")
    p.add_argument("--out", default="runs/study", help="results folder (default: runs/study)")
    p.add_argument("--tasks", type=_csv(), help="subset of the study's tasks, e.g. rte,mrpc")
    p.add_argument("--settings", type=_csv(), help="subset of the settings, e.g. bitfit,frozen")
    p.add_argument("--seeds", type=_csv(int), help="seeds (default: the study's); the smallest "
                   "selects the learning rate")
    p.add_argument("--model", help="base model id or folder (default: the bundled all-MiniLM-L6-v2)")
    p.add_argument("--data_dir", help="GLUE folder in the classic TSV layout (default: $GLUE_DIR)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a training option (a jaxpeft-train flag) for every run, e.g. --set dtype=bfloat16")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (they share the device)")
    p.add_argument("--peer_time_limit", type=float, default=0.0,
                   help="peer: pause the peer runs still training after this many seconds (their state is "
                        "kept; the next peer command resumes them); 0: no limit")
    p.add_argument("--compile_cache", default=None,
                   help="persistent compilation cache folder (default: OUT/.jax_cache; 'none': off)")
    p.add_argument("--doc", help="table: also write the tables between the markers of this file")
    p.add_argument("--marker", default="study-table",
                   help="table: the name in the --doc markers <!-- NAME:begin --> ... <!-- NAME:end -->")
    p.add_argument("--figures", metavar="PREFIX",
                   help="table: also draw each task's learning curves, every setting, to PREFIX_<task>.png")
    p.add_argument("--setting", default="bitfit", help="adapters: which setting (default: bitfit)")
    return p


def main(argv=None) -> int:
    from experiments.bitfit_study import driver, study, tables
    from jaxpeft.errors import UserError

    a = parser().parse_args(argv)
    st = study.load_study(a.config).select(a.tasks, a.settings, None if a.command == "peer" else a.seeds)
    if a.command in ("table", "adapters"):
        groups, n = tables.collect(a.out, st)
        if a.command == "adapters":
            if a.setting not in st.settings:
                raise UserError(f"unknown setting {a.setting!r}; settings: {', '.join(st.settings)}")
            for d in tables.chosen_adapters(groups, list(st.tasks), a.setting):
                print(d)
            return 0
        table = tables.render(groups, st, n, a.out)
        print(table)
        if a.doc:
            tables.write_between_markers(a.doc, table, a.marker)
        if a.figures:
            for path in tables.draw_curves(groups, st, a.figures):
                print(f"wrote {path}")
        return 0
    if a.jobs < 1:
        raise UserError("--jobs must be at least 1")
    plan = study.Plan(st, a.out, model=a.model, data_dir=a.data_dir,
                      overrides=study.parse_overrides(a.set))
    if a.command == "plan":
        print(study.describe_plan(plan))
        return 0
    cache = a.compile_cache or str(Path(a.out) / ".jax_cache")
    cache = None if cache.lower() == "none" else cache
    if a.command == "peer":
        summary = driver.execute_peers(plan, jobs=a.jobs, seeds=tuple(a.seeds) if a.seeds else None,
                                       time_limit=a.peer_time_limit)
    else:
        summary = driver.execute(plan, jobs=a.jobs, compile_cache=cache)
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(cli.guarded(main))
