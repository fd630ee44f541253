#!/usr/bin/env python
"""How much each word weighs in a tagging run's loss, by how the training batches are made.

A tagging step's loss is the mean cross-entropy over its batch's labelled words (ours and
transformers' alike), so a word weighs ``1 / (labelled words in its step)``. Batches of similar
lengths (``--group_by_length``) put the shortest sentences together, whose words then weigh
several times more than those of a batch of long ones; random batches (``--no-group_by_length``,
the tagging default one a row) and packed rows (``--packing``) mix lengths.
Prints, for the first epoch of each: the labelled words per step, the spread of a word's weight
(95th over 5th percentile), and the share of the loss's weight on the sentences of at most two
words (CoNLL-2003's ``-DOCSTART-`` lines, headlines, scores)::

    python -m experiments.bitfit_study.batch_weights --task=ner --data_dir=$DATA/conll2003 --model=$MODEL
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import numpy as np


def step_weights(steps, words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(words per step, each sentence's per-word weight)`` for steps given as arrays of example ids
    (``-1``: an empty slot)."""
    per_step, weight = [], np.zeros(len(words))
    for ids in steps:
        ids = np.asarray(ids)
        ids = ids[ids >= 0]
        n = words[ids].sum()
        per_step.append(n)
        weight[ids] = 1.0 / max(n, 1)
    return np.array(per_step), weight


def summary(name: str, per_step: np.ndarray, weight: np.ndarray, words: np.ndarray, short: int = 2) -> str:
    w = np.repeat(weight, words)
    s = words <= short
    return (f"{name}: {len(per_step)} steps; labelled words a step, 5th/50th/95th percentile "
            f"{np.percentile(per_step, 5):.0f} / {np.median(per_step):.0f} / {np.percentile(per_step, 95):.0f}; "
            f"a word's weight, 95th over 5th percentile {np.percentile(w, 95) / np.percentile(w, 5):.1f}; "
            f"the loss's weight on sentences of <= {short} words {weight[s] @ words[s] / (weight @ words) * 100:.1f}% "
            f"({s.mean() * 100:.1f}% of the sentences, {words[s].sum() / words.sum() * 100:.1f}% of the words)")


def main(argv=None) -> int:
    from jaxpeft.data import batches, packing
    from jaxpeft.data.encoding import IGNORE
    from jaxpeft.models import hf_weights, loading
    from jaxpeft.tasks import get

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="ner")
    ap.add_argument("--data_dir", required=True)
    ap.add_argument("--model", default=hf_weights.DEFAULT_MODEL)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--max_seq_length", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=5, help="epochs the packed plan is made for")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    task = get(a.task, SimpleNamespace(data_dir=a.data_dir))
    tok = hf_weights.load_tokenizer(loading.model_dir_of(a.model))
    enc = task.encode(tok, task.read("train"), a.max_seq_length)
    words = (enc.labels != IGNORE).sum(1)
    print(f"{a.task}: {len(words)} training sentences, {words.mean():.1f} labelled words each on average")
    for grouped in (True, False):
        b = batches.BucketBatches(enc, a.batch_size, a.max_seq_length, a.seed, group_by_length=grouped)
        print(summary("one a row, " + ("length-grouped batches" if grouped else "random batches"),
                      *step_weights(b.order(0), words), words))
    p = packing.PackedBatches(enc, a.batch_size, a.max_seq_length, a.seed, a.epochs)
    print(summary("packed rows", *step_weights(p.order(0), words), words))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
