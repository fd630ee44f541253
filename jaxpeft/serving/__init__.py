"""``jaxpeft-serve``: HTTP serving of many adapters on one frozen base model, with dynamic
batching across adapters.

* :mod:`jaxpeft.serving.engine`: the interface to the model (:class:`~jaxpeft.serving.engine.Engine`);
* :mod:`jaxpeft.serving.jax_engine`: the engine ``jaxpeft-serve`` runs -- one base model, adapters
  grouped by mixing family and task kind (the design is described there), with
  :mod:`jaxpeft.serving.groups` (each group's slots and compiled programs) and
  :mod:`jaxpeft.serving.inputs` (inputs and answers of each task kind);
* :mod:`jaxpeft.serving.batcher`: the queue and the batching loop (the design is described there);
* :mod:`jaxpeft.serving.app`: the Starlette app (routes, statuses, why Starlette on uvicorn);
* :mod:`jaxpeft.serving.metrics`: the Prometheus metrics;
* :mod:`jaxpeft.serving.cli`: the command line (flags, signals, exit statuses);
* :mod:`jaxpeft.serving.fake`: a model-free engine for tests and for trying the API.

The submodules import Starlette, uvicorn and prometheus_client (the engine modules: JAX); this
package itself imports nothing, so ``import jaxpeft.serving.engine`` stays light.
"""
