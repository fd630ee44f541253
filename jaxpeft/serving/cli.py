"""``jaxpeft-serve``: an HTTP server predicting with many adapters on one frozen base model.

    jaxpeft-serve --adapters_dir=adapters/ --port=8000
    jaxpeft-serve --adapter=sst2=runs/lora-sst2/adapter --adapter=ner=runs/lora-ner/adapter \\
        --max_batch=16 --buckets=32,64,128 --max_adapters_per_family=64

The engine (the model side, :class:`jaxpeft.serving.engine.Engine`) is by default
:class:`jaxpeft.serving.jax_engine.JaxEngine`: the base model (``--model``, else the one the first
adapter records) loaded once, the adapters grouped by mixing family and task kind, every program
compiled before the port opens. Another engine comes from a factory, ``--engine=MODULE:CALLABLE``
or the ``engine_factory`` argument of :func:`main`; it is called as ``factory(model=--model,
compute=--compute, max_batch=--max_batch)`` plus ``buckets``, ``batch_sizes``,
``max_adapters_per_family`` and ``max_labels`` where those flags are given. The adapters of
``--adapter=NAME=DIR`` (repeatable) and of ``--adapters_dir`` (one adapter per subfolder, named
by it) are loaded before the port opens; more can be added and removed while serving
(``POST /v1/adapters``, ``DELETE /v1/adapters/NAME``). ``jaxpeft.serving.fake:factory`` serves
a model-free fake, for trying the API.

SIGTERM (or Ctrl+C) drains: new requests are refused, the accepted ones are answered, and the
process exits with status 0. Bad flags: ``error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import socket
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import uvicorn

from jaxpeft.errors import UserError

EXIT_USER_ERROR = 2
EngineFactory = Callable[..., Any]
DEFAULT_ENGINE = "jaxpeft.serving.jax_engine:factory"
#: engine flags passed to the factory only where given (an engine may not take them)
ENGINE_FLAGS = ("buckets", "batch_sizes", "max_adapters_per_family", "max_labels")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):   # one line and status 2, as every jaxpeft command
        raise UserError(message)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    from jaxpeft import compute

    p = _Parser(prog="jaxpeft-serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", help=f"the engine factory, MODULE:CALLABLE (default: {DEFAULT_ENGINE}; "
                   "jaxpeft.serving.fake:factory serves a model-free fake)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="an adapter to load at start (repeatable)")
    p.add_argument("--adapters_dir", help="a folder of adapter folders, each loaded under its folder's name")
    p.add_argument("--model", help="the base model (default: the one the adapters record)")
    p.add_argument("--compute", default="auto", choices=compute.PRESETS, help="how the engine computes")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free one, printed at start)")
    p.add_argument("--max_wait_ms", type=float, default=5.0,
                   help="how long the oldest queued row waits for a fuller device call")
    p.add_argument("--max_batch", type=int, help="rows per device call (default and ceiling: the engine's)")
    p.add_argument("--buckets", type=_ints, metavar="L,L,...",
                   help="padded sequence lengths compiled (default 16,32,64,128); longer texts are truncated")
    p.add_argument("--batch_sizes", type=_ints, metavar="B,B,...",
                   help="batch sizes compiled, the largest = --max_batch (default: powers of two up to it)")
    p.add_argument("--max_adapters_per_family", type=int,
                   help="slots allocated per group of adapters sharing a batch (default 16)")
    p.add_argument("--max_labels", type=int, help="outputs of every sequence/tagging head (default 32)")
    p.add_argument("--max_queue_rows", type=int, default=1024, help="queued rows beyond which requests get 503")
    p.add_argument("--max_inputs_per_request", type=int, default=64, help="more inputs in one request get 413")
    p.add_argument("--log_level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument("--access_log", action="store_true", help="log every request")
    args = p.parse_args(argv)
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port={args.port}: must be in 0..65535")
    return args


def _ints(value: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: give positive integers separated by commas")
    return out


def load_factory(spec: str) -> EngineFactory:
    """``MODULE:CALLABLE`` -> the callable."""
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise UserError(f"--engine={spec}: give it as MODULE:CALLABLE")
    try:
        obj = importlib.import_module(module)
    except ImportError as e:
        raise UserError(f"--engine={spec}: cannot import {module} ({e})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"--engine={spec}: {module} has no {attr}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(f"--engine={spec}: {attr} is not callable")
    return obj


def adapter_specs(args: argparse.Namespace) -> list[tuple[str, str]]:
    """``(name, folder)`` of every adapter to load at start, names unique."""
    from jaxpeft.serving.app import NAME

    specs: list[tuple[str, str]] = []
    for value in args.adapter:
        name, sep, d = value.partition("=")
        if not sep or not name.strip() or not d.strip():
            raise UserError(f"--adapter={value}: give it as NAME=DIR")
        specs.append((name.strip(), d.strip()))
    if args.adapters_dir:
        root = Path(args.adapters_dir)
        if not root.is_dir():
            raise UserError(f"--adapters_dir={root}: not a folder")
        specs += [(d.name, str(d)) for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    seen: set[str] = set()
    for name, d in specs:
        if not NAME.fullmatch(name):
            raise UserError(f"adapter name {name!r} ({d}): letters, digits, '.', '_', '-', starting "
                            "with a letter or digit")
        if name in seen:
            raise UserError(f"the adapter name {name} is given twice")
        seen.add(name)
    return specs


def listen(host: str, port: int) -> socket.socket:
    """A bound TCP socket (uvicorn listens on it)."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def build(args: argparse.Namespace, engine_factory: EngineFactory | None = None):
    """The app for ``args``: the engine made, its adapters loaded."""
    from jaxpeft.serving.app import ServeConfig, create_app
    from jaxpeft.serving.engine import check_engine

    config = ServeConfig(max_wait_ms=args.max_wait_ms, max_batch=args.max_batch,
                         max_queue_rows=args.max_queue_rows, max_inputs_per_request=args.max_inputs_per_request)
    config.check()
    specs = adapter_specs(args)
    if args.engine:
        engine_factory = load_factory(args.engine)
    if engine_factory is None:
        if not args.model and not specs:
            raise UserError("nothing to serve: give --model, --adapter=NAME=DIR or --adapters_dir")
        engine_factory = load_factory(DEFAULT_ENGINE)
    extra = {k: getattr(args, k) for k in ENGINE_FLAGS if getattr(args, k) is not None}
    try:
        engine = engine_factory(model=args.model, compute=args.compute, max_batch=args.max_batch, **extra)
    except TypeError as e:
        if not extra:
            raise
        raise UserError(f"the engine does not take {', '.join('--' + k for k in extra)} ({e})") from None
    try:
        check_engine(engine)
    except (TypeError, ValueError) as e:
        raise UserError(f"--engine: {e}") from None
    if args.max_batch is not None and args.max_batch > engine.max_batch:
        raise UserError(f"--max_batch={args.max_batch}: the engine takes at most {engine.max_batch}")
    for name, d in specs:
        engine.add(name, d)
    return create_app(engine, config)


class _Server(uvicorn.Server):
    """uvicorn's server, which also starts our drain on its first signal."""

    def __init__(self, config: uvicorn.Config, on_signal: Callable[[], None]):
        super().__init__(config)
        self.on_signal = on_signal

    def handle_exit(self, sig, frame):
        self.on_signal()
        super().handle_exit(sig, frame)


def serve(app, sock: socket.socket, *, log_level: str = "info", access_log: bool = False) -> None:
    """Serves ``app`` on ``sock`` until SIGTERM/SIGINT, then drains; returns normally."""
    config = uvicorn.Config(app, log_level=log_level, access_log=access_log, lifespan="on",
                            timeout_graceful_shutdown=None)
    server = _Server(config, app.state.service.begin_drain)
    # uvicorn re-raises the signal that stopped it once it has shut down; these handlers take
    # that re-raise, so a drained server exits with status 0 instead of dying of the signal
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock])
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def main(argv: Sequence[str] | None = None, engine_factory: EngineFactory | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        args = parse(argv)
        logging.getLogger("jaxpeft.serving").setLevel(args.log_level.upper())
        sock = listen(args.host, args.port)     # first: a taken port fails before any loading
        try:
            app = build(args, engine_factory)
        except BaseException:
            sock.close()
            raise
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    host, port = sock.getsockname()[:2]
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    print(f"jaxpeft-serve: {app.state.service.engine.__class__.__name__} with "
          f"{len(app.state.service.engine.adapters())} adapters on {url}", file=sys.stderr, flush=True)
    serve(app, sock, log_level=args.log_level, access_log=args.access_log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
