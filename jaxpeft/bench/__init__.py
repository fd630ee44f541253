"""Benchmarks of the train step (``jaxpeft-bench``) and the PyTorch + peft peer."""
