"""The memory table: device memory against model size, per method, base dtype and remat.

For every size x method x base dtype (``bfloat16`` / ``int8`` / ``nf4``) x remat (``none`` /
``layer``, ...) one record (``jaxpeft-bench --memory_table``):

* what the model holds before any activation (:func:`jaxpeft.models.sizes.footprint`: the frozen
  base as stored, the trainable part and Adam's moments), from the shapes;
* XLA's memory analysis of the compiled train step for a fixed batch (default 8) at sequence 128:
  arguments + outputs - aliased + temporaries, per device (``step_bytes``), compiled from shape
  structs, so a configuration that cannot fit is still measured;
* the largest batch that fits the device (``max_batch``): from the compiled step's memory at two
  batches (memory is affine in the batch), checked by compiling the predicted batch and bisecting
  down where it does not fit (``--max_batch=affine``), or by a binary search of compilations
  (``search``); nothing is allocated for it;
* where the fixed batch fits: the step run for real, its sequences per second and the device's
  ``peak_bytes_in_use`` (the whole process: one configuration per process, so peaks do not mix);
  running out of memory anyway is recorded (``oom``), not raised.

Each configuration runs in a child process (``python -m jaxpeft.bench.memory CONFIG_JSON``: one JSON
line). The PyTorch peer (:mod:`jaxpeft.bench.peer`) fills the same table: bf16 weights with
autocast, and bitsandbytes int8 / nf4 bases. :func:`report` writes ``bench.md``'s table,
``memory.png`` (memory against params, log-log, one panel per base dtype) and ``memory_table.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

METHODS = ("full", "frozen", "bitfit", "lora", "ia3", "prompt", "prefix", "bottleneck")
BASE_DTYPES = ("bfloat16", "int8", "nf4")
REMATS = ("none", "layer")
TABLE_SIZES = ("base", "large", "1.3b", "3.5b", "10.7b")
MAX_BATCH_MODES = ("affine", "search", "none")
#: The largest batch a search tries.
BATCH_CAP = 1 << 16
GIB = 2 ** 30


@dataclasses.dataclass
class MemoryConfig:
    """One configuration of the table (JSON-able: it goes to the child process)."""

    size: str
    method: str
    base_dtype: str
    remat: str = "none"
    batch: int = 8
    seq: int = 128
    compute: dict = dataclasses.field(default_factory=dict)   # the resolved compute spec's fields
    batch_search: str = "affine"   # how the largest batch is found: affine, search or none
    limit_bytes: int | None = None   # the device's memory (None: what the device reports)
    steps: int = 5
    repeats: int = 3
    mesh: str | None = None

    def key(self) -> tuple:
        return (self.size, self.method, self.base_dtype, self.remat, self.batch, self.seq)


def key_of(rec: dict) -> tuple:
    return (rec["size"], rec["method"], rec["base_dtype"], rec["remat"], rec["batch"], rec["seq"])


def _spec(mc: MemoryConfig) -> Any:
    """The compute spec of a configuration: the run's, with its base dtype and remat; Pallas
    attention where the size's head width allows it, else cuDNN's (or XLA's dense) attention."""
    from jaxpeft.compute import Compute
    from jaxpeft.models import sizes
    from jaxpeft.models.kernels import pallas_attention

    spec = Compute(**mc.compute).replace(base_dtype=mc.base_dtype, remat=mc.remat)
    head_dim = sizes.config(mc.size).head_dim
    if spec.attention_impl == "pallas" and pallas_attention.supported(1, 0, head_dim):
        spec = spec.replace(attention_impl="cudnn" if spec.dtype == "bfloat16" else "dense")
    return spec


def largest_batch(memory_at, limit: int, batch: int, mode: str, multiple: int = 8) -> dict[str, Any]:
    """The largest batch whose step fits ``limit`` (with :data:`jaxpeft.compute.MEMORY_HEADROOM`).

    ``memory_at(b)``: the step's bytes at batch ``b`` (a compilation). ``affine``: the line through
    ``batch`` and ``2 * batch``, then the prediction checked and, where it does not fit, bisected;
    ``search``: doubling from ``batch``, then bisection. Batches are multiples of ``multiple``.

    >>> largest_batch(lambda b: 100 + 10 * b, 1000, 8, "affine", 1)["max_batch"]
    85
    >>> largest_batch(lambda b: 100 + 10 * b + (b > 50) * 500, 1000, 8, "affine", 1)["max_batch"]   # a jump past 50
    50
    >>> largest_batch(lambda b: 100 + 10 * b, 1000, 8, "search", 1)["max_batch"]
    85
    """
    from jaxpeft.compute import fits

    seen: dict[int, int] = {}

    def ok(b: int) -> bool:
        if b not in seen:
            seen[b] = int(memory_at(b))
        return fits(seen[b], limit)

    def bisect(good: int, bad: int) -> int:   # good fits (or 0), bad does not
        while bad - good > multiple:
            mid = (good + bad) // 2 // multiple * multiple
            if mid <= good:
                break
            good, bad = (mid, bad) if ok(mid) else (good, mid)
        return good

    out: dict[str, Any] = {"max_batch_mode": mode}
    if mode == "affine":
        b1, b2 = batch, 2 * batch
        # the two compilations at once: XLA compiles outside the GIL, and at 10B a compilation is
        # about a minute
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(2) as pool:
            seen.update(zip((b1, b2), (int(m) for m in pool.map(memory_at, (b1, b2)))))
        slope = (seen[b2] - seen[b1]) / (b2 - b1)
        fixed = seen[b1] - slope * b1
        mode = "affine" if slope > 0 else "search"   # no growth seen: search instead
    if mode == "affine":
        from jaxpeft.compute import MEMORY_HEADROOM

        pred = max(0, min(int((MEMORY_HEADROOM * limit - fixed) / slope) // multiple * multiple, BATCH_CAP))
        out.update(bytes_fixed=int(fixed), bytes_per_example=slope, predicted_batch=pred)
        best = pred if pred == 0 or ok(pred) else bisect(max([b for b in seen if b < pred and ok(b)], default=0), pred)
    else:
        good, bad = 0, batch
        while ok(bad) and bad < BATCH_CAP:
            good, bad = bad, bad * 2
        best = BATCH_CAP if ok(bad) else bisect(good, bad)
    out.update(max_batch=best, max_batch_bytes=seen.get(best), compilations=len(seen))
    return out


def measure(mc: MemoryConfig) -> dict[str, Any]:
    """One record of the table, in this process (see the module docstring)."""
    import jax

    from jaxpeft import compute, methods
    from jaxpeft.bench import step
    from jaxpeft.models import sizes

    spec = _spec(mc)
    rec: dict[str, Any] = {"framework": "jaxpeft", **dataclasses.asdict(mc), "compute": spec.to_dict(),
                           "device": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform,
                           "jax": jax.__version__}
    method = methods.create(mc.method, step.method_options(mc.method))
    if spec.quantized and method.trains_matrices:
        return {**rec, "skipped": f"--method={mc.method} trains the matrices a {mc.base_dtype} base cannot hold"}
    limit = mc.limit_bytes or compute.device_memory()
    rec["limit_bytes"] = limit

    def bench_config(sp):
        return step.BenchConfig(size=mc.size, method=mc.method, batch=mc.batch, seq=mc.seq, compute=sp,
                                steps=mc.steps, repeats=mc.repeats, warmup=2, mesh=mc.mesh)

    su = step.setup_step(bench_config(spec))
    fp = sizes.footprint(su.traced.shapes, su.mask, su.storage, su.plan.tree_shardings if mc.mesh else None)
    rec.update(params=fp.params, trainable_params=fp.trainable_params, frozen_bytes=fp.frozen,
               trainable_bytes=fp.trainable, optimizer_bytes=fp.optimizer)
    m = su.memory(mc.batch, mc.seq)
    if mc.remat == "auto":
        rec["remat_chosen"] = compute.choose_remat(m and m["total"], limit)
        if rec["remat_chosen"] != "none":
            spec = spec.replace(remat=rec["remat_chosen"])
            su = step.setup_step(bench_config(spec))
            m = su.memory(mc.batch, mc.seq)
    rec["xla"] = m
    rec["step_bytes"] = m and m["total"]
    if limit and m and mc.batch_search != "none":
        rec.update(largest_batch(lambda b: su.memory(b, mc.seq)["total"], limit, mc.batch, mc.batch_search,
                                 multiple=max(8, su.plan.data_parallel_size)))
    rec["fits"] = compute.fits(rec["step_bytes"], limit)
    if not rec["fits"]:
        return rec
    try:
        r = step.run(bench_config(spec), setup=su)
    except Exception as e:  # noqa: BLE001 -- recorded: out of memory despite the estimate, or another failure
        if compute.is_out_of_memory(e):
            return {**rec, "oom": str(e).strip().splitlines()[0][:300],
                    "peak_bytes": (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")}
        return {**rec, "error": f"{type(e).__name__}: {str(e).strip()[:300]}"}
    keep = ("step_ms", "seq_per_s", "tokens_per_s", "compile_s", "peak_bytes", "loss", "mfu", "analytic_flops")
    return {**rec, **{k: r.get(k) for k in keep}}


# ----------------------------------------------------------------------------- child processes


def run_child(mc: MemoryConfig, timeout: int) -> dict[str, Any]:
    """:func:`measure` in a child process (one configuration per process: clean peaks, and an
    out-of-memory state never leaks into the next configuration)."""
    base = {"framework": "jaxpeft", **dataclasses.asdict(mc)}
    # the whole card is the limit (JAX's allocator takes 75% of it unless told otherwise)
    env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95", **os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    cmd = [sys.executable, "-m", "jaxpeft.bench.memory", json.dumps(dataclasses.asdict(mc))]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**base, "error": f"timeout after {timeout}s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {**base, "error": " | ".join((p.stderr or "").strip().splitlines()[-2:])[-300:]}


def run_peer(mc: MemoryConfig, timeout: int, mode: str = "eager") -> dict[str, Any]:
    """The PyTorch peer's record of the same configuration (its own process)."""
    base = {"framework": "torch", "mode": mode, "size": mc.size, "method": mc.method, "base_dtype": mc.base_dtype,
            "remat": mc.remat, "batch": mc.batch, "seq": mc.seq}
    cmd = [sys.executable, "-m", "jaxpeft.bench.peer", f"--size={mc.size}", f"--method={mc.method}",
           f"--batch={mc.batch}", f"--seq={mc.seq}", f"--mode={mode}", f"--steps={mc.steps}",
           f"--repeats={mc.repeats}", f"--base_dtype={mc.base_dtype}", f"--remat={mc.remat}"]
    if mc.batch_search != "none":
        cmd.append("--max_batch")
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ))
    except subprocess.TimeoutExpired:
        return {**base, "error": f"timeout after {timeout}s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("{"):
            return {**base, **json.loads(line)}
    return {**base, "error": " | ".join((p.stderr or "").strip().splitlines()[-2:])[-300:]}


# ----------------------------------------------------------------------------- the report


def _gib(x: Any) -> str:
    return "—" if x is None else f"{x / GIB:.2f}"


def _shown_bytes(r: dict) -> float | None:
    """The memory a record stands for: the measured peak where the step ran, else XLA's plan."""
    return r.get("peak_bytes") or r.get("step_bytes")


def table(records: list[dict]) -> str:
    """Markdown: one row per size x method x base dtype x remat, ours and the peer's side by side."""
    from jaxpeft.models import sizes

    peer = {key_of(r): r for r in records if str(r.get("framework", "")).startswith("torch")}
    ours = [r for r in records if r.get("framework") == "jaxpeft"]
    order = {s: i for i, s in enumerate(sizes.ORDER)}
    ours.sort(key=lambda r: (order.get(r["size"], 99), METHODS.index(r["method"]) if r["method"] in METHODS else 99,
                             BASE_DTYPES.index(r["base_dtype"]) if r["base_dtype"] in BASE_DTYPES else 9, r["remat"]))
    lines = ["| size | params | method | base | remat | frozen GiB | trainable + Adam GiB | step GiB (XLA) "
             "| peak GiB | largest batch | seq/s | peft peak GiB | peft largest batch | peft seq/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in ours:
        p = peer.get(key_of(r), {})
        remat = r["remat"] + (f" ({r['remat_chosen']})" if r.get("remat_chosen") else "")
        if r.get("skipped"):
            cells = [remat, "—", "—", "—", "—", "not possible", "—"]
        else:
            state = (r.get("trainable_bytes") or 0) + (r.get("optimizer_bytes") or 0) if "frozen_bytes" in r else None
            run = ("does not fit" if r.get("fits") is False else "OOM" if r.get("oom") else
                   "error" if r.get("error") else f"{r['seq_per_s']:,.0f}" if r.get("seq_per_s") else "—")
            cells = [remat, _gib(r.get("frozen_bytes")), _gib(state), _gib(r.get("step_bytes")),
                     _gib(r.get("peak_bytes")), str(r.get("max_batch", "—")), run]
        pcells = (["fails: " + p["error"][:60], "—", "—"] if p.get("error") else
                  [_gib(p.get("peak_bytes")), str(p.get("max_batch", "—")),
                   f"{p['seq_per_s']:,.0f}" if p.get("seq_per_s") else "—"])
        params = f"{r['params'] / 1e9:.2f}B" if r.get("params") else "—"
        lines.append(f"| {r['size']} | {params} | {r['method']} | {r['base_dtype']} | " + " | ".join(cells)
                     + " | " + " | ".join(pcells) + " |")
    return "\n".join(lines)


CONSUMER_CARD = 24 * 10**9   # bytes of a consumer card (RTX 3090 / 4090), drawn for reference


def plot(records: list[dict], path: Path, title: str = "") -> Path | None:
    """``memory.png``: memory (the measured peak, else XLA's plan) against params, log-log, one
    panel per base dtype, one line per method (solid: remat none, dashed: layer), the peer as
    crosses, the device's memory as a grey line and a 24 GB consumer card's as a dotted one."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from jaxpeft.models import sizes

    ours = [r for r in records if r.get("framework") == "jaxpeft" and r.get("size") in sizes.SHAPES and _shown_bytes(r)]
    if not ours:
        return None
    x = {s: sizes.base_params(s) for s in {r["size"] for r in records if r.get("size") in sizes.SHAPES}}
    dtypes = [d for d in BASE_DTYPES if any(r["base_dtype"] == d for r in ours)]
    fig, axes = plt.subplots(1, len(dtypes), figsize=(5.5 * len(dtypes), 4.5), squeeze=False, sharey=True)
    colors = dict(zip(METHODS, plt.get_cmap("tab10").colors))
    limit = max((r["limit_bytes"] for r in ours if r.get("limit_bytes")), default=None)
    for ax, dtype in zip(axes[0], dtypes):
        labelled = set()
        for method in METHODS:
            for remat, style in (("none", "-"), ("layer", "--"), ("dots", ":"), ("auto", "-.")):
                rs = sorted((r for r in ours if r["method"] == method and r["base_dtype"] == dtype
                             and r["remat"] == remat), key=lambda r: x[r["size"]])
                if not rs:
                    continue
                ax.plot([x[r["size"]] for r in rs], [_shown_bytes(r) / GIB for r in rs], style, color=colors[method],
                        label=None if method in labelled else method)
                labelled.add(method)
                ran = [r for r in rs if r.get("peak_bytes")]
                ax.plot([x[r["size"]] for r in rs], [_shown_bytes(r) / GIB for r in rs], "o", ms=4, mfc="none",
                        color=colors[method])
                ax.plot([x[r["size"]] for r in ran], [r["peak_bytes"] / GIB for r in ran], "o", ms=4,
                        color=colors[method])
            peer = sorted((x[r["size"]], r["peak_bytes"] / GIB) for r in records
                          if str(r.get("framework", "")).startswith("torch") and r.get("peak_bytes")
                          and r["method"] == method and r.get("base_dtype") == dtype and r["size"] in x)
            if peer:
                ax.plot(*zip(*peer), "x", ms=7, color=colors[method])
        if limit:
            ax.axhline(limit / GIB, color="grey", lw=1)
        ax.axhline(CONSUMER_CARD / GIB, color="grey", lw=1, ls=":")   # the document's point: a 24 GB card
        ax.set(xscale="log", yscale="log", xlabel="encoder parameters", title=f"frozen base: {dtype}")
        ax.set_xticks(sorted(x.values()), [f"{s}" for s in sorted(x, key=x.get)], fontsize=8)
        ax.minorticks_off()
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("GiB per device (filled: peak; hollow: XLA's plan)")
    for ax in axes[0]:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title or "Train-step memory (solid: no remat, dashed: remat per layer; x: PyTorch + peft)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def report(records: list[dict], out: Path, header: str) -> str:
    """Writes ``bench.md`` (the table), ``memory.png`` and ``memory_table.json`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    text = (f"{header}\n\n## Memory by size, method, base dtype and remat\n\nstep GiB: XLA's memory analysis "
            "of the compiled train step (arguments + outputs - aliased + temporaries, per device); peak GiB: "
            "the device's peak_bytes_in_use where the step ran; largest batch: the largest batch whose step "
            "XLA plans within the device's memory (95%).\n\n" + table(records) + "\n")
    if plot(records, out / "memory.png"):
        text += "\n![memory against model size](memory.png)\n"
    (out / "bench.md").write_text(text)
    (out / "memory_table.json").write_text(json.dumps(records, indent=1, default=str) + "\n")
    return text


def main(argv: list[str]) -> int:
    """The child: ``python -m jaxpeft.bench.memory CONFIG_JSON`` prints one JSON record."""
    mc = MemoryConfig(**json.loads(argv[0]))
    try:
        rec = measure(mc)
    except Exception as e:  # noqa: BLE001 -- reported as data
        rec = {"framework": "jaxpeft", **dataclasses.asdict(mc),
               "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"}
    print(json.dumps(rec, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
