"""Which biases move: per-layer change of each BERT bias term between a base model and a BitFit adapter.

For every layer l and bias term t (b_q, b_k, b_v, b_m1, b_LN1, b_m2, b_m3, b_LN2, as in
:data:`jaxpeft.masks.BERT_BIAS_TERMS`) the change is ``mean |b_tuned - b_base|`` over the bias
vector, i.e. its L1 norm divided by its dimension (the measure of the BitFit paper's figure). Terms an
adapter did not train are missing (NaN). Several adapters give the mean over adapters, cell by cell.
The embedding-LayerNorm and pooler biases are outside these terms and are not reported.
``python -m experiments.bitfit_study.analyze_bias_change`` is its command line.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxpeft.adapters import folder as adapter_io
from jaxpeft.errors import UserError
from jaxpeft.masks import BERT_BIAS_TERMS

#: Short names of the terms, in the paper's order.
SYMBOLS = {"query": "b_q", "key": "b_k", "value": "b_v", "attention_output": "b_m1",
           "attention_layernorm": "b_LN1", "intermediate": "b_m2", "output": "b_m3",
           "output_layernorm": "b_LN2"}
_LAYER = re.compile(r"layer[_/.]?(\d+)/")


@dataclasses.dataclass
class BiasChange:
    """``values[i, j]``: mean |Δb| of term ``terms[j]`` in layer ``layers[i]`` (NaN: not trained)."""

    layers: list[int]
    terms: list[str]
    values: np.ndarray
    sources: list[str]

    def term_means(self) -> dict[str, float]:
        """Mean over layers per term (terms no layer trained are left out)."""
        out = {}
        for j, t in enumerate(self.terms):
            col = self.values[:, j]
            if not np.isnan(col).all():
                out[t] = float(np.nanmean(col))
        return out

    def ranking(self) -> list[str]:
        """Trained terms, largest mean change first."""
        m = self.term_means()
        return sorted(m, key=lambda t: -m[t])


def classify(path: str) -> tuple[int, str] | None:
    """``bert/encoder/layer_3/attention/self/key/bias`` -> ``(3, "key")``; None for other leaves."""
    for term, rx in BERT_BIAS_TERMS.items():
        if re.search(rx, path):
            return int(_LAYER.search(path).group(1)), term
    return None


def bias_change(base: dict[str, np.ndarray], tuned: dict[str, np.ndarray], source: str = "") -> BiasChange:
    """The table for one adapter's arrays ``tuned`` against the base model's arrays ``base``."""
    cells: dict[tuple[int, str], float] = {}
    for path, arr in tuned.items():
        c = classify(path)
        if c is None:
            continue
        if path not in base:
            raise UserError(f"{source}: the base model has no {path}")
        if base[path].shape != arr.shape:
            raise UserError(f"{source}: {path} has shape {arr.shape}, the base model's is "
                            f"{base[path].shape} (adapter of another base model?)")
        diff = np.abs(arr.astype(np.float64) - base[path].astype(np.float64))
        cells[c] = float(diff.sum() / diff.size)
    if not cells:
        raise UserError(f"{source}: no BERT bias term among the adapter's tensors (not a BitFit adapter?)")
    layers = sorted({l for l, _ in cells})
    terms = list(SYMBOLS)
    values = np.full((len(layers), len(terms)), np.nan)
    for (l, t), v in cells.items():
        values[layers.index(l), terms.index(t)] = v
    return BiasChange(layers, terms, values, [source])


def mean_change(tables: Sequence[BiasChange]) -> BiasChange:
    """Cell-by-cell mean of tables of the same layers and trained terms (e.g. seeds, tasks)."""
    first = tables[0]
    for t in tables[1:]:
        if t.layers != first.layers or not np.array_equal(np.isnan(t.values), np.isnan(first.values)):
            raise UserError(f"{t.sources[0]} and {first.sources[0]} differ in layers or trained bias terms; "
                            "aggregate adapters of the same model and BitFit terms")
    values = np.mean([t.values for t in tables], axis=0)
    return BiasChange(first.layers, first.terms, values, [s for t in tables for s in t.sources])


def load_base_biases(model: str, paths: Sequence[str], source: str) -> dict[str, np.ndarray]:
    """The base model's arrays at the ``bert/...`` ``paths`` of an adapter."""
    from jaxpeft import masks
    from jaxpeft.models import hf_weights
    from jaxpeft.models.heads import Head
    from jaxpeft.models.build import build_module, param_shapes

    model_dir = hf_weights.resolve_model_dir(model)
    family, config = hf_weights.load_config(model_dir)
    shapes = masks.flatten(param_shapes(build_module(family, config, Head())))
    expected = {p: shapes[p] for p in paths if p in shapes}
    by_path = hf_weights.convert_state_dict(hf_weights.load_state_dict(model_dir), expected, family.prefix, source)
    missing = [p for p in paths if p not in by_path]
    if missing:
        raise UserError(f"{source}: base model {model} lacks {len(missing)} of the adapter's tensors, "
                        f"e.g. {missing[0]} (adapter of another base model?)")
    return {p: np.asarray(a, dtype=np.float32) for p, a in by_path.items()}


def adapter_arrays(folder: str | Path, model: str | None = None) -> dict[str, np.ndarray]:
    """An adapter folder's arrays by our param paths (``bert/.../bias``, ``classifier/kernel``), in
    float32, whichever kind of folder it is; ``model``: its base model (default: the recorded one),
    whose shapes name the folder's tensors."""
    from jaxpeft.models import hf_weights
    from jaxpeft.models.build import build_module, param_shapes

    f = adapter_io.read_adapter(folder)
    source = model or f.base_model
    if not source:
        raise UserError(f"adapter {folder} does not name its base model: give --model")
    family, config = hf_weights.load_config(hf_weights.resolve_model_dir(source))
    head = adapter_io.adapter_task(f).head(f.record.get("pooling") or "cls")
    shapes = param_shapes(build_module(family, config, head, f.method))
    return {k: np.asarray(v, np.float32) for k, v in adapter_io.adapter_arrays(f, shapes, config).items()}


def analyze(adapters: Sequence[str | Path], model: str | None = None) -> BiasChange:
    """The table of one adapter folder, or the mean table of several."""
    if not adapters:
        raise UserError("no adapter folder given")
    tables, bases = [], {}
    for folder in adapters:
        cfg = adapter_io.read_adapter_config(folder)
        base_id = model or cfg["base_model"]
        arrays = adapter_arrays(folder, base_id)
        paths = sorted(p for p in arrays if classify(p) is not None)
        key = (base_id, tuple(paths))
        if key not in bases:
            bases[key] = load_base_biases(base_id, paths, str(folder))
        tables.append(bias_change(bases[key], arrays, str(folder)))
    return tables[0] if len(tables) == 1 else mean_change(tables)


# ----------------------------------------------------------------------------- output


def _fmt(v: float) -> str:
    return "—" if np.isnan(v) else f"{v:.4g}"


def to_markdown(t: BiasChange) -> str:
    head = "| layer | " + " | ".join(SYMBOLS[x] for x in t.terms) + " |"
    lines = [head, "|---:|" + "---:|" * len(t.terms)]
    for i, l in enumerate(t.layers):
        lines.append(f"| {l} | " + " | ".join(_fmt(v) for v in t.values[i]) + " |")
    means = t.term_means()
    lines.append("| mean | " + " | ".join(_fmt(means.get(x, np.nan)) for x in t.terms) + " |")
    return "\n".join(lines)


def to_csv(t: BiasChange) -> str:
    lines = ["layer," + ",".join(SYMBOLS[x] for x in t.terms)]
    for i, l in enumerate(t.layers):
        lines.append(f"{l}," + ",".join("" if np.isnan(v) else repr(float(v)) for v in t.values[i]))
    return "\n".join(lines) + "\n"


def heatmap(t: BiasChange, path: str | Path, title: str = "") -> Path:
    """A layers x bias-terms heatmap PNG (grey: term not trained)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.ma.masked_invalid(t.values)
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(t.terms), 1.2 + 0.45 * len(t.layers)))
    cmap = matplotlib.colormaps["Blues"].with_extremes(bad="#dddddd")
    im = ax.imshow(data, cmap=cmap, aspect="auto", vmin=0)
    ax.set_xticks(range(len(t.terms)), [SYMBOLS[x] for x in t.terms])
    ax.set_yticks(range(len(t.layers)), [str(l) for l in t.layers])
    ax.set_xlabel("bias term")
    ax.set_ylabel("layer")
    vmax = float(np.nanmax(t.values))
    for i in range(len(t.layers)):
        for j in range(len(t.terms)):
            v = t.values[i, j]
            if not np.isnan(v):
                ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=7,
                        color="white" if v > 0.6 * vmax else "black")
    fig.colorbar(im, ax=ax, label="mean |Δb|")
    n = len(t.sources)
    ax.set_title(title or ("change of bias terms" + (f" (mean of {n} adapters)" if n > 1 else "")), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write(t: BiasChange, prefix: str | Path, title: str = "") -> list[Path]:
    """``PREFIX.md``, ``PREFIX.csv`` and ``PREFIX.png``."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    md, csv = prefix.with_name(prefix.name + ".md"), prefix.with_name(prefix.name + ".csv")
    md.write_text(to_markdown(t) + "\n")
    csv.write_text(to_csv(t))
    return [md, csv, heatmap(t, prefix.with_name(prefix.name + ".png"), title)]
