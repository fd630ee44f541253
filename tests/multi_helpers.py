"""Shared by the multi-adapter and multi-task tests: adapter folders with random trained leaves, made
without a training run, and mixed input files."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from jaxpeft import masks, methods, tasks
from jaxpeft.adapters import folder as adapters
from jaxpeft.tasks import glue as glue_tasks
from jaxpeft.models import fingerprint
from jaxpeft.models.loading import load_classifier

from model_helpers import BERT, mask


def make_adapter(directory: Path, model_dir: Path, method: str, task: str, *, seed: int = 0,
                 max_seq_length: int = 32, **options) -> Path:
    """An adapter folder of ``method`` for ``task`` on ``model_dir`` whose trained leaves are the
    fresh init moved by random noise (so every adapter computes something of its own)."""
    m = methods.create(method, options)
    t = tasks.get(task)
    loaded = load_classifier(str(model_dir), t.num_labels, m, seed=seed)
    params = m.init_params(loaded.params, BERT, tokenizer=loaded.tokenizer, rng=jax.random.key(seed))
    flat = masks.flatten(params)
    rng = np.random.default_rng(seed)
    for p in masks.trainable_paths(mask(m, params)):
        x = np.asarray(flat[p])
        flat[p] = x + 0.3 * rng.standard_normal(x.shape).astype(np.float32) * (1.0 if x.std() == 0 else x.std())
    params = masks.unflatten(flat, params)
    fp = fingerprint.fingerprint(loaded.params, str(model_dir), exclude=m.added)
    return adapters.save_adapter(directory, params, m, t, family=BERT, model_config=loaded.config,
                                 base_model=str(model_dir), fingerprint=fp, max_seq_length=max_seq_length)


def texts_of(glue: Path, task: str, n: int, offset: int = 0) -> list[tuple[str, ...]]:
    """``n`` dev texts (one or two per row) of a local GLUE task."""
    t = glue_tasks.get_task(task)
    ex = glue_tasks.load_split(t, "dev", glue)
    cols = [c[offset:offset + n] for c in ex.texts]
    return list(zip(*cols))


def write_mixed(path: Path, rows: list[tuple[str, tuple[str, ...]]]) -> Path:
    """A mixed input file: ``adapter, sentence, sentence1, sentence2`` (one text: ``sentence``)."""
    lines = ["adapter\tsentence\tsentence1\tsentence2"]
    for name, texts in rows:
        cells = [texts[0], "", ""] if len(texts) == 1 else ["", texts[0], texts[1]]
        lines.append("\t".join([name, *cells]))
    path.write_text("\n".join(lines) + "\n")
    return path
