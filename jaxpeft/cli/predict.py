"""``jaxpeft-predict``: predictions of a trained adapter for a file, texts, or lines on stdin.

    jaxpeft-predict --adapter=runs/bitfit-sst2/adapter --input=../shared/data/glue/SST-2/test.tsv \\
        --output=sst2-test.tsv
    jaxpeft-predict --adapter=runs/bitfit-sst2/adapter --text="a gripping film" --text="dull"
    printf 'A man sleeps.\\tA person rests.\\n' | jaxpeft-predict --adapter=runs/bitfit-rte/adapter

The adapter folder may also be one written by Hugging Face peft (LORA, IA3, PROMPT_TUNING, P_TUNING,
PREFIX_TUNING); such a folder does not record the task, so give ``--task``, and ``--model`` when its
``base_model_name_or_path`` is not reachable from here:

    jaxpeft-predict --adapter=peft-lora-sst2 --task=sst2 --model=bert-base-uncased --text="a gripping film"

The base model is reloaded from its source and checked against the adapter's fingerprint. Input: a
file of the adapter's task (``--input``: for classification a TSV/CSV whose header names the text
columns it was trained on, labels optional; for tagging CoNLL columns or JSON tokens; for QA SQuAD
JSON), ``--text`` (repeatable), or lines on stdin (sentence pairs tab-separated; tagging: tokens
separated by spaces). Output, to ``--output`` or stdout, one format for one adapter or several
(``jaxpeft.adapters.predict``): a TSV ``index, adapter, prediction, probabilities`` with the task's
label names; tags per word; answers with their scores as JSON. With a labelled input file the
task's metrics go to stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    from jaxpeft import compute, options

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", required=True, action="append",
                   help="adapter folder (adapter_config.json + weights); several as --adapter=NAME=DIR, "
                   "with --input's 'adapter' column naming each row's (jaxpeft.adapters.mixed)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--input", help="a file of the adapter's task (see above)")
    src.add_argument("--text", action="append", help="a text to classify (repeatable)")
    p.add_argument("--output", help="predictions to write (default: stdout): TSV for sequence tasks, CoNLL "
                   "columns for tagging (--format=tsv: one row per sentence), JSON for QA")
    p.add_argument("--format", choices=("conll", "tsv"), help="tagging output: conll (default) or tsv")
    p.add_argument("--model", help="base model to load instead of the recorded one (same fingerprint)")
    p.add_argument("--task", help="the adapter's task, where the folder does not record it (one written by "
                   "peft); must agree where it does")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--max_seq_length", type=int, help="(default: the length the adapter was trained with)")
    p.add_argument("--compute", default="auto", choices=compute.PRESETS,
                   help="how to compute: auto (the fastest path here), exact, fast")
    options.add_flags(p.add_argument_group("compute (each overrides the --compute preset)"), compute.Compute)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if len(args.adapter) > 1 or any("=" in a and not Path(a).is_dir() for a in args.adapter):
        from jaxpeft.adapters import mixed

        return mixed.predict_main(args)
    args.adapter = args.adapter[0]
    from jaxpeft import compute
    from jaxpeft.adapters import folder
    from jaxpeft.adapters import predict as prediction
    from jaxpeft.errors import UserError

    if args.batch_size <= 0:
        raise UserError(f"--batch_size={args.batch_size}: must be > 0")
    overrides = {k: getattr(args, k) for k in compute.fields() if hasattr(args, k)}
    spec = compute.resolve(args.compute, overrides)
    # every input is checked before the model loads
    adapter = folder.read_adapter(args.adapter)
    task = folder.adapter_task(adapter, args.task)
    recorded = adapter.record.get("text_columns")
    if args.input:
        raw = task.read_input(args.input, recorded) if hasattr(task, "read_input") else \
            prediction.read_sequence_input(args.input, task, recorded)
    elif args.text:
        raw = task.lines_input(args.text) if hasattr(task, "lines_input") else \
            prediction.examples_from_lines(args.text, task)
    else:
        if sys.stdin.isatty():
            raise UserError("nothing to predict: give --input, --text or lines on stdin")
        lines = list(sys.stdin)
        raw = task.lines_input(lines) if hasattr(task, "lines_input") else prediction.examples_from_lines(lines, task)
    if args.output and Path(args.output).is_dir():
        raise UserError(f"output {args.output} is a folder")

    loaded, params, method, task = folder.load_adapter(args.adapter, args.model, task=args.task, compute=spec)
    length = args.max_seq_length or int(adapter.max_seq_length or 128)
    out, enc = prediction.outputs(loaded, params, method, task, raw, max_seq_length=length,
                                  batch_size=args.batch_size)
    preds = task.predictions(out, enc, raw)
    name = Path(args.adapter).name
    prediction.write_text(args.output, prediction.render(preds, [name] * len(preds), task.kind, args.format))
    if args.output:
        print(f"{len(preds)} predictions written to {args.output}", file=sys.stderr)
    if task.labelled(raw):
        m = task.evaluate(out, enc, raw)
        print(f"{task.name} on {len(preds)} labelled examples: "
              + ", ".join(f"{k}={v:.4f}" for k, v in m.items() if isinstance(v, float)), file=sys.stderr)
    return 0


if __name__ == "__main__":
    from jaxpeft.cli import guarded

    sys.exit(guarded(main))
