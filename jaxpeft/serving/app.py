"""The HTTP API of ``jaxpeft-serve``: a Starlette app over an :class:`~jaxpeft.serving.engine.Engine`.

Why Starlette on uvicorn: the server needs an event loop that holds thousands of waiting requests
cheaply while one thread owns the device, plus graceful shutdown and a lifespan hook for our own
drain -- which is exactly what an ASGI app on uvicorn gives. Starlette is the small, long-kept
toolkit under FastAPI (routing, requests, responses, lifespan; few dependencies of its own,
no pydantic), and uvicorn is the reference ASGI server (h11, signal handling, graceful shutdown
that waits for in-flight responses). The API is five JSON routes whose validation is a few
lines by hand, so FastAPI's schema layer would add weight and not safety; aiohttp would bring a
second HTTP stack of its own, and a WSGI server would need a thread per waiting request.

Routes (every answer is one JSON line; errors are ``{"error": "..."}``):

========================  ===================================================================
``POST /v1/predict``      ``{"adapter": NAME, "inputs": [...]}`` -> ``{"adapter", "outputs"}``
``GET /v1/adapters``      the loaded adapters and the engine's capacity
``POST /v1/adapters``     ``{"name": NAME, "path": DIR}``: hot-add an adapter (201)
``DELETE /v1/adapters/N`` hot-remove one, once its accepted requests are answered
``GET /health``           200 ``{"status": "ok", ...}``; 503 while draining
``GET /metrics``          Prometheus text (:mod:`jaxpeft.serving.metrics`)
========================  ===================================================================

Statuses: 400 malformed JSON, a missing or mistyped field, an input of the wrong shape; 404 an
unknown adapter or route; 409 an adapter name in use, or a family at capacity; 413 too many
inputs, an over-long input, a body over ``max_body_bytes``; 500 the engine failed on the batch
holding the request's rows (only those requests fail); 503 the queue is full or the server is
draining, with ``Retry-After``.

Batching: :mod:`jaxpeft.serving.batcher`. Threads: the event loop (HTTP), the *prepare thread*
(:meth:`Engine.prepare` and :meth:`Engine.adapters`: validation and tokenization, off the loop)
and the *device thread* (:meth:`Engine.run`, ``add`` and ``remove``, one at a time).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from jaxpeft.errors import UserError
from jaxpeft.serving.batcher import Batcher, EngineFailure, QueueFull, ShuttingDown
from jaxpeft.serving.engine import Engine, InputError, TooLarge, UnknownAdapter, check_engine
from jaxpeft.serving.metrics import Metrics

log = logging.getLogger("jaxpeft.serving")
#: adapter names: usable in a URL path as they are
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


@dataclasses.dataclass
class ServeConfig:
    """The server's limits (``jaxpeft-serve`` flags of the same names)."""

    max_wait_ms: float = 5.0          #: how long the oldest queued row waits for a fuller call
    max_batch: int | None = None      #: rows per device call (default and ceiling: the engine's)
    max_queue_rows: int = 1024        #: queued rows beyond which requests get 503
    max_inputs_per_request: int = 64  #: more inputs in one request get 413
    max_body_bytes: int = 4 << 20     #: larger request bodies get 413

    def check(self) -> None:
        """Raises :class:`~jaxpeft.errors.UserError` for values out of range."""
        if self.max_wait_ms < 0:
            raise UserError(f"--max_wait_ms={self.max_wait_ms}: must be >= 0")
        for k in ("max_queue_rows", "max_inputs_per_request", "max_body_bytes"):
            if getattr(self, k) < 1:
                raise UserError(f"--{k}={getattr(self, k)}: must be >= 1")
        if self.max_batch is not None and self.max_batch < 1:
            raise UserError(f"--max_batch={self.max_batch}: must be >= 1")
        if self.max_inputs_per_request > self.max_queue_rows:
            raise UserError(f"--max_inputs_per_request={self.max_inputs_per_request} is more than "
                            f"--max_queue_rows={self.max_queue_rows}: such a request could never be queued")


class Answer(Exception):
    """An error answer: HTTP ``status``, ``{"error": message}``, extra ``headers``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers or {}


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """One line of JSON (and a newline, for curl)."""
    return Response(json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")) + "\n",
                    status_code=status, headers=headers, media_type="application/json")


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return json_response({"error": " ".join(str(message).split())}, status, headers)


def answer_for(e: BaseException) -> Answer:
    """The HTTP answer for an exception raised while serving a request."""
    if isinstance(e, Answer):
        return e
    if isinstance(e, InputError):
        return Answer(e.status, str(e))
    if isinstance(e, UserError):
        return Answer(400, str(e))
    if isinstance(e, QueueFull):
        return Answer(503, str(e), {"Retry-After": str(e.retry_after)})
    if isinstance(e, ShuttingDown):
        return Answer(503, str(e), {"Retry-After": "1", "Connection": "close"})
    if isinstance(e, EngineFailure):
        return Answer(500, str(e))
    log.error("internal error", exc_info=e)
    return Answer(500, f"internal error: {type(e).__name__}: {e}")


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The request's body as a JSON object; 413 past ``limit`` bytes, 400 if it is not one."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise Answer(413, f"the body has {declared} bytes; at most {limit} are taken")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise Answer(413, f"the body is over {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise Answer(400, "the client went away before sending the whole body") from None
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as e:
        raise Answer(400, f"malformed JSON: {e}") from None
    if not isinstance(body, dict):
        raise Answer(400, f"the body must be a JSON object, not {type(body).__name__}")
    return body


def field(body: dict[str, Any], key: str, kind: type, what: str) -> Any:
    if key not in body:
        raise Answer(400, f'missing field "{key}" ({what})')
    value = body[key]
    if not isinstance(value, kind) or not value:
        raise Answer(400, f'"{key}" must be {what}')
    return value


class Service:
    """The routes' state: the engine, the batcher, the metrics, the threads."""

    def __init__(self, engine: Engine, config: ServeConfig):
        check_engine(engine)
        config.check()
        self.engine, self.config = engine, config
        self.metrics = Metrics(max_batch=config.max_batch or engine.max_batch,
                               queue_rows=lambda: self.batcher.queued_rows)
        self.batcher = Batcher(engine, max_batch=config.max_batch, max_wait_ms=config.max_wait_ms,
                               max_queue_rows=config.max_queue_rows, metrics=self.metrics)
        self._prepare = ThreadPoolExecutor(1, thread_name_prefix="jaxpeft-prepare")
        self.closing: set[str] = set()      # adapters being removed: no new requests
        self._admin = asyncio.Lock()
        self.adapter_count = 0

    async def on_prepare_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._prepare, fn, *args)

    async def names(self) -> set[str]:
        names = {a["name"] for a in await self.on_prepare_thread(self.engine.adapters)}
        self.adapter_count = len(names)
        self.metrics.adapters_loaded.set(len(names))
        return names

    def begin_drain(self) -> None:
        """From now on refuse new requests (503) and flush the queue (callable from any thread)."""
        self.batcher.begin_drain()

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette):
        await self.batcher.start()
        await self.names()
        try:
            yield
        finally:      # uvicorn has stopped taking connections; answer what was accepted
            await self.batcher.close()
            self._prepare.shutdown(wait=False)

    # ------------------------------------------------------------------ routes

    async def predict(self, request: Request) -> Response:
        start, adapter, status = time.monotonic(), "", 500
        try:
            if self.batcher.draining:
                raise ShuttingDown("the server is shutting down")
            body = await read_json(request, self.config.max_body_bytes)
            name = field(body, "adapter", str, "the name of a loaded adapter")
            inputs = field(body, "inputs", list, "a non-empty list of inputs")
            limit = self.config.max_inputs_per_request
            if len(inputs) > limit:
                raise TooLarge(f"{len(inputs)} inputs in one request; at most {limit} are taken")
            if name in self.closing:
                raise UnknownAdapter(f"adapter {name} is being removed")
            rows = await self.on_prepare_thread(self.engine.prepare, name, inputs)
            adapter = name              # a loaded adapter: a label of the request counter
            if name in self.closing:
                raise UnknownAdapter(f"adapter {name} is being removed")
            if len(rows) != len(inputs):
                raise RuntimeError(f"engine.prepare made {len(rows)} rows of {len(inputs)} inputs")
            self.metrics.in_progress.inc()
            try:
                outputs = await self.batcher.submit(name, rows)
            finally:
                self.metrics.in_progress.dec()
            response = json_response({"adapter": name, "outputs": outputs})
        except Exception as e:
            a = answer_for(e)
            response = error_response(a.status, str(a), a.headers)
        status = response.status_code
        self.metrics.requests.labels(adapter, str(status)).inc()
        self.metrics.request_seconds.observe(time.monotonic() - start)
        return response

    async def list_adapters(self, request: Request) -> Response:
        adapters = await self.on_prepare_thread(self.engine.adapters)
        return json_response({"adapters": adapters, "max_adapters_per_family": self.engine.max_adapters_per_family,
                              "max_batch": self.batcher.max_batch, "buckets": list(self.engine.buckets)})

    async def add_adapter(self, request: Request) -> Response:
        try:
            body = await read_json(request, self.config.max_body_bytes)
            name = field(body, "name", str, "the adapter's name")
            path = field(body, "path", str, "the adapter's folder on the server")
            if not NAME.fullmatch(name):
                raise Answer(400, f"adapter name {name!r}: letters, digits, '.', '_', '-' (at most 100), "
                             "starting with a letter or digit")
            async with self._admin:
                if name in self.closing or name in await self.names():
                    raise Answer(409, f"adapter {name} is already loaded")
                info = await self.batcher.call_on_device(self.engine.add, name, path)
                await self.names()
            log.info("added adapter %s from %s", name, path)
            return json_response({"adapter": info}, 201)
        except Exception as e:
            a = answer_for(e)
            return error_response(a.status, str(a), a.headers)

    async def remove_adapter(self, request: Request) -> Response:
        name = request.path_params["name"]
        try:
            async with self._admin:
                if name not in await self.names():
                    raise UnknownAdapter(f"no adapter named {name}")
                self.closing.add(name)
                try:
                    await self.batcher.wait_idle(name)
                    await self.batcher.call_on_device(self.engine.remove, name)
                finally:
                    self.closing.discard(name)
                    await self.names()
            log.info("removed adapter %s", name)
            return json_response({"removed": name})
        except Exception as e:
            a = answer_for(e)
            return error_response(a.status, str(a), a.headers)

    async def health(self, request: Request) -> Response:
        if self.batcher.draining:
            return json_response({"status": "draining"}, 503, {"Retry-After": "1"})
        return json_response({"status": "ok", "adapters": self.adapter_count,
                              "queue_rows": self.batcher.queued_rows})

    async def metrics_text(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=self.metrics.content_type)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    message = f"no route {request.method} {request.url.path}" if exc.status_code == 404 else exc.detail
    return error_response(exc.status_code, message, dict(exc.headers or {}))


async def _internal_error(request: Request, exc: Exception) -> Response:
    a = answer_for(exc)
    return error_response(a.status, str(a), a.headers)


def create_app(engine: Engine, config: ServeConfig | None = None, **options: Any) -> Starlette:
    """The ASGI app serving ``engine``; ``options`` override ``config``'s fields. The app's
    :class:`Service` is ``app.state.service`` (``app.state.service.begin_drain()`` starts a drain)."""
    config = dataclasses.replace(config or ServeConfig(), **options)
    service = Service(engine, config)
    routes = [
        Route("/v1/predict", service.predict, methods=["POST"]),
        Route("/v1/adapters", service.list_adapters, methods=["GET"]),
        Route("/v1/adapters", service.add_adapter, methods=["POST"]),
        Route("/v1/adapters/{name}", service.remove_adapter, methods=["DELETE"]),
        Route("/health", service.health, methods=["GET"]),
        Route("/metrics", service.metrics_text, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=service.lifespan,
                    exception_handlers={HTTPException: _http_error, Exception: _internal_error})
    app.state.service = service
    return app
