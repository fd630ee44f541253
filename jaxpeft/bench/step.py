"""Train-step benchmarks: step time, throughput, peak memory, compile time, FLOPs and MFU.

One configuration = (family, model size, method, batch, sequence length). The step benchmarked is
the library's own (:func:`jaxpeft.training.steps.make_train_step` on the task model's loss, jitted
with donated state) on random-init weights of the model's shape and random token ids with every
position real, so numbers compare with the PyTorch peer in ``jaxpeft.bench.peer`` on the same shapes.

The family is ``bert`` (the sizes of :mod:`jaxpeft.models.sizes`) or another encoder family at its
base checkpoint's shapes (:func:`family_config`: the transformers config the peer builds its model
from, read by the family's own config class, so nothing is written to disk). A method the family
cannot run (BitFit on ModernBERT, which has no biases) raises the family's one-line
:class:`~jaxpeft.errors.UserError`, which ``jaxpeft-bench`` records as skipped.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft import masks, methods, runtime
from jaxpeft.bench import peer
from jaxpeft.compute import Compute
from jaxpeft.config import Optim
from jaxpeft.errors import UserError
from jaxpeft.models.bert import FAMILY as BERT
from jaxpeft.models.bert import BertConfig
from jaxpeft.models import quant, sizes
from jaxpeft.models.heads import Head, head_modules
from jaxpeft.models.build import build_module, trace_init
from jaxpeft.tasks.base import sequence_loss
from jaxpeft.training import optim, steps

#: The benchmarked shapes: every size of :mod:`jaxpeft.models.sizes` (``tiny`` for tests, up to
#: ``10.7b``, XLM-R XXL's shape), BERT's architecture.
SIZES: dict[str, BertConfig] = {name: sizes.config(name) for name in sizes.ORDER}
#: Options of the benchmarked methods (the peer's settings: 20 virtual tokens).
METHOD_OPTIONS = {"num_virtual_tokens": 20}
#: The encoder families ``--families`` takes: ``bert`` and those of ``peer.FAMILY_CONFIGS``
#: (``xlm-roberta`` is read by the roberta family).
FAMILY_NAMES = peer.FAMILY_NAMES
#: The encoder's dropout fields of each family's config (``--dropout`` sets them all).
DROPOUT_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout",
                  "embedding_dropout", "mlp_dropout")


def family_config(family: str, size: str = "base") -> tuple[Any, Any]:
    """``(Family, config)`` of a benchmarked encoder: BERT at a size of :data:`SIZES`; another family
    (``roberta``, ``deberta-v2``, ...) at ``base`` (its base checkpoint's shapes) or ``tiny``, read
    by the family's config class from transformers' config of it
    (:func:`jaxpeft.bench.peer.hf_config`), the one the peer builds its model from."""
    if family == "bert":
        if size not in SIZES:
            raise UserError(f"unknown size {size!r}; the sizes: {', '.join(SIZES)}")
        return BERT, SIZES[size]
    from jaxpeft.models import family_for

    try:
        hf = peer.hf_config(family, size)
    except peer.Unavailable as e:
        raise UserError(str(e)) from None
    fam = family_for(hf.model_type)
    try:
        return fam, fam.config.from_hf(hf.to_dict())
    except (TypeError, ValueError) as e:
        raise UserError(f"--families={family}: transformers' config is not one jaxpeft reads: {e}") from None


def with_dropout(cfg: Any, rate: float) -> Any:
    """``cfg`` with every encoder dropout rate of its family (:data:`DROPOUT_FIELDS`) at ``rate``."""
    names = {f.name for f in dataclasses.fields(cfg)}
    return cfg.replace(**{k: rate for k in DROPOUT_FIELDS if k in names})


def layer_matmul_params(shapes: Any, prefix: str, added: str | None = None) -> int:
    """The weights of the first encoder layer's matrices (``prefix/.../layer_0/...`` or ``layers_0``
    2-D kernels, a method's own ``added`` ones left out): the multiply-adds per token of one layer's
    projections and MLP. BERT: ``4 H^2 + 2 H I``; a gated MLP (ModernBERT) ``4 H^2 + 3 H I``."""
    import re

    pat = re.compile(rf"^{re.escape(prefix)}/(.*/)?layers?_0/.*kernel$")
    return sum(int(np.prod(v.shape)) for p, v in masks.flatten(shapes).items()
               if pat.match(p) and len(v.shape) == 2 and not (added and re.search(added, p)))


def method_options(method: str) -> dict:
    """:data:`METHOD_OPTIONS` that ``method`` takes."""
    fields = {f.name for f in dataclasses.fields(methods.REGISTRY[method])}
    return {k: v for k, v in METHOD_OPTIONS.items() if k in fields}


@dataclasses.dataclass
class BenchConfig:
    size: str = "base"        # a size of SIZES (bert); base or tiny (the other families)
    method: str = "bitfit"
    batch: int = 64
    seq: int = 128
    compute: Compute = dataclasses.field(default_factory=Compute)   # how to compute (jaxpeft.compute)
    steps: int = 20           # steps per timed repeat
    repeats: int = 5
    warmup: int = 3
    peak_tflops: float = 790.0  # measured bf16 matmul rate of the device (H200: ~790)
    dropout: float | None = None  # override the encoder's dropout (None: the family's own; BERT's 0.1)
    mesh: str | None = None     # e.g. "data:2" or "data:1,fsdp:2"; None: one device, plain jit
    family: str = "bert"        # an encoder family of FAMILY_NAMES


def analytic_flops(cfg: Any, method: str, batch: int, seq: int, virtual: int = 20,
                   layer_params: int | None = None) -> float:
    """Matmul FLOPs of one train step (forward + backward), counting 2 per multiply-add.

    The whole model's, as the peer computes it: with ``cls_only_last_layer`` our step skips most of
    the last layer's (its queries, attention, output projection and feed-forward block for all
    rows but [CLS]), so the MFU on this count is above the matrix units' actual utilisation there.

    Per layer and token, the projections and MLP cost ``2 (4 H^2 + 2 H I)`` forward; attention
    scores and mixing ``4 T S H`` per sequence. Full fine-tuning costs 3x the forward (dX and dW);
    methods that train no matrix (BitFit, prompts, prefixes) need dX only: 2x for the projections,
    3x for attention (its backward has no weights); Frozen (head only) is forward only.

    ``layer_params``: a layer's matrix weights where they are not BERT's ``4 H^2 + 2 H I``
    (:func:`layer_matmul_params`: ModernBERT's gated MLP). Other families' extra terms are not
    counted (DeBERTa's relative-position attention, ModernBERT's local attention window), so
    their MFU is on BERT's count of that shape.
    """
    h, i, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    per_token = 4 * h * h + 2 * h * i if layer_params is None else layer_params
    m = methods.create(method, method_options(method))
    t = seq + (0 if m.extra_keys() else m.extra_positions())   # query length (virtual tokens)
    s = t + m.extra_keys()                                      # key length (prefixes)
    proj = 2.0 * batch * t * per_token * n
    attn = 4.0 * batch * t * s * h * n
    return m.train_flops(proj, attn)


def _random_batch(cfg: BertConfig, batch: int, seq: int, seed: int = 0) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    return {
        "input_ids": jnp.asarray(rng.integers(1, cfg.vocab_size, size=(batch, seq)), jnp.int32),
        "attention_mask": jnp.ones((batch, seq), jnp.int32),
        "token_type_ids": jnp.zeros((batch, seq), jnp.int32),
        "labels": jnp.asarray(rng.integers(0, 2, size=batch), jnp.int32),
        "weights": jnp.ones((batch,), jnp.float32),
    }


def _cost(compiled) -> dict[str, float]:
    out: dict[str, float] = {}
    try:
        c = compiled.cost_analysis()
        c = c[0] if isinstance(c, (list, tuple)) else c
        out["xla_flops"] = float(c.get("flops", float("nan")))
    except Exception:  # not every backend reports it
        pass
    try:
        m = compiled.memory_analysis()
        out["xla_temp_bytes"] = float(m.temp_size_in_bytes)
        out["xla_argument_bytes"] = float(m.argument_size_in_bytes)
        out["xla_output_bytes"] = float(m.output_size_in_bytes)
        # what the step holds at once: inputs (params, state, batch) + outputs not aliased to
        # donated inputs + scratch
        out["step_bytes"] = float(m.argument_size_in_bytes + m.output_size_in_bytes
                                  - m.alias_size_in_bytes + m.temp_size_in_bytes)
    except Exception:
        pass
    return out


@dataclasses.dataclass
class StepSetup:
    """Everything of one configuration's step but its arrays: the model, the mesh, the params'
    shapes, the method's mask, how each leaf is stored, the optimizer and the jitted step."""

    cfg: Any
    module: Any
    method: Any
    plan: Any
    traced: Any
    mask: Any
    storage: dict
    tx: Any
    step: Any
    family: Any = BERT
    #: (batch, seq) -> (the step compiled by :meth:`memory`, its compile seconds), which a
    #: one-device run of the same shapes reuses instead of compiling again
    compiled: dict = dataclasses.field(default_factory=dict)

    def abstract(self, batch: int, seq: int) -> tuple[Any, Any, Any]:
        """Shape structs of the step's state, frozen params and batch (nothing is allocated)."""
        trainable, frozen = quant.split(sizes.stored_tree(self.traced.shapes, self.storage), self.mask)
        state = jax.eval_shape(lambda t: steps.init_state(t, self.tx, 0), trainable)
        example = _random_batch(self.cfg, 1, 1)
        inputs = {k: jax.ShapeDtypeStruct((batch, seq) if v.ndim == 2 else (batch,), v.dtype)
                  for k, v in example.items()}
        return state, frozen, inputs

    def memory(self, batch: int, seq: int) -> dict[str, int] | None:
        """XLA's memory analysis of the step compiled for ``batch`` rows of ``seq`` tokens, without
        allocating anything (``jaxpeft.compute.compiled_memory``: per device)."""
        from jaxpeft.compute import compiled_memory

        state, frozen, inputs = self.abstract(batch, seq)
        t0 = time.perf_counter()
        compiled = self.step.lower(state, frozen, inputs, np.float32(1e-4)).compile()
        if self.plan.mesh.size == 1:   # the first compilation's time (a repeat may hit JAX's cache)
            self.compiled.setdefault((batch, seq), (compiled, time.perf_counter() - t0))
        return compiled_memory(compiled)


def setup_step(bc: BenchConfig) -> StepSetup:
    """The :class:`StepSetup` of a configuration (shapes only: nothing is allocated).

    Raises:
        UserError: what the family (or the compute spec, or the mesh) cannot run, in one line.
    """
    from jaxpeft.training import sharding

    runtime.set_prng_impl(bc.compute.prng_impl)
    family, cfg = family_config(bc.family, bc.size)
    if bc.dropout is not None:
        cfg = with_dropout(cfg, bc.dropout)
    method = methods.create(bc.method, method_options(bc.method))
    head = Head("sequence", 2)
    module = build_module(family, cfg, head, method, bc.compute)
    plan = sharding.create_plan(bc.mesh or "data:1", devices=None if bc.mesh else jax.devices()[:1])
    plan.check_batch_size(bc.batch)
    traced = trace_init(module)
    method.check_model(traced.shapes, family)   # as a training run does: BitFit without biases ends here
    mask = method.mask(traced.shapes, family, head_modules(family, head))
    storage = sizes.storage_plan(traced.shapes, mask, bc.compute, family.prefix, family.word_embeddings)
    tx = optim.make_optimizer(Optim(learning_rate=1e-4))
    trainable, frozen = quant.split(sizes.stored_tree(traced.shapes, storage), mask)
    state_sh = plan.state_shardings(jax.eval_shape(lambda t: steps.init_state(t, tx, 0), trainable))
    loss = steps.model_loss(module, lambda logits, b: sequence_loss(logits, b["labels"], b["weights"], False))
    step = plan.jit_train_step(steps.make_train_step(loss, tx), state_sh, plan.tree_shardings(frozen),
                               compiler_options=bc.compute.compiler_options())
    return StepSetup(cfg, module, method, plan, traced, mask, storage, tx, step, family)


def build_step(bc: BenchConfig, setup: StepSetup | None = None):
    """Module, compiled step, state, frozen params and batch for one configuration.

    The params are made leaf by leaf as a run of ``random:SIZE`` makes them
    (:func:`jaxpeft.models.sizes.init_stored`): frozen kernels directly in ``--base_dtype``. With
    ``bc.mesh`` the step is a training run's sharded one (``jaxpeft.training.sharding``): ``batch``
    is the global batch, split over the mesh's data-parallel devices.
    """
    su = setup or setup_step(bc)
    plan = su.plan
    params = sizes.init_stored(su.module, su.method, su.mask, su.storage, 0, plan.tree_shardings, su.traced)
    counts = masks.count(su.traced.shapes, su.mask)
    trainable, frozen = quant.split(params, su.mask)
    state, _ = plan.init(lambda t: steps.init_state(t, su.tx, 0), trainable, shardings=plan.state_shardings)
    del params, trainable
    batch = plan.global_batch({k: np.asarray(v) for k, v in _random_batch(su.cfg, bc.batch, bc.seq).items()})
    if (bc.batch, bc.seq) in su.compiled:   # compiled for its memory analysis already (one device)
        compiled, compile_s = su.compiled.pop((bc.batch, bc.seq))
    else:
        t0 = time.perf_counter()
        compiled = su.step.lower(state, frozen, batch, np.float32(1e-4)).compile()
        compile_s = time.perf_counter() - t0
    return su.cfg, compiled, state, frozen, batch, compile_s, counts, plan.mesh.size


def run(bc: BenchConfig, setup: StepSetup | None = None) -> dict[str, Any]:
    """Benchmarks one configuration (its :class:`StepSetup` if made already); returns one JSON-able
    record."""
    su = setup or setup_step(bc)
    cfg, compiled, state, frozen, batch, compile_s, (trainable, total), ndev = build_step(bc, su)
    lr = np.float32(1e-4)
    for _ in range(bc.warmup):
        state, m = compiled(state, frozen, batch, lr)
    jax.block_until_ready(m)
    times = []
    for _ in range(bc.repeats):
        t0 = time.perf_counter()
        for _ in range(bc.steps):
            state, m = compiled(state, frozen, batch, lr)
        jax.block_until_ready((state, m))
        times.append((time.perf_counter() - t0) / bc.steps)
    step_s = statistics.median(times)
    flops = analytic_flops(cfg, bc.method, bc.batch, bc.seq, METHOD_OPTIONS["num_virtual_tokens"],
                           layer_matmul_params(su.traced.shapes, su.family.prefix, su.method.added))
    dev = jax.devices()[0]
    stats = dev.memory_stats() or {}
    rec = {
        **{k: v for k, v in dataclasses.asdict(bc).items() if k != "compute"}, **bc.compute.to_dict(),
        "device": dev.device_kind, "platform": dev.platform, "jax": jax.__version__,
        "devices": ndev,
        "trainable_params": trainable, "total_params": total,
        "step_ms": 1e3 * step_s, "step_ms_spread": 1e3 * (max(times) - min(times)),
        "seq_per_s": bc.batch / step_s, "tokens_per_s": bc.batch * bc.seq / step_s,
        "compile_s": compile_s, "analytic_flops": flops,
        "mfu": flops / step_s / (bc.peak_tflops * 1e12 * ndev),
        "peak_bytes": stats.get("peak_bytes_in_use"), "loss": float(m["loss"]),
        **_cost(compiled),
    }
    if not np.isfinite(rec["loss"]):
        raise FloatingPointError(f"non-finite loss in {bc}")
    return rec


def matmul_peak_tflops(n: int = 8192, dtype: str = "bfloat16", iters: int = 10) -> float:
    """Measured dense matmul rate on random data (the MFU denominator)."""
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(k1, (n, n), dtype)
    b = jax.random.normal(k2, (n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    for _ in range(3):
        f(a, b).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(iters):
        out = f(a, b)
    out.block_until_ready()
    return 2 * n ** 3 * iters / (time.perf_counter() - t0) / 1e12


# ----------------------------------------------------------------------------- reports

GIB = 1024 ** 3


def _family(r: dict) -> str:
    """A record's family (records written before there were families are BERT's)."""
    return r.get("family") or "bert"


def _key(r: dict) -> tuple:
    return (_family(r), r["size"], r["method"], r["batch"], r["seq"])


def _family_order(family: str) -> int:
    return FAMILY_NAMES.index(family) if family in FAMILY_NAMES else len(FAMILY_NAMES)


def _method_order(method: str) -> int:
    return METHOD_ORDER.index(method) if method in METHOD_ORDER else 99


def variant(r: dict) -> str:
    """How our step was computed, beyond the shape: the compute spec's fields (jaxpeft.compute)."""
    parts = [f"{r.get('dtype', '?')}", f"attention={r.get('attention_impl', '?')}",
             f"norm={r.get('norm_impl', '?')}", f"dropout_masks={r.get('dropout_impl', '?')}"]
    if r.get("remat", "none") != "none":
        parts.append(f"remat={r['remat']}")
    if r.get("dropout") is not None:
        parts.append(f"dropout={r['dropout']:g}")
    parts.append("last_layer=" + ("cls" if r.get("cls_only_last_layer", True) else "all"))
    if "triton_gemm" in r:
        parts.append("triton_gemm=" + ("on" if r["triton_gemm"] else "off"))
    if "gemm_autotune" in r:
        parts.append("autotune=" + ("on" if r["gemm_autotune"] else "off"))
    return " ".join(parts)


def _single(r: dict) -> bool:
    return not r.get("mesh")


def _fmt(x: float | None, spec: str = ",.0f") -> str:
    return "—" if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, spec)


def speed_table(records: list[dict]) -> str:
    """Markdown: ours vs the peer (eager, torch.compile) per family/size/method/batch, with ratios."""
    ours = {_key(r) + (variant(r),): r for r in records if r.get("framework", "jaxpeft") == "jaxpeft"
            and "seq_per_s" in r and not r.get("capacity") and _single(r)}
    peer = {(_key(r), r["mode"]): r for r in records if r.get("framework", "").startswith("torch")}
    lines = ["| family | size | method | batch | variant | jaxpeft seq/s | MFU | step GiB | compile s "
             "| peft eager seq/s | peft compile seq/s | ours / compile | ours / eager |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for kv in sorted(ours, key=lambda k: (_family_order(k[0]), k[0], k[1], _method_order(k[2]), k[3], k[4], k[5])):
        r, k = ours[kv], kv[:5]
        pe, pc = peer.get((k, "eager"), {}), peer.get((k, "compile"), {})

        def peer_cell(p):
            if "error" in p:
                return "fails"
            if "skipped" in p:
                return "skipped"
            return _fmt(p.get("seq_per_s"))

        def ratio(p):
            return f"{r['seq_per_s'] / p['seq_per_s']:.2f}x" if p.get("seq_per_s") else "—"

        mem = r.get("step_bytes") or r.get("peak_bytes") or float("nan")
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {kv[5]} | {_fmt(r['seq_per_s'])} | {100 * r['mfu']:.1f}% "
                     f"| {_fmt(mem / GIB, '.2f')} | {r['compile_s']:.1f} "
                     f"| {peer_cell(pe)} | {peer_cell(pc)} | {ratio(pc)} | {ratio(pe)} |")
    return "\n".join(lines)


def memory_table(records: list[dict]) -> str:
    """Markdown: peak memory per method vs full fine-tuning, and the largest batch that ran."""
    ours = [dict(r, peak_bytes=r.get("step_bytes") or r.get("peak_bytes")) for r in records
            if r.get("framework", "jaxpeft") == "jaxpeft" and (r.get("step_bytes") or r.get("peak_bytes"))
            and not r.get("capacity") and _single(r)]
    cap = {(_family(r), r["size"], r["method"], r["seq"]): r for r in records if r.get("capacity")}
    peer = {(_key(r)): r for r in records if r.get("framework", "").startswith("torch")
            and r.get("mode") == "eager" and r.get("peak_bytes")}
    full = {(_family(r), r["size"], r["batch"], r["seq"], variant(r)): r["peak_bytes"] for r in ours
            if r["method"] == "full"}
    lines = ["| family | size | method | batch | variant | step GiB (XLA) | vs full (same variant) "
             "| peft eager peak GiB | largest batch |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(ours, key=lambda r: (_family_order(_family(r)), _family(r), r["size"], r["batch"],
                                         _method_order(r["method"]), variant(r))):
        f = full.get((_family(r), r["size"], r["batch"], r["seq"], variant(r)))
        c = cap.get((_family(r), r["size"], r["method"], r["seq"]))
        p = peer.get(_key(r))
        lines.append(f"| {_family(r)} | {r['size']} | {r['method']} | {r['batch']} | {variant(r)} "
                     f"| {r['peak_bytes'] / GIB:.2f} "
                     f"| {_fmt(r['peak_bytes'] / f if f else None, '.2f')}{'x' if f else ''} "
                     f"| {_fmt(p['peak_bytes'] / GIB if p else None, '.2f')} "
                     f"| {_fmt(c.get('max_batch') if c else None)} |")
    return "\n".join(lines)


METHOD_ORDER = ["full", "frozen", "bitfit", "prompt", "ptuning", "prefix", "ptuning_v2", "lora", "ia3", "bottleneck",
                "adapter"]


def scaling_table(records: list[dict]) -> str:
    """Markdown: runs on a mesh of several devices against one device at the same per-device batch."""
    one = {_key(r): r for r in records
           if r.get("framework", "jaxpeft") == "jaxpeft" and "seq_per_s" in r and _single(r)}
    lines = ["| family | size | method | mesh | global batch | seq/s | seq/s per device | 1-device seq/s (same "
             "per-device batch) | scaling efficiency | step GiB per device |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if _single(r) or "seq_per_s" not in r:
            continue
        n = r.get("devices", 1)
        ref = one.get((_family(r), r["size"], r["method"], r["batch"] // n, r["seq"]))
        eff = f"{r['seq_per_s'] / (n * ref['seq_per_s']):.0%}" if ref else "—"
        lines.append(f"| {_family(r)} | {r['size']} | {r['method']} | {r['mesh']} | {r['batch']} "
                     f"| {r['seq_per_s']:,.0f} | {r['seq_per_s'] / n:,.0f} | {_fmt(ref['seq_per_s'] if ref else None)} "
                     f"| {eff} | {_fmt((r.get('step_bytes') or float('nan')) / GIB, '.2f')} |")
    return "\n".join(lines)


def peer_only_table(records: list[dict]) -> str | None:
    """Markdown: the peer's rows that have no row of ours with the same family/size/method/batch/seq
    (a ``--no_ours`` run), which the speed and memory tables leave out; None when there are none."""
    # the rows speed_table pairs the peer with
    ours = {_key(r) for r in records if r.get("framework", "jaxpeft") == "jaxpeft" and "seq_per_s" in r
            and not r.get("capacity") and _single(r)}
    rows = [r for r in records if r.get("framework", "").startswith("torch") and _key(r) not in ours
            and "skipped" not in r]
    if not rows:
        return None
    lines = ["| family | size | method | batch | seq | mode | peft seq/s | step ms | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (_family_order(_family(r)), _family(r), r["size"], _method_order(r["method"]),
                                         r["batch"], r["seq"], r.get("mode", ""))):
        if "error" in r:
            cells = f"fails: {r['error'][:80]} | — | —"
        else:
            cells = (f"{_fmt(r.get('seq_per_s'))} | {_fmt(r.get('step_ms'), '.2f')} "
                     f"| {_fmt((r.get('peak_bytes') or float('nan')) / GIB, '.2f')}")
        lines.append(f"| {_family(r)} | {r['size']} | {r['method']} | {r['batch']} | {r['seq']} | {r.get('mode', '')} "
                     f"| {cells} |")
    return "\n".join(lines)


def skipped_table(records: list[dict]) -> str | None:
    """Markdown: the configurations not run, with the one-line reason (a method the family refuses:
    BitFit on an encoder without biases), their batches on one row; None when there are none."""
    rows: dict[tuple, list] = {}
    for r in records:
        if "skipped" in r:
            who = "jaxpeft" if r.get("framework", "jaxpeft") == "jaxpeft" else f"peft {r.get('mode', '')}".strip()
            rows.setdefault((_family(r), r["size"], r["method"], who, r["skipped"]), []).append(r.get("batch"))
    if not rows:
        return None
    lines = ["| family | size | method | framework | batches | reason |", "|---|---|---|---|---|---|"]
    for (family, size, method, who, why), batches in sorted(
            rows.items(), key=lambda kv: (_family_order(kv[0][0]), kv[0][0], kv[0][1], _method_order(kv[0][2]),
                                          kv[0][3])):
        shown = ", ".join(str(b) for b in sorted({b for b in batches if b is not None}))
        lines.append(f"| {family} | {size} | {method} | {who} | {shown or '—'} | {why.replace('|', '/')} |")
    return "\n".join(lines)


def markdown_report(records: list[dict], header: str) -> str:
    parts = [header, "", "## Speed", "", speed_table(records), "", "## Memory", "", memory_table(records)]
    peer_only = peer_only_table(records)
    if peer_only:
        parts += ["", "## The peer's rows without one of ours", "", peer_only]
    skipped = skipped_table(records)
    if skipped:
        parts += ["", "## Skipped (what a family or method refuses)", "", skipped]
    if any(not _single(r) for r in records):
        parts += ["", "## Several devices", "", scaling_table(records)]
    return "\n".join(parts) + "\n"


def predict_capacity(records: list[dict], size: str, method: str, limit_bytes: float,
                     headroom: float = 0.95, family: str = "bert") -> dict | None:
    """Largest batch whose step fits ``headroom * limit_bytes``, from the XLA step memory of two
    measured batches (memory is affine in the batch: weights + optimizer state + per-example
    activations)."""
    pts = sorted({(r["batch"], r["step_bytes"]) for r in records
                  if r.get("framework", "jaxpeft") == "jaxpeft" and r.get("size") == size and _family(r) == family
                  and r.get("method") == method and r.get("step_bytes") and not r.get("capacity")})
    if len(pts) < 2 or pts[0][0] == pts[-1][0]:
        return None
    (b1, m1), (b2, m2) = pts[0], pts[-1]
    slope = (m2 - m1) / (b2 - b1)
    fixed = m1 - slope * b1
    best = int((headroom * limit_bytes - fixed) / slope) // 8 * 8
    return {"framework": "jaxpeft", "capacity": True, "family": family, "size": size, "method": method,
            "seq": next(r["seq"] for r in records if r.get("size") == size and _family(r) == family),
            "batch": best, "max_batch": best, "fixed_bytes": fixed, "bytes_per_example": slope,
            "limit_bytes": limit_bytes}
