"""Train-step benchmarks: step time, throughput, peak memory, compile time, FLOPs and MFU.

One configuration = (model size, method, batch, sequence length). The step benchmarked is the
library's own (:func:`jaxpeft.training.steps.make_train_step` on the task model's loss, jitted with
donated state) on random-init weights of the model's shape and random token ids with every
position real, so numbers compare with the PyTorch peer in ``jaxpeft.bench.peer`` on the same shapes.
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
from jaxpeft.compute import Compute
from jaxpeft.config import Optim
from jaxpeft.models.bert import FAMILY as BERT
from jaxpeft.models.bert import BertConfig
from jaxpeft.models.heads import Head, head_modules
from jaxpeft.models.loading import build_module, frozen_in_dtype
from jaxpeft.tasks.base import sequence_loss
from jaxpeft.training import optim, steps

SIZES: dict[str, BertConfig] = {
    "base": BertConfig(),  # bert-base-uncased
    "large": BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                        intermediate_size=4096),
    "minilm": BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                         intermediate_size=1536),
    "tiny": BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                       vocab_size=1000, max_position_embeddings=256),
}
#: Options of the benchmarked methods (the peer's settings: 20 virtual tokens).
METHOD_OPTIONS = {"num_virtual_tokens": 20}


def method_options(method: str) -> dict:
    """:data:`METHOD_OPTIONS` that ``method`` takes."""
    fields = {f.name for f in dataclasses.fields(methods.REGISTRY[method])}
    return {k: v for k, v in METHOD_OPTIONS.items() if k in fields}


@dataclasses.dataclass
class BenchConfig:
    size: str = "base"
    method: str = "bitfit"
    batch: int = 64
    seq: int = 128
    compute: Compute = dataclasses.field(default_factory=Compute)   # how to compute (jaxpeft.compute)
    steps: int = 20           # steps per timed repeat
    repeats: int = 5
    warmup: int = 3
    peak_tflops: float = 790.0  # measured bf16 matmul rate of the device (H200: ~790)
    dropout: float | None = None  # override hidden/attention dropout (None: BERT's 0.1)
    mesh: str | None = None     # e.g. "data:2" or "data:1,fsdp:2"; None: one device, plain jit


def analytic_flops(cfg: BertConfig, method: str, batch: int, seq: int, virtual: int = 20) -> float:
    """Matmul FLOPs of one train step (forward + backward), counting 2 per multiply-add.

    The whole model's, as the peer computes it: with ``cls_only_last_layer`` our step skips most of
    the last layer's (its queries, attention, output projection and feed-forward block for all
    rows but [CLS]), so the MFU on this count is above the matrix units' actual utilisation there.

    Per layer and token, the projections and MLP cost ``2 (4 H^2 + 2 H I)`` forward; attention
    scores and mixing ``4 T S H`` per sequence. Full fine-tuning costs 3x the forward (dX and dW);
    methods that train no matrix (BitFit, prompts, prefixes) need dX only: 2x for the projections,
    3x for attention (its backward has no weights); Frozen (head only) is forward only.
    """
    h, i, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    m = methods.create(method, method_options(method))
    t = seq + (0 if m.extra_keys() else m.extra_positions())   # query length (virtual tokens)
    s = t + m.extra_keys()                                      # key length (prefixes)
    proj = 2.0 * batch * t * (4 * h * h + 2 * h * i) * n
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


def build_step(bc: BenchConfig):
    """Module, compiled step, state, frozen params and batch for one configuration.

    With ``bc.mesh`` the step is the Trainer's sharded one (``jaxpeft.training.sharding``): ``batch`` is the
    global batch, split over the mesh's data-parallel devices.
    """
    from jaxpeft.training import sharding

    runtime.set_prng_impl(bc.compute.prng_impl)
    cfg = SIZES[bc.size]
    if bc.dropout is not None:
        cfg = cfg.replace(hidden_dropout_prob=bc.dropout, attention_probs_dropout_prob=bc.dropout)
    method = methods.create(bc.method, method_options(bc.method))
    head = Head("sequence", 2)
    module = build_module(BERT, cfg, head, method, bc.compute)
    dummy = _random_batch(cfg, 1, 8)
    plan = sharding.create_plan(bc.mesh or "data:1", devices=None if bc.mesh else jax.devices()[:1])
    plan.check_batch_size(bc.batch)

    def init(r):
        return module.init(r, dummy["input_ids"], dummy["attention_mask"], dummy["token_type_ids"])["params"]

    params, _ = plan.init(init, jax.random.key(0), shardings=plan.tree_shardings)
    mask = method.mask(params, BERT, head_modules(BERT, head))
    counts = masks.count(params, mask)
    tx = optim.make_optimizer(Optim(learning_rate=1e-4))
    trainable, frozen = masks.split(params, mask)
    frozen = frozen_in_dtype(frozen, bc.compute.dtype, BERT.prefix)   # as a run keeps them
    state, state_sh = plan.init(lambda t: steps.init_state(t, tx, 0), trainable, shardings=plan.state_shardings)
    frozen_sh = plan.tree_shardings(frozen)
    del params, trainable
    batch = plan.global_batch({k: np.asarray(v) for k, v in _random_batch(cfg, bc.batch, bc.seq).items()})
    loss = steps.model_loss(module, lambda logits, b: sequence_loss(logits, b["labels"], b["weights"], False))
    step = plan.jit_train_step(steps.make_train_step(loss, tx), state_sh, frozen_sh,
                               compiler_options=bc.compute.compiler_options())
    t0 = time.perf_counter()
    compiled = step.lower(state, frozen, batch, np.float32(1e-4)).compile()
    compile_s = time.perf_counter() - t0
    return cfg, compiled, state, frozen, batch, compile_s, counts, plan.mesh.size


def run(bc: BenchConfig) -> dict[str, Any]:
    """Benchmarks one configuration; returns one JSON-able record."""
    cfg, compiled, state, frozen, batch, compile_s, (trainable, total), ndev = build_step(bc)
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
    flops = analytic_flops(cfg, bc.method, bc.batch, bc.seq, METHOD_OPTIONS["num_virtual_tokens"])
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


def _key(r: dict) -> tuple:
    return (r["size"], r["method"], r["batch"], r["seq"])


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
    """Markdown: ours vs the peer (eager, torch.compile) per size/method/batch, with ratios."""
    ours = {_key(r) + (variant(r),): r for r in records if r.get("framework", "jaxpeft") == "jaxpeft"
            and "seq_per_s" in r and not r.get("capacity") and _single(r)}
    peer = {(_key(r), r["mode"]): r for r in records if r.get("framework", "").startswith("torch")}
    lines = ["| size | method | batch | variant | jaxpeft seq/s | MFU | step GiB | compile s | peft eager seq/s "
             "| peft compile seq/s | ours / compile | ours / eager |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for kv in sorted(ours, key=lambda k: (k[0], METHOD_ORDER.index(k[1]) if k[1] in METHOD_ORDER else 99,
                                          k[2], k[3], k[4])):
        r, k = ours[kv], kv[:4]
        pe, pc = peer.get((k, "eager"), {}), peer.get((k, "compile"), {})

        def peer_cell(p):
            if "error" in p:
                return "fails"
            return _fmt(p.get("seq_per_s"))

        def ratio(p):
            return f"{r['seq_per_s'] / p['seq_per_s']:.2f}x" if p.get("seq_per_s") else "—"

        mem = r.get("step_bytes") or r.get("peak_bytes") or float("nan")
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {kv[4]} | {_fmt(r['seq_per_s'])} | {100 * r['mfu']:.1f}% "
                     f"| {_fmt(mem / GIB, '.2f')} | {r['compile_s']:.1f} "
                     f"| {peer_cell(pe)} | {peer_cell(pc)} | {ratio(pc)} | {ratio(pe)} |")
    return "\n".join(lines)


def memory_table(records: list[dict]) -> str:
    """Markdown: peak memory per method vs full fine-tuning, and the largest batch that ran."""
    ours = [dict(r, peak_bytes=r.get("step_bytes") or r.get("peak_bytes")) for r in records
            if r.get("framework", "jaxpeft") == "jaxpeft" and (r.get("step_bytes") or r.get("peak_bytes"))
            and not r.get("capacity") and _single(r)]
    cap = {(r["size"], r["method"], r["seq"]): r for r in records if r.get("capacity")}
    peer = {(_key(r)): r for r in records if r.get("framework", "").startswith("torch")
            and r.get("mode") == "eager" and r.get("peak_bytes")}
    full = {(r["size"], r["batch"], r["seq"], variant(r)): r["peak_bytes"] for r in ours
            if r["method"] == "full"}
    lines = ["| size | method | batch | variant | step GiB (XLA) | vs full (same variant) | peft eager peak GiB "
             "| largest batch |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(ours, key=lambda r: (r["size"], r["batch"], METHOD_ORDER.index(r["method"])
                                         if r["method"] in METHOD_ORDER else 99, variant(r))):
        f = full.get((r["size"], r["batch"], r["seq"], variant(r)))
        c = cap.get((r["size"], r["method"], r["seq"]))
        p = peer.get(_key(r))
        lines.append(f"| {r['size']} | {r['method']} | {r['batch']} | {variant(r)} | {r['peak_bytes'] / GIB:.2f} "
                     f"| {_fmt(r['peak_bytes'] / f if f else None, '.2f')}{'x' if f else ''} "
                     f"| {_fmt(p['peak_bytes'] / GIB if p else None, '.2f')} "
                     f"| {_fmt(c.get('max_batch') if c else None)} |")
    return "\n".join(lines)


METHOD_ORDER = ["full", "frozen", "bitfit", "prompt", "ptuning", "prefix", "ptuning_v2", "lora", "adapter"]


def scaling_table(records: list[dict]) -> str:
    """Markdown: runs on a mesh of several devices against one device at the same per-device batch."""
    one = {(r["size"], r["method"], r["batch"], r["seq"]): r for r in records
           if r.get("framework", "jaxpeft") == "jaxpeft" and "seq_per_s" in r and _single(r)}
    lines = ["| size | method | mesh | global batch | seq/s | seq/s per device | 1-device seq/s (same "
             "per-device batch) | scaling efficiency | step GiB per device |", "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if _single(r) or "seq_per_s" not in r:
            continue
        n = r.get("devices", 1)
        ref = one.get((r["size"], r["method"], r["batch"] // n, r["seq"]))
        eff = f"{r['seq_per_s'] / (n * ref['seq_per_s']):.0%}" if ref else "—"
        lines.append(f"| {r['size']} | {r['method']} | {r['mesh']} | {r['batch']} | {r['seq_per_s']:,.0f} "
                     f"| {r['seq_per_s'] / n:,.0f} | {_fmt(ref['seq_per_s'] if ref else None)} | {eff} "
                     f"| {_fmt((r.get('step_bytes') or float('nan')) / GIB, '.2f')} |")
    return "\n".join(lines)


def peer_only_table(records: list[dict]) -> str | None:
    """Markdown: the peer's rows that have no row of ours with the same size/method/batch/seq (a
    ``--no_ours`` run), which the speed and memory tables leave out; None when there are none."""
    # the rows speed_table pairs the peer with
    ours = {_key(r) for r in records if r.get("framework", "jaxpeft") == "jaxpeft" and "seq_per_s" in r
            and not r.get("capacity") and _single(r)}
    rows = [r for r in records if r.get("framework", "").startswith("torch") and _key(r) not in ours]
    if not rows:
        return None
    lines = ["| size | method | batch | seq | mode | peft seq/s | step ms | peak GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["size"], METHOD_ORDER.index(r["method"]) if r["method"] in METHOD_ORDER
                                         else 99, r["batch"], r["seq"], r.get("mode", ""))):
        if "error" in r:
            cells = f"fails: {r['error'][:80]} | — | —"
        else:
            cells = (f"{_fmt(r.get('seq_per_s'))} | {_fmt(r.get('step_ms'), '.2f')} "
                     f"| {_fmt((r.get('peak_bytes') or float('nan')) / GIB, '.2f')}")
        lines.append(f"| {r['size']} | {r['method']} | {r['batch']} | {r['seq']} | {r.get('mode', '')} | {cells} |")
    return "\n".join(lines)


def markdown_report(records: list[dict], header: str) -> str:
    parts = [header, "", "## Speed", "", speed_table(records), "", "## Memory", "", memory_table(records)]
    peer_only = peer_only_table(records)
    if peer_only:
        parts += ["", "## The peer's rows without one of ours", "", peer_only]
    if any(not _single(r) for r in records):
        parts += ["", "## Several devices", "", scaling_table(records)]
    return "\n".join(parts) + "\n"


def predict_capacity(records: list[dict], size: str, method: str, limit_bytes: float,
                     headroom: float = 0.95) -> dict | None:
    """Largest batch whose step fits ``headroom * limit_bytes``, from the XLA step memory of two
    measured batches (memory is affine in the batch: weights + optimizer state + per-example
    activations)."""
    pts = sorted({(r["batch"], r["step_bytes"]) for r in records
                  if r.get("framework", "jaxpeft") == "jaxpeft" and r.get("size") == size
                  and r.get("method") == method and r.get("step_bytes") and not r.get("capacity")})
    if len(pts) < 2 or pts[0][0] == pts[-1][0]:
        return None
    (b1, m1), (b2, m2) = pts[0], pts[-1]
    slope = (m2 - m1) / (b2 - b1)
    fixed = m1 - slope * b1
    best = int((headroom * limit_bytes - fixed) / slope) // 8 * 8
    return {"framework": "jaxpeft", "capacity": True, "size": size, "method": method,
            "seq": next(r["seq"] for r in records if r.get("size") == size),
            "batch": best, "max_batch": best, "fixed_bytes": fixed, "bytes_per_example": slope,
            "limit_bytes": limit_bytes}
