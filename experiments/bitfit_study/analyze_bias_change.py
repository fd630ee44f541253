#!/usr/bin/env python
"""Which biases move: mean |Δb| per layer and BERT bias term between a base model and BitFit adapters.

    python -m experiments.bitfit_study.analyze_bias_change runs/study/rte/bitfit/lr0.001-seed0/adapter \\
        --out=docs/img/bias_change_rte
    python -m experiments.bitfit_study.analyze_bias_change \\
        $(python -m experiments.bitfit_study.run adapters --setting=bitfit) \\
        --out=docs/img/bias_change_all --title="BitFit, all tasks and seeds"

One adapter folder gives its table; several give the mean table (cell by cell). Writes OUT.md,
OUT.csv and OUT.png (heatmap, layers x bias terms) and prints the markdown table and the terms
ranked by mean change. The base model defaults to the adapter's base_model. The logic is in
experiments/bitfit_study/bias_change.py.
"""

import argparse
import sys

from jaxpeft import cli


def main(argv=None) -> int:
    from experiments.bitfit_study import bias_change

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapters", nargs="+", help="adapter folder(s) (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--model", help="base model id or folder (default: the adapter's base_model)")
    p.add_argument("--out", default="bias_change", help="output prefix (default: bias_change)")
    p.add_argument("--title", default="", help="heatmap title")
    a = p.parse_args(argv)
    table = bias_change.analyze(a.adapters, a.model)
    files = bias_change.write(table, a.out, a.title)
    print(bias_change.to_markdown(table))
    means = table.term_means()
    print("\nlargest mean change first: " + ", ".join(f"{bias_change.SYMBOLS[t]} {means[t]:.4g}"
                                                     for t in table.ranking()))
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


if __name__ == "__main__":
    sys.exit(cli.guarded(main))
