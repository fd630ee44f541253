"""jaxpeft: parameter-efficient fine-tuning of encoders in JAX/Flax.

``jaxpeft.train(...)``, ``jaxpeft.load(adapter_dir).predict(...)`` (:mod:`jaxpeft.api`); the masks
(:mod:`jaxpeft.masks`) need nothing but jax and optax.
"""

__version__ = "0.2.0"


def __getattr__(name):   # the API's imports are heavy: loaded on first use
    if name in ("train", "load", "predict", "Run", "Adapter"):
        from jaxpeft import api

        return getattr(api, name)
    raise AttributeError(f"module 'jaxpeft' has no attribute {name!r}")


__all__ = ["Adapter", "Run", "load", "predict", "train"]
