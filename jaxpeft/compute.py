"""How the model computes: one frozen spec, three presets, resolved for the platform it runs on.

:class:`Compute` holds every choice that is not the architecture (``BertConfig``) or the method:
the compute dtype, the attention implementation, how a sublayer's output (bias, dropout, residual,
LayerNorm) is computed, where dropout masks come from, the dropout RNG, rematerialisation, whether
XLA tries Triton GEMM fusions on a GPU, and the [CLS]-only last layer. The presets:

* ``exact``: the reference math as transformers computes it: float32, dense attention with dropout
  on the attention probabilities, XLA's ops;
* ``fast``: bfloat16 and our GPU kernels (Pallas attention and sublayer outputs), cuBLAS for the
  matmuls (no Triton GEMM autotuning: half the compilation);
* ``auto`` (the default everywhere): the fastest path supported where it runs (:func:`auto_for`):
  ``fast`` on one NVIDIA GPU; bfloat16 with cuDNN attention on a mesh of NVIDIA GPUs; bfloat16
  with XLA's ops on a TPU or another GPU; ``exact`` on a CPU.

Training, prediction, the benchmark and the study all build the spec with :func:`resolve` from the
same flags: ``--compute=auto|exact|fast`` plus one flag per field (``--dtype=bfloat16``).

Adding an option is one field here (with its ``choices`` and whether it changes the training
trajectory) plus its implementation in the model; the flags, the checks and the resume check come
from the field.

>>> resolve("exact").dtype, resolve("auto", platform="cpu") == resolve("exact")
('float32', True)
>>> resolve("fast", {"attention_impl": "cudnn"}, platform="gpu").attention_impl
'cudnn'
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from jaxpeft import options
from jaxpeft.errors import UserError

PRESETS = ("auto", "exact", "fast")


def _field(default: Any, help: str, choices: tuple, trajectory: bool = True) -> Any:
    return options.option(default, help, choices=choices, trajectory=trajectory)


@dataclasses.dataclass(frozen=True)
class Compute:
    """How to compute (the ``exact`` preset's values are the defaults).

    ``trajectory`` in a field's metadata says whether the field changes the training trajectory
    (beyond float rounding): a checkpoint resumes only under the same values of those fields.
    """

    dtype: str = _field("float32", "compute dtype of matmuls and activations (params stay float32)",
                        ("float32", "bfloat16"))
    attention_impl: str = _field(
        "dense", "dense: einsum + softmax with dropout on the probabilities (as transformers); "
        "cudnn: cuDNN's fused kernel (NVIDIA GPU, bfloat16); pallas: our kernel up to 128 tokens "
        "and a short tail, cuDNN's beyond (one NVIDIA GPU). The fused kernels apply no "
        "attention-probability dropout",
        ("dense", "cudnn", "pallas"))
    norm_impl: str = _field(
        "xla", "each sublayer's bias, dropout, residual and LayerNorm: xla (separate ops, fused by "
        "XLA) or pallas (one kernel each way, NVIDIA GPU)", ("xla", "pallas"), trajectory=False)
    dropout_impl: str = _field(
        "hash", "hidden-dropout masks: hash (a keyed hash of each element's position, fused into "
        "the kernels) or random (jax.random bits, as flax's nn.Dropout)", ("hash", "random"))
    prng_impl: str = _field(
        "threefry2x32", "JAX's PRNG behind dropout: threefry2x32 (JAX's default) or rbg (cheaper "
        "on accelerators)", ("threefry2x32", "rbg"))
    remat: str = _field(
        "none", "what the backward pass recomputes: none (keep every activation); layer (keep each encoder "
        "layer's input only, recompute the layer: least memory, one more forward); dots (keep the matmul "
        "outputs, recompute the rest: attention, activations, norms); auto (none where the compiled step "
        "fits the device's memory, else layer)", ("none", "layer", "dots", "auto"), trajectory=False)
    triton_gemm: bool = _field(
        True, "let XLA also try Triton GEMM fusions for the matmuls (NVIDIA GPU; XLA's default): "
        "each is autotuned when the program compiles. Off: cuBLAS for every matmul, which compiles "
        "in about half the time at the same step speed (docs/benchmarks.md)", (True, False),
        trajectory=False)
    gemm_autotune: bool = _field(
        True, "time cuBLAS's algorithms for every matmul while the program compiles (NVIDIA GPU; "
        "XLA's default). Off: cuBLAS's heuristic choice (XLA's autotune level 0), which compiles "
        "the main command about 2 s faster; its steps are 4-9%% slower at batch 32 and as fast at "
        "BERT-base batch 256 (docs/benchmarks.md)", (True, False), trajectory=False)
    cls_only_last_layer: bool = _field(
        True, "compute the last layer for the rows the head reads ([CLS]) only: the same logits "
        "and gradients with less work", (True, False))
    base_dtype: str = _field(
        "auto", "how the frozen base's matmul kernels are stored: auto (in the compute dtype), float32, "
        "bfloat16, int8 (per output channel) or nf4 (QLoRA's 4-bit NormalFloat, blocks of 64); dequantized "
        "inside each matmul. The trainable part and its optimizer state stay float32",
        ("auto", "float32", "bfloat16", "int8", "nf4"))

    def __post_init__(self):
        options.check(self)
        if self.norm_impl == "pallas" and self.dropout_impl != "hash":
            raise UserError("--norm_impl=pallas recomputes hashed dropout masks in its kernels: it "
                            f"needs --dropout_impl=hash, got --dropout_impl={self.dropout_impl}")
        if self.attention_impl == "cudnn" and self.dtype != "bfloat16":
            raise UserError("--attention_impl=cudnn needs --dtype=bfloat16 (cuDNN's fused attention "
                            f"takes half precision), got --dtype={self.dtype}")

    def replace(self, **kw: Any) -> "Compute":
        return dataclasses.replace(self, **kw)

    @property
    def frozen_dtype(self) -> str:
        """What the frozen kernels are stored as: ``base_dtype``, or the compute dtype for auto."""
        return self.dtype if self.base_dtype == "auto" else self.base_dtype

    @property
    def quantized(self) -> bool:
        return self.frozen_dtype in ("int8", "nf4")

    def remat_layer(self, layer_cls: Any, static_argnums: tuple[int, ...]) -> Any:
        """The encoder layer class as ``remat`` says: ``nn.remat`` of it (``layer``), ``nn.remat``
        keeping the matmul outputs (``dots``: ``jax.checkpoint_policies.dots_with_no_batch_dims_saveable``,
        so the projections are kept and attention, activations and norms recomputed), or itself
        (``none``; ``auto`` until a run resolves it, see :func:`choose_remat`)."""
        if self.remat not in ("layer", "dots"):
            return layer_cls
        import flax.linen as nn
        import jax

        policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if self.remat == "dots" else None
        return nn.remat(layer_cls, static_argnums=static_argnums, policy=policy)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def trajectory(self) -> dict[str, Any]:
        """The fields a resumed run must share with the checkpoint it resumes."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.metadata["trajectory"]}

    def compiler_options(self) -> dict[str, Any]:
        """XLA options of every program compiled with this spec (``jax.jit(compiler_options=)``;
        the GPU options are ignored elsewhere)."""
        out: dict[str, Any] = {}
        if not self.triton_gemm:
            out["xla_gpu_enable_triton_gemm"] = False
        if not self.gemm_autotune:
            out["xla_gpu_autotune_level"] = 0
        return out

    def uses_pallas(self) -> list[str]:
        return [f"{k}=pallas" for k in ("attention_impl", "norm_impl") if getattr(self, k) == "pallas"]

    def check_platform(self, platform: str, num_devices: int = 1, nvidia: bool | None = None) -> None:
        """Refuses what cannot run compiled on ``platform`` (our Pallas kernels off an NVIDIA GPU
        would only run in Pallas's interpreter; cuDNN needs an NVIDIA GPU)."""
        nvidia = platform == "gpu" if nvidia is None else nvidia
        for what in self.uses_pallas():
            if not nvidia:
                raise UserError(f"--{what} is a Triton kernel for NVIDIA GPUs; this run is on "
                                f"{platform} (use --compute=auto, or --{what.split('=')[0]}=xla"
                                f"{'/dense' if what.startswith('attention') else ''})")
        if self.attention_impl == "cudnn" and not nvidia:
            raise UserError(f"--attention_impl=cudnn needs an NVIDIA GPU; this run is on {platform}")


#: The reference math (transformers' BERT): every field at its default.
EXACT = Compute()
#: One NVIDIA GPU: bfloat16 and our kernels.
FAST = Compute(dtype="bfloat16", attention_impl="pallas", norm_impl="pallas", dropout_impl="hash",
               prng_impl="rbg", triton_gemm=False, gemm_autotune=False)


def fields() -> dict[str, dataclasses.Field]:
    """The spec's fields by name (each one a command-line flag)."""
    return {f.name: f for f in dataclasses.fields(Compute)}


def check_overrides(overrides: Mapping[str, Any]) -> None:
    """Each override is a field and one of its choices (how they combine with a preset is checked
    when the spec is resolved on its platform)."""
    fs = fields()
    for k, v in overrides.items():
        if k not in fs:
            raise UserError(f"unknown compute option {k!r}; known: {', '.join(fs)}")
        choices = fs[k].metadata["choices"]
        if v is not None and v not in choices:
            raise UserError(f"--{k}={options.show(v)}: choose one of {', '.join(options.show(c) for c in choices)}")


def platform_info() -> tuple[str, int, bool]:
    """``(platform, device count, whether the devices are NVIDIA GPUs)`` of this JAX runtime."""
    import jax

    devices = jax.devices()
    platform = devices[0].platform
    nvidia = platform == "gpu" and "rocm" not in str(getattr(devices[0].client, "platform_version", "")).lower()
    return platform, len(devices), nvidia


def auto_for(platform: str, num_devices: int = 1, nvidia: bool | None = None) -> Compute:
    """What ``auto`` means on ``platform`` with ``num_devices`` devices in the mesh.

    One NVIDIA GPU: :data:`FAST`. Several NVIDIA GPUs: bfloat16 with cuDNN's attention and XLA's
    sublayer ops (our kernels are checked on a mesh of CPU devices only). A TPU or a non-NVIDIA
    GPU: bfloat16 with XLA's ops. A CPU: :data:`EXACT` (float32 is also the fastest there).
    """
    nvidia = platform == "gpu" if nvidia is None else nvidia
    if platform == "gpu" and nvidia:
        return FAST if num_devices == 1 else FAST.replace(attention_impl="cudnn", norm_impl="xla")
    if platform in ("gpu", "tpu"):
        return EXACT.replace(dtype="bfloat16", prng_impl="rbg")
    return EXACT


def resolve(preset: str = "auto", overrides: Mapping[str, Any] | None = None, *,
            platform: str | None = None, num_devices: int | None = None,
            nvidia: bool | None = None) -> Compute:
    """The spec of ``preset`` with ``overrides`` (field -> value; ``None`` values are ignored),
    checked for the platform. ``platform``/``num_devices`` default to this JAX runtime's."""
    if preset not in PRESETS:
        raise UserError(f"--compute={preset}: choose one of {', '.join(PRESETS)}")
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    check_overrides(overrides)
    if platform is None or (num_devices is None and preset == "auto"):
        p, n, nv = platform_info()
        platform = platform or p
        num_devices = n if num_devices is None else num_devices
        nvidia = nv if nvidia is None else nvidia
    base = {"exact": EXACT, "fast": FAST}.get(preset) or auto_for(platform, num_devices or 1, nvidia)
    spec = base.replace(**overrides)
    spec.check_platform(platform, num_devices or 1, nvidia)
    return spec


# ----------------------------------------------------------------------------- device memory

#: Environment variable that sets the device memory a run plans for, in GiB (overrides what the
#: device reports; the CPU reports none). Leave headroom for the runtime's own buffers.
MEMORY_ENV = "JAXPEFT_DEVICE_MEMORY_GIB"
#: The share of the device's memory a compiled step may plan to use (the rest: fragmentation, the
#: runtime's own buffers, programs).
MEMORY_HEADROOM = 0.95
GIB = 2 ** 30


def device_memory() -> int | None:
    """Bytes one device may hold: ``$JAXPEFT_DEVICE_MEMORY_GIB`` if set, else the allocator's
    limit (``memory_stats()['bytes_limit']``) where the platform reports it; ``None`` on a CPU."""
    import os

    env = os.environ.get(MEMORY_ENV, "").strip()
    if env:
        try:
            return int(float(env) * GIB)
        except ValueError:
            raise UserError(f"{MEMORY_ENV}={env!r}: expected a number of GiB") from None
    import jax

    try:
        stats = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 -- not every backend has memory statistics
        return None
    limit = stats.get("bytes_limit")
    return int(limit) if limit else None


def compiled_memory(compiled: Any) -> dict[str, int] | None:
    """XLA's memory analysis of a compiled program, per device: ``arguments``, ``outputs``,
    ``aliased`` (outputs written into donated arguments), ``temp`` and ``total`` = arguments +
    outputs - aliased + temp (what the program holds at once); ``None`` where it is not available."""
    try:
        m = compiled.memory_analysis()
        m = m[0] if isinstance(m, (list, tuple)) else m
        out = {"arguments": int(m.argument_size_in_bytes), "outputs": int(m.output_size_in_bytes),
               "aliased": int(m.alias_size_in_bytes), "temp": int(m.temp_size_in_bytes)}
    except Exception:  # noqa: BLE001 -- not every backend or executable reports it
        return None
    out["total"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temp"]
    return out


def programs_memory(programs: Mapping[Any, Any]) -> dict[str, Any] | None:
    """The largest :func:`compiled_memory` of ``programs`` (compiled programs by shape key), with
    its ``key``; ``None`` where none reports one."""
    best = None
    for key, compiled in programs.items():
        m = compiled_memory(compiled)
        if m is not None and (best is None or m["total"] > best["total"]):
            best = {**m, "key": str(key)}
    return best


def check_programs_memory(train: dict | None, predict: dict | None, limit: int | None, batch_size: int,
                          eval_batch_size: int, data_parallel: int = 1, remat: str = "none") -> dict[str, Any]:
    """What a run's compiled programs hold per device (``programs_memory`` of its train steps and of
    its evaluation) against the device's memory ``limit``, before the first step.

    Returns:
        ``device_memory_bytes``, ``train_step_bytes``, ``predict_bytes``.

    Raises:
        UserError: a program that does not fit, naming the batch that would: weights, optimizer
        state and inputs stay, activations and temporaries scale with the batch.
    """
    info = {"device_memory_bytes": limit, "train_step_bytes": train and train["total"],
            "predict_bytes": predict and predict["total"]}
    for m, flag, batch in ((train, "batch_size", batch_size), (predict, "eval_batch_size", eval_batch_size)):
        if m is None or fits(m["total"], limit):
            continue
        fixed = m["total"] - m["temp"]
        rows = int((MEMORY_HEADROOM * limit - fixed) / max(m["temp"] / batch, 1)) // data_parallel * data_parallel
        what = "a train step" if flag == "batch_size" else "an evaluation batch"
        fit = f"--{flag}={rows} would fit" if rows >= data_parallel else "not even the smallest batch fits"
        more = ", or --remat=layer" if flag == "batch_size" and remat != "layer" else ""
        raise UserError(
            f"{what} of --{flag}={batch} (length {m['key']}) needs {m['total'] / GIB:.2f} GiB per device "
            f"(weights, optimizer state and inputs {fixed / GIB:.2f} GiB, activations and temporaries "
            f"{m['temp'] / GIB:.2f} GiB) and the device has {limit / GIB:.2f} GiB: about {fit}{more}, or "
            "--base_dtype=int8/nf4 with a PEFT method, or --mesh=fsdp:N over several devices")
    return info


def fits(need: int | None, limit: int | None) -> bool:
    """Whether ``need`` bytes fit ``limit`` with :data:`MEMORY_HEADROOM` (unknowns fit)."""
    return need is None or limit is None or need <= MEMORY_HEADROOM * limit


def choose_remat(need_without: int | None, limit: int | None) -> str:
    """What ``--remat=auto`` becomes: ``none`` where the step compiled without rematerialisation
    needs at most :data:`MEMORY_HEADROOM` of the device's memory (or either is unknown), else
    ``layer``.

    >>> choose_remat(70 * GIB, 80 * GIB), choose_remat(79 * GIB, 80 * GIB), choose_remat(None, 80 * GIB)
    ('none', 'layer', 'none')
    """
    return "none" if fits(need_without, limit) else "layer"


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is XLA running out of device memory (``RESOURCE_EXHAUSTED``)."""
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("RESOURCE_EXHAUSTED" in text or "Out of memory" in text)


def out_of_memory_message(where: str, peak: int | None, limit: int | None) -> str:
    """The one line a run ends with when the device runs out of memory ``where``."""
    held = (f"peak {peak / GIB:.2f} GiB" if peak is not None else "peak unknown") + (
        f" of {limit / GIB:.2f} GiB" if limit else "")
    return (f"out of device memory {where} ({held} on this device): use --remat=layer (or --remat=auto), "
            "a smaller --batch_size, --base_dtype=int8 or nf4 with a PEFT method, or --mesh=fsdp:N over "
            "several devices")
