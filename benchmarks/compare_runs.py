#!/usr/bin/env python
"""Compares training runs of the same settings on different device layouts.

    python benchmarks/compare_runs.py REF_DIR RUN_DIR [RUN_DIR ...] [--from_step=N]

For each run against the reference: its mesh and devices, the training loss at every logged step
(max |difference| over the steps both logged, from ``--from_step`` on), the final dev metric, and
the max |difference| of the exported adapter tensors. Prints a markdown table.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def read_run(d: Path, from_step: int) -> dict:
    events = [json.loads(x) for x in (d / "log.jsonl").read_text().splitlines() if x.strip()]
    loss = {}
    for e in events:  # a resumed run logs the same steps again: the last record wins
        if e.get("event") == "train" and e["step"] > from_step:
            loss[e["step"]] = e["loss"]
    res = json.loads((d / "results.json").read_text())
    from safetensors.numpy import load_file

    return {"loss": loss, "results": res, "adapter": load_file(str(d / "adapter" / "adapter_model.safetensors"))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ref")
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--from_step", type=int, default=0, help="compare losses logged after this step")
    a = ap.parse_args()
    ref = read_run(Path(a.ref), a.from_step)
    metric = ref["results"]["main_metric"]
    print(f"reference {a.ref}: {ref['results']['devices']}, mesh {ref['results']['mesh']}, "
          f"{len(ref['loss'])} logged losses, final {metric} {ref['results']['final_dev'][metric]:.4f}\n")
    print(f"| run | devices | mesh | steps compared | max abs loss diff | final loss (ref) | final {metric} (ref) "
          "| max abs adapter diff |")
    print("|---|---|---|---|---|---|---|---|")
    for r in a.runs:
        if not (Path(r) / "results.json").exists():
            print(f"| {r} | did not finish | | | | | | |")
            continue
        run = read_run(Path(r), a.from_step)
        common = sorted(set(run["loss"]) & set(ref["loss"]))
        dl = max((abs(run["loss"][s] - ref["loss"][s]) for s in common), default=float("nan"))
        last = common[-1] if common else None
        keys = set(run["adapter"]) & set(ref["adapter"])
        missing = set(run["adapter"]) ^ set(ref["adapter"])
        diffs = sorted(((float(np.max(np.abs(run["adapter"][k].astype(np.float64) - ref["adapter"][k]))), k)
                        for k in keys), reverse=True)
        da = diffs[0][0] if diffs else float("nan")
        # the key biases get no gradient (softmax shift invariance), so Adam turns rounding noise
        # into full-size steps for them: show the largest difference among the other tensors too
        rest = [d for d in diffs if not d[1].replace("/", ".").endswith("attention.self.key.bias")]
        res = run["results"]
        print(f"| {r} | {res['devices']} | {res['mesh']} | {len(common)} ({common[0] if common else '-'}–{last}) "
              f"| {dl:.2e} | {run['loss'].get(last, float('nan')):.4f} ({ref['loss'].get(last, float('nan')):.4f}) "
              f"| {res['final_dev'][metric]:.4f} ({ref['results']['final_dev'][metric]:.4f}) "
              f"| {da:.2e} ({diffs[0][1] if diffs else '-'}); without key biases "
              f"{rest[0][0] if rest else float('nan'):.2e} ({rest[0][1] if rest else '-'})"
              f"{' (tensors differ: ' + str(sorted(missing)[:3]) + ')' if missing else ''} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
