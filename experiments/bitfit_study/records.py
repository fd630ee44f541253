"""Whether a finished run of the study was made with what the study asks for now.

A run's ``spec.json`` records its settings by flag name (``TrainConfig.to_flat()``); its
``results.json`` records the compute it used (``compute``, the resolved spec) and the devices it ran
on. A finished run matches the study when

* every setting is the same, except where results go and how progress shows (:data:`NOT_COMPARED`);
  a setting the record lacks takes its default (the version that wrote it had no such setting and
  behaved as the default does);
* the compute fields that change the training trajectory (``jaxpeft.compute.Compute`` fields marked
  ``trajectory``) are what the study's ``--compute`` preset and overrides resolve to on the devices
  that run used (a field the record lacks takes its default, as settings do). Fields that change
  speed only (``norm_impl``, ``remat``) are not compared.

Records written before the settings were grouped (no ``compute`` key in ``spec.json``) hold every
compute option as an explicit value; they are read in today's terms by :func:`legacy`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

from jaxpeft import compute as compute_lib
from jaxpeft import config as config_lib
from jaxpeft import methods
from jaxpeft.errors import UserError

#: Settings that may differ between a finished run and now without making the run stale.
NOT_COMPARED = ("output_dir", "data_dir", "config", "progress", "plot", "compilation_cache",
                "steps_per_dispatch")
#: Compute options of legacy records that are options no more, with the value every run had that
#: did not set them; a record with another value differs from every run made now.
REMOVED = {"dropout_bits": 32}
#: Options of legacy records that are options no more and changed speed only.
REMOVED_SPEED_ONLY = ("activation_impl",)


def trajectory_fields() -> list[str]:
    return [name for name, f in compute_lib.fields().items() if f.metadata["trajectory"]]


def defaults(method: str) -> dict[str, Any]:
    """Every setting's default by flag name: the top-level fields, the groups' fields and the
    options of ``method`` (compute fields are compared as resolved, not here)."""
    out = {f.name: f.default for f in dataclasses.fields(config_lib.TrainConfig)
           if f.default is not dataclasses.MISSING and f.name != "compute"}
    for cls in config_lib.GROUPS.values():
        out.update({f.name: f.default for f in dataclasses.fields(cls)})
    if method in methods.REGISTRY:
        out.update({f.name: f.default for f in dataclasses.fields(methods.REGISTRY[method])})
    return out


def platform_of(devices: str | None) -> tuple[str, int, bool] | None:
    """``results.json``'s ``devices`` (``"1x cpu"``, ``"8x NVIDIA H200"``) as ``(platform, device
    count, NVIDIA or not)``, the arguments of ``jaxpeft.compute.resolve``; None if unreadable.

    >>> platform_of("1x cpu"), platform_of("8x NVIDIA H200"), platform_of("4x TPU v4")
    (('cpu', 1, False), ('gpu', 8, True), ('tpu', 4, False))
    """
    m = re.fullmatch(r"(\d+)x (.+)", (devices or "").strip())
    if not m:
        return None
    n, kind = int(m.group(1)), m.group(2).lower()
    if kind == "cpu":
        return "cpu", n, False
    if kind.startswith("tpu"):
        return "tpu", n, False
    return "gpu", n, not any(w in kind for w in ("amd", "radeon", "instinct"))


def _settings(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``flat`` without the compute preset and compute fields (compared as resolved)."""
    comp = compute_lib.fields()
    return {k: v for k, v in flat.items() if k != "compute" and k not in comp}


def legacy(old: Mapping[str, Any], platform: tuple[str, int, bool] | None) -> tuple[dict, dict]:
    """A record written before the settings were grouped, as ``(settings, compute)`` in today's
    terms. Its compute options were explicit values: ``dropout_impl`` missing means ``random``
    (the only masks before it existed), ``remat`` as a bool means ``layer``/``none``,
    ``prng_impl=auto`` meant ``rbg`` on a GPU or TPU and ``threefry2x32`` on a CPU, and
    ``cls_only_last_layer`` gives the same logits and gradients either way. It recorded the options
    of every method: those of other methods are dropped; options no longer known are kept, and
    differ from every run made now."""
    method = old.get("method", "bitfit")
    own = {f.name for f in dataclasses.fields(methods.REGISTRY[method])} if method in methods.REGISTRY else set()
    others = methods.all_options() - own
    comp_names = compute_lib.fields()
    settings = {k: v for k, v in old.items()
                if k not in comp_names and k not in others and k not in REMOVED and k not in REMOVED_SPEED_ONLY}
    comp = {k: v for k, v in old.items() if k in comp_names}
    comp.setdefault("dropout_impl", "random")
    if isinstance(comp.get("remat"), bool):
        comp["remat"] = "layer" if comp["remat"] else "none"
    if comp.get("prng_impl", "auto") == "auto":
        comp["prng_impl"] = None if platform is None else \
            ("threefry2x32" if platform[0] == "cpu" else "rbg")
    comp.setdefault("cls_only_last_layer", compute_lib.EXACT.cls_only_last_layer)
    for k, usual in REMOVED.items():
        if old.get(k, usual) != usual:
            settings[k] = old[k]   # no run made now has it: a difference
    return settings, comp


def recorded(spec_config: Mapping[str, Any], results: Mapping[str, Any]) -> tuple[dict, dict | None]:
    """``(settings, compute)`` of a finished run from its ``spec.json`` config and its results
    (compute None: not known)."""
    platform = platform_of(results.get("devices"))
    method = spec_config.get("method")
    if method in methods.ALIASES:   # a method's earlier name (``adapter``): the same runs
        spec_config = {**spec_config, "method": methods.ALIASES[method]}
    if "compute" not in spec_config:
        return legacy(spec_config, platform)
    comp = results.get("compute")
    return _settings(spec_config), (dict(comp) if isinstance(comp, Mapping) else None)


def requested(cfg: config_lib.TrainConfig, platform: tuple[str, int, bool] | None) -> dict | None:
    """The compute ``cfg`` resolves to on ``platform`` (None: it cannot run there)."""
    if platform is None:
        return None
    name, n, nvidia = platform
    try:
        return cfg.resolve_compute(platform=name, num_devices=n, nvidia=nvidia).to_dict()
    except UserError:
        return None


def differences(spec_config: Mapping[str, Any] | None, results: Mapping[str, Any],
                cfg: config_lib.TrainConfig) -> list[str] | None:
    """The settings in which a finished run differs from ``cfg`` (``[]``: none); None when the
    run has no readable record of its settings."""
    if not isinstance(spec_config, Mapping):
        return None
    old, old_comp = recorded(spec_config, results)
    new = _settings(cfg.to_flat())
    dflt = defaults(cfg.method)
    keys = list(new) + [k for k in old if k not in new]
    diff = [k for k in keys if k not in NOT_COMPARED and old.get(k, dflt.get(k)) != new.get(k, dflt.get(k))]
    new_comp = requested(cfg, platform_of(results.get("devices")))
    if old_comp is None or new_comp is None:
        return diff + ["compute"]
    fields = compute_lib.fields()
    return diff + [f for f in trajectory_fields() if old_comp.get(f, fields[f].default) != new_comp[f]]
