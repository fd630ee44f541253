"""Many adapters on one frozen base, each row of a batch routed to its own: serving K adapters in one
batch, and the forward pass behind multi-task training (:mod:`jaxpeft.training.multitask`).

A :class:`MultiAdapter` holds K adapters of one method *family* (:data:`FAMILIES`) loaded on one
frozen base model. Each adapter's own leaves -- what its method trains and exports: BitFit's
biases, a prompt, per-layer prefixes, and its task head -- are stacked on a leading K axis
(``stacked``: ``{param path: [K, ...]}``); everything else is the frozen base, held once. Heads of
tasks with different label counts are zero-padded to the largest count; each row's logits are cut
to its own adapter's labels by the caller (a padded column never reaches a real one).

The forward pass (:func:`mixed_logits`) reads a per-row ``adapter_index`` ``[B]``, gathers every
row's leaves (``a[adapter_index]``, ``[B, ...]``) and ``jax.vmap``\\ s the ordinary single-adapter
model over the rows with the frozen base broadcast: the frozen matmuls stay one matmul over the
whole batch, and only the adapter's own (small) tensors are per row. So the mixed model computes
exactly what each adapter's own model computes on its rows (tests: within float32 rounding on the
CPU), whatever the family, and gradients reach only each row's adapter: the gather's transpose is
a scatter-add into the rows' own slices. In training each row gets its own dropout key.

The same code runs our GPU fast path (bfloat16, the Pallas attention and sublayer kernels): a
``pallas_call`` under ``vmap`` gains a grid axis for the rows (checked in Pallas's interpreter on
the CPU, ``tests/test_multi_adapter.py``).

Families (an adapter's ``adapter_config.json`` ``method`` decides its family):

* ``bitfit``: BitFit bias sets. An adapter that trained a subset of the biases
  (``--bitfit_terms``) takes the base's values for the others, so every adapter holds every bias
  any of them trained;
* ``prompt``: prompt tuning's and P-tuning's exports (P-tuning exports its computed prompt as
  prompt tuning); the same number of virtual tokens is required;
* ``prefix``: prefix tuning's and P-tuning v2's exports (both per-layer keys and values held
  directly); the same prefix length is required.

LoRA is a family in the same way once ``jaxpeft.methods.lora`` exists: its low-rank factors are
just more stacked leaves (one entry in :data:`FAMILIES`; different ranks would be zero-padded to
the largest, which leaves each update unchanged).

``jaxpeft-predict --adapter=NAME=DIR --adapter=NAME2=DIR2 ... --input=FILE.tsv`` predicts a file
whose ``adapter`` column names each row's adapter (:func:`predict_main`).
"""

from __future__ import annotations

import csv
import dataclasses
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft import masks
from jaxpeft.data import batches, encoding
from jaxpeft.tasks import glue
from jaxpeft.training import steps
from jaxpeft.errors import UserError
from jaxpeft.models.fingerprint import same_base

#: the batch key that routes each row to its adapter
INDEX_KEY = "adapter_index"
#: the input column that names each row's adapter
ADAPTER_COLUMN = "adapter"


@dataclasses.dataclass(frozen=True)
class Family:
    """Adapters that can share one batch: the exported methods (``adapter_config.json``'s
    ``method``) whose models have the same structure, and the option that must agree among them."""

    name: str
    methods: tuple[str, ...]
    #: method options that must be equal among the adapters of one call (e.g. the prompt length)
    same_options: tuple[str, ...] = ()


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("bitfit", ("bitfit",)),
    Family("prompt", ("prompt",), ("num_virtual_tokens",)),         # prompt tuning; P-tuning exports
    Family("prefix", ("prefix", "ptuning_v2"), ("num_virtual_tokens", "shift_positions")),
    Family("lora", ("lora",), ("lora_r", "lora_alpha", "target_modules")),
)}
#: the methods that train each family (P-tuning exports as prompt tuning)
TRAINED_BY = {"bitfit": ("bitfit",), "prompt": ("prompt", "ptuning"), "prefix": ("prefix", "ptuning_v2"),
              "lora": ("lora",)}


def family_of(method: str) -> Family | None:
    """The family of an exported (inference) method name, or ``None``."""
    return next((f for f in FAMILIES.values() if method in f.methods), None)


def supported_methods() -> str:
    return ", ".join(f"{f.name} ({'/'.join(TRAINED_BY[f.name])})" for f in FAMILIES.values())


# ----------------------------------------------------------------------------- the forward pass


def gather_rows(stacked: dict[str, jax.Array], index: jax.Array) -> dict[str, jax.Array]:
    """Each row's leaves: ``{path: a[index]}`` (``[B, ...]``)."""
    return {p: jnp.take(a, index, axis=0) for p, a in stacked.items()}


def mixed_logits(module: Any, stacked: dict[str, jax.Array], frozen: Any, batch: dict, *,
                 deterministic: bool = True, rng: jax.Array | None = None,
                 leaf_dropout: dict[str, float] | None = None) -> jax.Array:
    """Logits ``[B, C]`` of ``module`` (the single-adapter classifier, ``C`` the largest label count)
    with row ``b`` computed under adapter ``batch["adapter_index"][b]``.

    ``stacked``: ``{path: [K, ...]}``, the adapters' own leaves; ``frozen``: the rest of the params,
    with holes (``optax.MaskedNode``) at the stacked paths. ``rng`` (training): one dropout key per
    row is split from it. ``leaf_dropout`` (training): ``{path: rate}`` of stacked leaves to drop
    per row (P-tuning v2's dropout on its prefixes).
    """
    index = batch[INDEX_KEY]
    rows = gather_rows(stacked, index)
    inputs = {k: batch[k] for k in steps.MODEL_INPUTS if k in batch}
    keys = None if rng is None else jax.random.split(rng, index.shape[0])

    def one(row, x, key):
        if key is not None and leaf_dropout:
            row = dict(row)
            for i, (path, rate) in enumerate(sorted(leaf_dropout.items())):
                if rate > 0.0:
                    keep = jax.random.bernoulli(jax.random.fold_in(key, i + 1), 1.0 - rate, row[path].shape)
                    row[path] = jnp.where(keep, row[path] / (1.0 - rate), 0.0).astype(row[path].dtype)
        params = masks.merge(masks.unflatten(row, frozen), frozen)
        single = {k: v[None] for k, v in x.items()}
        return steps.apply_model(module, params, single, deterministic, key)[0]

    return jax.vmap(one, in_axes=(0, 0, None if keys is None else 0))(rows, inputs, keys)


def make_mixed_predict_step(module: Any) -> Callable:
    """``predict(stacked, frozen, batch) -> logits [B, C]`` (no dropout); same calling convention
    as :func:`jaxpeft.training.steps.make_predict_step`, so :func:`jaxpeft.training.steps.predict_logits` runs it."""

    def predict(stacked, frozen, batch):
        return mixed_logits(module, stacked, frozen, batch)

    return predict


def pad_head(path: str, a: Any, num_labels: int) -> Any:
    """A head leaf padded with zeros to ``num_labels`` outputs (``classifier/kernel`` ``[H, C]``,
    ``classifier/bias`` ``[C]``); other leaves unchanged."""
    if path not in ("classifier/kernel", "classifier/bias") or a.shape[-1] == num_labels:
        return a
    pad = [(0, 0)] * (a.ndim - 1) + [(0, num_labels - a.shape[-1])]
    return jnp.pad(jnp.asarray(a), pad)


def stack_adapters(own: Sequence[dict[str, Any]], base: dict[str, Any], paths: Sequence[str],
                   num_labels: int) -> dict[str, jax.Array]:
    """``{path: [K, ...]}`` of ``paths``: adapter ``k``'s leaf from ``own[k]`` (``{path: array}``),
    or the base's (``base``) where it has none; heads padded to ``num_labels`` outputs."""
    out = {}
    for path in paths:
        leaves = [pad_head(path, o[path] if path in o else base[path], num_labels) for o in own]
        shapes = {tuple(x.shape) for x in leaves}
        if len(shapes) > 1:
            raise UserError(f"the adapters' {path} have different shapes {sorted(shapes)}; adapters of one "
                            "call must have the same structure (same number of virtual tokens, same LoRA rank)")
        out[path] = jnp.stack([jnp.asarray(x) for x in leaves])
    return out


# ----------------------------------------------------------------------------- K adapters from folders


@dataclasses.dataclass
class MultiAdapter:
    """K adapters of one family on one frozen base (see the module docstring)."""

    names: tuple[str, ...]
    dirs: tuple[str, ...]
    family: Family
    tasks: tuple[glue.GlueTask, ...]
    max_seq_lengths: tuple[int, ...]
    module: Any                       # the single-adapter classifier with the largest label count
    stacked: dict[str, jax.Array]     # {path: [K, ...]}
    frozen: Any                       # the base params, holes at the stacked paths
    loaded: Any                       # the first adapter's LoadedModel (config, tokenizer)
    extra_positions: int = 0          # virtual tokens added to every row (prompt family)

    @property
    def num_labels(self) -> tuple[int, ...]:
        return tuple(t.num_labels for t in self.tasks)


def parse_specs(values: Sequence[str]) -> list[tuple[str, str]]:
    """``NAME=DIR`` flags as ``(name, dir)`` pairs; names must be unique and non-empty."""
    out: list[tuple[str, str]] = []
    for v in values:
        name, sep, d = v.partition("=")
        if not sep or not name.strip() or not d.strip():
            raise UserError(f"--adapter={v}: with several adapters each is given as --adapter=NAME=DIR")
        name = name.strip()
        if any(name == n for n, _ in out):
            raise UserError(f"--adapter: the name {name!r} is given twice")
        if "\t" in name:
            raise UserError(f"--adapter: the name {name!r} holds a tab")
        out.append((name, d))
    return out


def is_named(value: str) -> bool:
    """Whether an ``--adapter`` value is ``NAME=DIR`` rather than a folder."""
    return "=" in value and not Path(value).is_dir()


def check_configs(specs: Sequence[tuple[str, str]]) -> tuple[Family, list[dict]]:
    """Reads every adapter's ``adapter_config.json`` and checks, before any model is loaded, that
    they are one family, on one base model, with one pooling and the same virtual-token count."""
    from jaxpeft.adapters import folder

    configs = [folder.read_adapter_config(d) for _, d in specs]
    families = []
    for (name, d), cfg in zip(specs, configs):
        fam = family_of(cfg["method"])
        if fam is None:
            raise UserError(f"adapter {name} ({d}) is a {cfg['method']} adapter; several adapters in one "
                            f"batch are supported for: {supported_methods()}")
        families.append(fam)
    if len({f.name for f in families}) > 1:
        shown = ", ".join(f"{n}: {cfg['method']}" for (n, _), cfg in zip(specs, configs))
        raise UserError(f"the adapters are of different method families ({shown}); one call serves "
                        f"one family ({', '.join(FAMILIES)})")
    fam = families[0]
    (n0, _), c0 = specs[0], configs[0]
    for (name, d), cfg in zip(specs, configs):
        if cfg.get("pooling") == "cosine":
            raise UserError(f"adapter {name} ({d}) reads the cosine of a pair's two sentences encoded apart; "
                            "several adapters in one batch need one row per example (load it alone)")
    for (name, _), cfg in zip(specs[1:], configs[1:]):
        if not same_base(c0["fingerprint"], cfg["fingerprint"]):
            raise UserError(f"adapters {n0} and {name} were trained on different base models "
                            f"({c0['fingerprint'].get('model')} and {cfg['fingerprint'].get('model')}, "
                            "other weights or shapes); one call serves adapters of one base model")
        for key, default in (("pooling", "cls"), ("modules_to_save", [])):
            if (cfg.get(key) or default) != (c0.get(key) or default):
                raise UserError(f"adapters {n0} and {name} differ in {key} ({c0.get(key) or default} and "
                                f"{cfg.get(key) or default})")
        for option in fam.same_options:
            a, b = (c["method_options"].get(option) for c in (c0, cfg))
            if a != b:
                raise UserError(f"adapters {n0} and {name} have {option}={a} and {b}; adapters of "
                                f"the {fam.name} family in one batch need the same {option}")
    return fam, configs


def load(specs: Sequence[tuple[str, str]], model: str | None = None, *, compute: Any = None) -> MultiAdapter:
    """Loads K adapters (``(name, folder)`` pairs) on their one base model.

    Each adapter goes through :func:`jaxpeft.adapters.load_adapter` (its fingerprint checked
    against the base, its arrays overlaid; so the base is read once per adapter, and one copy is
    kept); the stacked leaves are the union of what their methods train, so a leaf an adapter did
    not train holds the base's value.
    """
    from jaxpeft.adapters import folder

    fam, configs = check_configs(specs)
    modules = tuple(configs[0].get("modules_to_save") or ())
    first, own, tasks = None, [], []
    base: dict[str, Any] = {}
    for _, d in specs:
        loaded, params, method, task = folder.load_adapter(d, model, compute=compute)
        flat = masks.flatten(params)
        own.append({p: flat[p] for p in masks.trainable_paths(method.mask(params, modules))})
        tasks.append(task)
        if first is None:   # one base is kept (the adapters' bases are the same: their fingerprints agree)
            first = (loaded, params, method)
            base = dict(flat)
        # the first adapter's own leaves overlay the base it holds: the base's values of those
        # paths come from an adapter that did not train them (if none did not, none is needed)
        for p in own[0]:
            if p not in own[-1] and base[p] is own[0][p]:
                base[p] = flat[p]
    loaded, params, method = first
    width = max(t.num_labels for t in tasks)
    stacked = stack_adapters(own, base, sorted(set().union(*own)), width)
    frozen = masks.unflatten({k: v for k, v in base.items() if k not in stacked}, params)
    module = loaded.module.clone(num_labels=width)
    lengths = tuple(int(c.get("max_seq_length") or 128) for c in configs)
    return MultiAdapter(tuple(n for n, _ in specs), tuple(d for _, d in specs), fam, tuple(tasks), lengths, module,
                        stacked, frozen, loaded, method.extra_positions())


# ----------------------------------------------------------------------------- mixed input files


@dataclasses.dataclass
class MixedRows:
    """The rows of a mixed input file: each row's adapter (index into the names) and texts."""

    adapter: np.ndarray                  # [n] int32
    texts: list[tuple[str, ...]]         # one or two texts per row
    source: str


def text_columns(task: glue.GlueTask, header: Sequence[str]) -> list[int] | None:
    """Where ``task``'s texts are in ``header``: its GLUE file's column names, or the hub's
    (``sentence``; ``sentence1``/``sentence2``; ``question1``/``question2``; ...)."""
    names = task.tsv_texts if task.tsv_header else task.headed_texts
    for cand in (names, task.hub_texts):
        if cand and all(c in header for c in cand):
            return [header.index(c) for c in cand]
    return None


def read_mixed_tsv(path: str | Path, names: Sequence[str], tasks: Sequence[glue.GlueTask]) -> MixedRows:
    """Reads a TSV whose header has an ``adapter`` column (each row's adapter, one of ``names``) and,
    for each adapter that has rows, its task's text columns (see :func:`text_columns`)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"input file {path} not found" if not path.exists() else f"input {path} is not a file")
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quotechar=None))
    if not rows:
        raise UserError(f"{path}: file is empty")
    header = [h.strip() for h in rows[0]]
    if ADAPTER_COLUMN not in header:
        raise UserError(f"{path}: the header {header} has no {ADAPTER_COLUMN!r} column naming each row's adapter")
    col = header.index(ADAPTER_COLUMN)
    index = {n: i for i, n in enumerate(names)}
    columns: dict[int, list[int]] = {}
    adapter, texts = [], []
    for line, row in enumerate(rows[1:], 2):
        if not any(c.strip() for c in row):
            continue
        where = f"{path}:{line}"
        if len(row) < len(header):
            raise UserError(f"{where}: malformed row, expected {len(header)} tab-separated fields, got {len(row)}")
        name = row[col].strip()
        if name not in index:
            raise UserError(f"{where}: adapter {name!r} is not one of {', '.join(names)} (the names given "
                            "with --adapter=NAME=DIR)")
        k = index[name]
        if k not in columns:
            cols = text_columns(tasks[k], header)
            if cols is None:
                want = tasks[k].tsv_texts if tasks[k].tsv_header else tasks[k].headed_texts
                raise UserError(f"{path}: adapter {name} ({tasks[k].name}) reads the columns {list(want)} or "
                                f"{list(tasks[k].hub_texts)}; the header is {header}")
            columns[k] = cols
        adapter.append(k)
        texts.append(tuple(row[c] for c in columns[k]))
    if not adapter:
        raise UserError(f"{path}: no rows to predict")
    return MixedRows(np.asarray(adapter, np.int32), texts, str(path))


def encode_rows(tokenizer: Any, rows: MixedRows, lengths: Sequence[int]) -> encoding.Encoded:
    """Every row encoded as its own adapter would (its task's texts, its own ``max_seq_length``),
    padded to the longest length."""
    width = max(lengths[k] for k in set(rows.adapter.tolist()))
    n = len(rows.adapter)
    ids = np.zeros((n, width), np.int32)
    types = np.zeros((n, width), np.int32)
    lens = np.zeros((n,), np.int32)
    for k in sorted(set(rows.adapter.tolist())):
        sel = np.flatnonzero(rows.adapter == k)
        cols = tuple(list(c) for c in zip(*(rows.texts[i] for i in sel)))
        enc = encoding.encode(tokenizer, encoding.Examples(cols, None, rows.source), lengths[k])
        ids[sel, :lengths[k]] = enc.input_ids
        types[sel, :lengths[k]] = enc.token_type_ids
        lens[sel] = enc.lengths
    pad = getattr(tokenizer, "pad_token_id", 0) or 0
    if pad:
        ids[np.arange(width)[None, :] >= lens[:, None]] = pad
    return encoding.Encoded(ids, types, lens, None)


def predict_rows(multi: MultiAdapter, rows: MixedRows, *, max_seq_length: int | None = None,
                 batch_size: int = 64) -> list[np.ndarray]:
    """Each row's logits under its own adapter (``[C_k]`` each), in the rows' order; rows of
    different adapters share batches."""
    lengths = [max_seq_length or m for m in multi.max_seq_lengths]
    need = max(lengths) + multi.extra_positions
    if need > multi.loaded.config.max_position_embeddings:
        raise UserError(f"max_seq_length={max(lengths)} plus {multi.extra_positions} virtual tokens exceeds "
                        f"the model's {multi.loaded.config.max_position_embeddings} positions")
    enc = encode_rows(multi.loaded.tokenizer, rows, lengths)
    fn = jax.jit(make_mixed_predict_step(multi.module), compiler_options=multi.module.compute.compiler_options())
    buckets = batches.length_buckets(max(lengths))
    route = rows.adapter

    def routed_batches():
        for idx in batches.eval_order(enc.lengths, batch_size):
            b = batches.make_batch(enc, idx, buckets)
            b[INDEX_KEY] = np.where(idx >= 0, route[np.maximum(idx, 0)], 0).astype(np.int32)
            yield b

    logits = steps.predict_logits(fn, multi.stacked, multi.frozen, routed_batches(), len(enc))
    return [logits[i, :multi.tasks[k].num_labels] for i, k in enumerate(route)]


def prediction_rows(multi: MultiAdapter, rows: MixedRows, logits: Sequence[np.ndarray]
                    ) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a mixed predictions TSV: ``index, adapter, prediction, probabilities``.

    ``prediction`` is the row's label under its own adapter's task (or the value, for regression);
    ``probabilities`` lists that task's labels with their probabilities as ``label:prob`` pairs,
    comma-separated (empty for regression): adapters of different tasks have different label sets.
    """
    header = ["index", "adapter", "prediction", "probabilities"]
    out = []
    for i, (k, z) in enumerate(zip(rows.adapter, logits)):
        task = multi.tasks[k]
        if task.is_regression:
            out.append([str(i), multi.names[k], f"{float(z[0]):.6g}", ""])
            continue
        p = np.asarray(jax.nn.softmax(jnp.asarray(z, jnp.float32)))
        out.append([str(i), multi.names[k], task.label_names[int(np.argmax(z))],
                    ",".join(f"{name}:{x:.6f}" for name, x in zip(task.label_names, p))])
    return header, out


def predict_main(args: Any) -> int:
    """``jaxpeft-predict`` with several ``--adapter=NAME=DIR`` flags (``args``: its parsed flags)."""
    from jaxpeft import compute
    from jaxpeft.adapters import folder

    if args.batch_size <= 0:
        raise UserError(f"--batch_size={args.batch_size}: must be > 0")
    overrides = {k: getattr(args, k) for k in compute.fields() if hasattr(args, k)}
    spec = compute.resolve(args.compute, overrides)
    specs = parse_specs(args.adapter)
    # every input is checked before the model loads
    _, configs = check_configs(specs)
    tasks = [glue.get_task(c["task"]) for c in configs]
    if not args.input:
        raise UserError("several adapters: give --input=FILE.tsv whose 'adapter' column names each row's adapter")
    rows = read_mixed_tsv(args.input, [n for n, _ in specs], tasks)
    if args.output and Path(args.output).is_dir():
        raise UserError(f"output {args.output} is a folder")
    multi = load(specs, args.model, compute=spec)
    logits = predict_rows(multi, rows, max_seq_length=args.max_seq_length, batch_size=args.batch_size)
    header, out = prediction_rows(multi, rows, logits)
    if args.output:
        folder.write_tsv(args.output, header, out)
        print(f"{len(out)} predictions of {len(multi.names)} adapters written to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write("\t".join(header) + "\n" + "".join("\t".join(r) + "\n" for r in out))
    return 0
