"""jaxpeft: parameter-efficient fine-tuning of BERT encoders in JAX/Flax."""

__version__ = "0.1.0"
