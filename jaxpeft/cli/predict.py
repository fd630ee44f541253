"""``jaxpeft-predict``: predictions of a trained adapter for a TSV file, texts, or lines on stdin.

    jaxpeft-predict --adapter=runs/bitfit-sst2/adapter --input=../shared/data/glue/SST-2/test.tsv \\
        --output=sst2-test.tsv
    jaxpeft-predict --adapter=runs/bitfit-sst2/adapter --text="a gripping film" --text="dull"
    printf 'A man sleeps.\\tA person rests.\\n' | jaxpeft-predict --adapter=runs/bitfit-rte/adapter

The adapter folder may also be one written by Hugging Face peft (LORA, PROMPT_TUNING, P_TUNING,
PREFIX_TUNING on a BERT sequence classifier); such a folder does not record the task, so give
``--task``, and ``--model`` when its ``base_model_name_or_path`` is not reachable from here:

    jaxpeft-predict --adapter=peft-lora-sst2 --task=sst2 --model=bert-base-uncased --text="a gripping film"

The base model is reloaded from its source and checked against the adapter's fingerprint. Input: a
GLUE-style TSV file of the adapter's task (``--input``; the task's text columns are read by name
from the header, labels are optional), ``--text`` (repeatable), or lines on stdin; for
sentence-pair tasks the two texts of a line are tab-separated. Output: a TSV with ``index,
prediction`` (the GLUE submission layout) and one ``prob_<label>`` column per class, to
``--output`` or stdout. With a labelled input file the task's metrics go to stderr.
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
    src.add_argument("--input", help="GLUE-style TSV file of the adapter's task")
    src.add_argument("--text", action="append", help="a text to classify (repeatable)")
    p.add_argument("--output", help="predictions TSV to write (default: stdout)")
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
    from jaxpeft.tasks import glue, metrics
    from jaxpeft.errors import UserError

    if args.batch_size <= 0:
        raise UserError(f"--batch_size={args.batch_size}: must be > 0")
    overrides = {k: getattr(args, k) for k in compute.fields() if hasattr(args, k)}
    spec = compute.resolve(args.compute, overrides)
    # Check every input before the model loads.
    folder = folder.read_adapter(args.adapter)
    task = folder.adapter_task(folder, args.task)
    if args.input:
        examples = glue.read_tsv(task, Path(args.input))
    elif args.text:
        examples = folder.examples_from_lines(args.text, task)
    else:
        if sys.stdin.isatty():
            raise UserError("nothing to predict: give --input, --text or lines on stdin")
        examples = folder.examples_from_lines(sys.stdin, task)
    if args.output and Path(args.output).is_dir():
        raise UserError(f"output {args.output} is a folder")

    loaded, params, method, task = folder.load_adapter(args.adapter, args.model, task=args.task, compute=spec)
    length = args.max_seq_length or int(folder.max_seq_length or 128)
    logits = folder.predict(loaded, params, method, examples, max_seq_length=length,
                              batch_size=args.batch_size)
    header, rows = folder.prediction_rows(logits, task)
    if args.output:
        folder.write_tsv(args.output, header, rows)
        print(f"{len(rows)} predictions written to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write("\t".join(header) + "\n" + "".join("\t".join(r) + "\n" for r in rows))
    if examples.labels is not None:
        preds = logits[:, 0] if task.is_regression else logits.argmax(-1)
        m = metrics.compute(task.name, preds, examples.labels)
        print(f"{task.name} on {len(rows)} labelled examples: "
              + ", ".join(f"{k}={v:.4f}" for k, v in m.items()), file=sys.stderr)
    return 0
