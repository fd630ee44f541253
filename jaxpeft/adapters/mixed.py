"""Many adapters on one frozen base, each row of a batch routed to its own: serving K adapters in one
batch, and the forward pass behind multi-task training (:mod:`jaxpeft.training.multitask`).

A :class:`MultiAdapter` holds K adapters of one mixing family -- the exported method's
:attr:`~jaxpeft.methods.base.Method.mix` (``bitfit``, ``prompt`` (prompt tuning and P-tuning's
exports), ``prefix`` (prefix tuning and P-tuning v2), ``lora``, ``ia3``, ``bottleneck``), whose
options in :attr:`~jaxpeft.methods.base.Method.mix_same` agree -- of one task kind, on one frozen
base model. Each adapter's own leaves (what its method trains and exports, and its task head) are
stacked on a leading K axis (``stacked``: ``{param path: [K, ...]}``); everything else is the frozen
base, held once. Heads of tasks with different label counts are zero-padded to the largest count;
each row's outputs are cut to its own adapter's labels by the caller.

The forward pass (:func:`mixed_outputs`) reads a per-row ``adapter_index`` ``[B]``, gathers every
row's leaves (``a[adapter_index]``) and ``jax.vmap``\\ s the ordinary single-adapter model over the
rows with the frozen base broadcast: the frozen matmuls stay one matmul over the whole batch, and
only the adapter's own (small) tensors are per row. So the mixed model computes exactly what each
adapter's own model computes on its rows, whatever the family, and gradients reach only each row's
adapter. In training each row gets its own dropout key.

``jaxpeft-predict --adapter=NAME=DIR --adapter=NAME2=DIR2 ... --input=FILE.tsv`` predicts a file
whose ``adapter`` column names each row's adapter (:func:`predict_main`).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft import masks
from jaxpeft.adapters import folder as folders
from jaxpeft.adapters import predict as prediction
from jaxpeft.data import batches as batching
from jaxpeft.data.encoding import Encoded, Examples, encode
from jaxpeft.errors import UserError
from jaxpeft.models import FAMILIES
from jaxpeft.models.fingerprint import same_base
from jaxpeft.models.heads import head_modules
from jaxpeft.tasks.base import Task
from jaxpeft.training import steps

#: the batch key that routes each row to its adapter
INDEX_KEY = "adapter_index"
#: the input column that names each row's adapter
ADAPTER_COLUMN = "adapter"


def mixable_methods() -> str:
    from jaxpeft import methods

    fams: dict[str, list[str]] = {}
    for m in methods.REGISTRY.values():
        mix = m().for_inference().mix
        if mix:
            fams.setdefault(mix, []).append(m.name)
    return ", ".join(f"{f} ({'/'.join(ms)})" for f, ms in fams.items())


# ----------------------------------------------------------------------------- the forward pass


def gather_rows(stacked: dict[str, jax.Array], index: jax.Array) -> dict[str, jax.Array]:
    """Each row's leaves: ``{path: a[index]}`` (``[B, ...]``)."""
    return {p: jnp.take(a, index, axis=0) for p, a in stacked.items()}


def mixed_outputs(module: Any, stacked: dict[str, jax.Array], frozen: Any, batch: dict, *,
                  deterministic: bool = True, rng: jax.Array | None = None,
                  leaf_dropout: dict[str, float] | None = None) -> jax.Array:
    """Outputs ``[B, ...]`` of ``module`` (the single-adapter model, the widest head) with row ``b``
    computed under adapter ``batch["adapter_index"][b]``.

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
    """``predict(stacked, frozen, batch) -> outputs [B, ...]`` (no dropout); the calling convention
    of :func:`jaxpeft.training.steps.make_predict_step`."""

    def predict(stacked, frozen, batch):
        return mixed_outputs(module, stacked, frozen, batch)

    return predict


def pad_head(path: str, a: Any, width: int, heads: Sequence[str]) -> Any:
    """A head's output layer padded with zeros to ``width`` outputs (``<head>/kernel`` ``[H, C]``,
    ``<head>/bias`` ``[C]``, the last dense layer of each head); other leaves unchanged."""
    top = path.split("/", 1)[0]
    if top not in heads or not path.endswith(("/kernel", "/bias")) or a.shape[-1] == width:
        return a
    pad = [(0, 0)] * (a.ndim - 1) + [(0, width - a.shape[-1])]
    return jnp.pad(jnp.asarray(a), pad)


def stack_adapters(own: Sequence[dict[str, Any]], base: dict[str, Any], paths: Sequence[str], width: int,
                   heads: Sequence[str] = ("classifier",)) -> dict[str, jax.Array]:
    """``{path: [K, ...]}`` of ``paths``: adapter ``k``'s leaf from ``own[k]`` (``{path: array}``),
    or the base's (``base``) where it has none; heads padded to ``width`` outputs."""
    out = {}
    for path in paths:
        leaves = [pad_head(path, o[path] if path in o else base[path], width, heads) for o in own]
        shapes = {tuple(x.shape) for x in leaves}
        if len(shapes) > 1:
            raise UserError(f"the adapters' {path} have different shapes {sorted(shapes)}; adapters of one "
                            "batch must have the same structure (same number of virtual tokens, same LoRA rank)")
        out[path] = jnp.stack([jnp.asarray(x) for x in leaves])
    return out


# ----------------------------------------------------------------------------- K adapters from folders


@dataclasses.dataclass
class MultiAdapter:
    """K adapters of one mixing family on one frozen base (see the module docstring)."""

    names: tuple[str, ...]
    dirs: tuple[str, ...]
    mix: str
    tasks: tuple[Task, ...]
    max_seq_lengths: tuple[int, ...]
    module: Any                       # the single-adapter model with the widest head
    stacked: dict[str, jax.Array]     # {path: [K, ...]}
    frozen: Any                       # the base params, holes at the stacked paths
    loaded: Any                       # the first adapter's LoadedModel (config, tokenizer)
    extra_positions: int = 0          # virtual tokens added to every row (prompt family)
    text_columns: tuple[tuple[str, ...] | None, ...] = ()

    @property
    def kind(self) -> str:
        return self.tasks[0].kind


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


def check_configs(specs: Sequence[tuple[str, str]]) -> tuple[str, list[folders.AdapterFolder]]:
    """Reads every adapter's ``adapter_config.json`` and checks, before any model is loaded, that
    they are of one mixing family and one task kind, on one base model, with one pooling and the
    options their family needs to agree."""
    read = [folders.read_adapter(d) for _, d in specs]
    for (name, d), f in zip(specs, read):
        if f.method.mix is None:
            raise UserError(f"adapter {name} ({d}) is a {f.method.name} adapter; several adapters in one batch "
                            f"are supported for: {mixable_methods()}")
        if f.record.get("pooling") == "cosine":
            raise UserError(f"adapter {name} ({d}) reads the cosine of a pair's two sentences encoded apart; "
                            "several adapters in one batch need one row per example (load it alone)")
    if len({f.method.mix for f in read}) > 1:
        shown = ", ".join(f"{n}: {f.method.name}" for (n, _), f in zip(specs, read))
        raise UserError(f"the adapters are of different method families ({shown}); one batch mixes adapters of "
                        f"one family ({mixable_methods()})")
    if len({f.task_kind for f in read}) > 1:
        shown = ", ".join(f"{n}: {f.task_kind}" for (n, _), f in zip(specs, read))
        raise UserError(f"the adapters are of different task kinds ({shown}); one batch mixes adapters of one kind")
    (n0, _), f0 = specs[0], read[0]
    # options whose default is the family's compare resolved (peft's folders name no family)
    family = next((FAMILIES[f.record["model_family"]] for f in read if f.record.get("model_family") in FAMILIES),
                  None)
    values0 = f0.method.mix_values(family)
    for (name, _), f in zip(specs[1:], read[1:]):
        fp0, fp = f0.record.get("fingerprint"), f.record.get("fingerprint")
        if fp0 and fp and not same_base(fp0, fp):
            raise UserError(f"adapters {n0} and {name} were trained on different base models "
                            f"({fp0.get('model')} and {fp.get('model')}, other weights or shapes); one batch "
                            "serves adapters of one base model")
        for key, default in (("pooling", "cls"), ("modules_to_save", [])):
            if (f.record.get(key) or default) != (f0.record.get(key) or default):
                raise UserError(f"adapters {n0} and {name} differ in {key} ({f0.record.get(key) or default} and "
                                f"{f.record.get(key) or default})")
        values = f.method.mix_values(family)
        for option in f0.method.mix_same:
            a, b = (getattr(g.method, option, None) for g in (f0, f))
            if values0[option] != values.get(option):
                raise UserError(f"adapters {n0} and {name} have {option}={a} and {b}; adapters of the "
                                f"{f0.method.mix} family in one batch need the same {option}")
    return f0.method.mix, read


def load(specs: Sequence[tuple[str, str]], model: str | None = None, *, compute: Any = None) -> MultiAdapter:
    """Loads K adapters (``(name, folder)`` pairs) on their one base model.

    Each adapter goes through :func:`jaxpeft.adapters.folder.load_adapter` (its fingerprint checked,
    its arrays overlaid); the stacked leaves are the union of what their methods train, so a leaf an
    adapter did not train holds the base's value.
    """
    mix, read = check_configs(specs)
    first, own, task_list = None, [], []
    base: dict[str, Any] = {}
    for (_, d), f in zip(specs, read):
        loaded, params, method, task = folders.load_adapter(d, model, compute=compute)
        flat = masks.flatten(params)
        heads = head_modules(loaded.family, loaded.module.head)
        modules = folders._present(params, f.modules_to_save)
        own.append({p: flat[p] for p in masks.trainable_paths(method.mask(params, loaded.family, heads, modules))})
        task_list.append(task)
        if first is None:   # one base is kept (the adapters' bases are the same: their fingerprints agree)
            first = (loaded, params, method, heads)
            base = dict(flat)
        # the first adapter's own leaves overlay the base it holds: the base's values of those
        # paths come from an adapter that did not train them (if none did not, none is needed)
        for p in own[0]:
            if p not in own[-1] and base[p] is own[0][p]:
                base[p] = flat[p]
    loaded, params, method, heads = first
    width = max(t.num_labels for t in task_list) if task_list[0].kind != "span" else 2
    stacked = stack_adapters(own, base, sorted(set().union(*own)), width, heads)
    frozen = masks.unflatten({k: v for k, v in base.items() if k not in stacked}, params)
    module = loaded.module.clone(head=dataclasses.replace(loaded.module.head, num_labels=width))
    lengths = tuple(int(f.record.get("max_seq_length") or 128) for f in read)
    columns = tuple(tuple(f.record["text_columns"]) if f.record.get("text_columns") else None for f in read)
    return MultiAdapter(tuple(n for n, _ in specs), tuple(d for _, d in specs), mix, tuple(task_list), lengths,
                        module, stacked, frozen, loaded, method.extra_positions(), columns)


# ----------------------------------------------------------------------------- mixed input files


@dataclasses.dataclass
class MixedRows:
    """The rows of a mixed input file: each row's adapter (index into the names) and texts."""

    adapter: np.ndarray                  # [n] int32
    texts: list[tuple[str, ...]]         # one or two texts per row
    source: str


def read_mixed_tsv(path: str | Path, multi: MultiAdapter) -> MixedRows:
    """Reads a TSV whose header has an ``adapter`` column (each row's adapter, one of the names) and,
    for each adapter that has rows, its task's text columns (:func:`jaxpeft.adapters.predict.text_columns`)."""
    header, rows = prediction.read_table(path)
    if ADAPTER_COLUMN not in header:
        raise UserError(f"{path}: the header {header} has no {ADAPTER_COLUMN!r} column naming each row's adapter")
    col = header.index(ADAPTER_COLUMN)
    index = {n: i for i, n in enumerate(multi.names)}
    columns: dict[int, list[int]] = {}
    adapter, texts = [], []
    for line, row in rows:
        if not any(c.strip() for c in row):
            continue
        where = f"{path}:{line}"
        if len(row) < len(header):
            raise UserError(f"{where}: malformed row, expected {len(header)} tab-separated fields, got {len(row)}")
        name = row[col].strip()
        if name not in index:
            raise UserError(f"{where}: adapter {name!r} is not one of {', '.join(multi.names)} (the names given "
                            "with --adapter=NAME=DIR)")
        k = index[name]
        if k not in columns:
            cols = prediction.text_columns(multi.tasks[k], header, multi.text_columns[k] if multi.text_columns else None)
            if cols is None:
                raise UserError(f"{path}: adapter {name} ({multi.tasks[k].name}) finds no text columns in the "
                                f"header {header}")
            columns[k] = cols
        adapter.append(k)
        texts.append(tuple(row[c] for c in columns[k]))
    if not adapter:
        raise UserError(f"{path}: no rows to predict")
    return MixedRows(np.asarray(adapter, np.int32), texts, str(path))


def encode_rows(tokenizer: Any, rows: MixedRows, lengths: Sequence[int]) -> Encoded:
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
        enc = encode(tokenizer, Examples(cols, None, rows.source), lengths[k])
        ids[sel, :lengths[k]] = enc.input_ids
        types[sel, :lengths[k]] = enc.token_type_ids
        lens[sel] = enc.lengths
    pad = getattr(tokenizer, "pad_token_id", 0) or 0
    if pad:
        ids[np.arange(width)[None, :] >= lens[:, None]] = pad
    return Encoded(ids, types, lens, None)


def row_outputs(multi: MultiAdapter, rows: MixedRows, *, max_seq_length: int | None = None,
                batch_size: int = 64) -> tuple[np.ndarray, Encoded]:
    """Each row's outputs under its own adapter, in the rows' order (the widest head's: row ``i``'s
    own are ``[:num_labels]`` of its task), and the encoded rows; rows of different adapters share
    batches."""
    lengths = [max_seq_length or m for m in multi.max_seq_lengths]
    limit = getattr(multi.loaded.config, "max_position_embeddings", None)
    if limit is not None and max(lengths) + multi.extra_positions > limit:
        raise UserError(f"max_seq_length={max(lengths)} plus {multi.extra_positions} virtual tokens exceeds "
                        f"the model's {limit} positions")
    enc = encode_rows(multi.loaded.tokenizer, rows, lengths)
    fn = jax.jit(make_mixed_predict_step(multi.module), compiler_options=multi.module.compute.compiler_options())
    buckets = batching.length_buckets(max(lengths))
    route = rows.adapter

    def routed_batches():
        for idx in batching.eval_order(enc.lengths, batch_size):
            b = batching.make_batch(enc, idx, buckets)
            b[INDEX_KEY] = np.where(idx >= 0, route[np.maximum(idx, 0)], 0).astype(np.int32)
            yield b

    return steps.predict_outputs(fn, multi.stacked, multi.frozen, routed_batches(), len(enc)), enc


def predict_rows(multi: MultiAdapter, rows: MixedRows, *, max_seq_length: int | None = None,
                 batch_size: int = 64) -> list[dict[str, Any]]:
    """Each row's prediction under its own adapter, in the rows' order (:func:`row_outputs`)."""
    out, enc = row_outputs(multi, rows, max_seq_length=max_seq_length, batch_size=batch_size)
    route = rows.adapter
    preds: list[dict[str, Any]] = [{}] * len(route)
    for k in sorted(set(route.tolist())):
        sel = np.flatnonzero(route == k)
        task = multi.tasks[k]
        got = task.predictions(out[sel][..., :task.num_labels], enc.rows(sel), None)
        for i, p in zip(sel, got):
            preds[i] = p
    return preds


def predict_main(args: Any) -> int:
    """``jaxpeft-predict`` with several ``--adapter=NAME=DIR`` flags (``args``: its parsed flags)."""
    from jaxpeft import compute

    if args.batch_size <= 0:
        raise UserError(f"--batch_size={args.batch_size}: must be > 0")
    overrides = {k: getattr(args, k) for k in compute.fields() if hasattr(args, k)}
    spec = compute.resolve(args.compute, overrides)
    specs = parse_specs(args.adapter)
    _, read = check_configs(specs)   # every input is checked before the model loads
    if read[0].task_kind != "sequence":
        raise UserError("several adapters in one call: sequence-classification adapters (tagging and QA "
                        "adapters predict one at a time)")
    if not args.input:
        raise UserError("several adapters: give --input=FILE.tsv whose 'adapter' column names each row's adapter")
    if args.output and Path(args.output).is_dir():
        raise UserError(f"output {args.output} is a folder")
    multi = load(specs, args.model, compute=spec)
    rows = read_mixed_tsv(args.input, multi)
    preds = predict_rows(multi, rows, max_seq_length=args.max_seq_length, batch_size=args.batch_size)
    text = prediction.render(preds, [multi.names[k] for k in rows.adapter], "sequence")
    prediction.write_text(args.output, text)
    if args.output:
        print(f"{len(preds)} predictions of {len(multi.names)} adapters written to {args.output}", file=sys.stderr)
    return 0
