"""Dynamic batching across adapters: many requests, of many adapters, into few device calls.

The design
----------
Every predict request is turned into rows (:meth:`Engine.prepare`, one row per input) and its
rows join **one queue**, shared by all adapters. The queue is kept as one FIFO per bucket length
(``row.length``): the rows of one device call must share a length, and nothing else -- rows of
any adapters mix in a call, because the mixed-adapter model routes each row to its own adapter.

A single **batching loop** (an asyncio task) forms device calls:

1. it waits until a row is queued;
2. the *oldest* queued row has a deadline: its arrival plus ``max_wait_ms``. Once that deadline
   has passed, the loop takes the oldest row's bucket: up to ``max_batch`` of its rows, oldest
   first (**oldest first** across buckets is the fairness rule: no row waits for a fuller
   bucket);
3. before the deadline, a bucket that already holds ``max_batch`` rows is taken at once (a full
   call gains nothing by waiting); otherwise the loop sleeps until the deadline or the next
   arrival, whichever comes first;
4. it runs the call (:meth:`Engine.run`) on the **device thread** (a one-thread executor:
   exactly one call in flight, and the engine never sees two threads at once) and awaits it;
   meanwhile new rows keep queueing, so the next call is formed from everything that arrived
   during this one;
5. each result goes to its request; a request's answer (an asyncio future) is resolved once all
   its rows are done, so a request whose rows landed in several calls (several buckets, or more
   than ``max_batch`` rows) is answered when its last call returns.

So a lone row waits at most ``max_wait_ms`` plus the call in flight when it arrived; under load
calls are full and the wait is shorter. A call holds rows of as many adapters as were waiting.

**Back-pressure.** The queue holds at most ``max_queue_rows`` rows. A request whose rows do not
fit is refused at once (:class:`QueueFull`; the server answers 503 with ``Retry-After``, an
estimate of how long the queue takes to clear), never queued and dropped later.

**Faults.** An exception from ``Engine.run`` fails the requests with rows in that call
(:class:`EngineFailure`, a 500), and only those; their other queued rows are skipped; the loop
goes on with the next call. A request whose waiter is cancelled (its client went away) has its
queued rows skipped too.

**Draining.** :meth:`Batcher.begin_drain` (on SIGTERM) refuses new requests
(:class:`ShuttingDown`, a 503) and stops waiting for fuller calls: the queued rows go out as soon
as the device is free. :meth:`Batcher.close` drains and then stops the loop: every accepted
request gets its answer.

**Adapter removal.** :meth:`Batcher.wait_idle` waits until an adapter has no queued or in-flight
rows; the server calls :meth:`Engine.remove` after it, on the device thread, so a removal never
races a call that holds the adapter's rows.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from jaxpeft.serving.engine import Engine, Row, TooLarge
from jaxpeft.serving.metrics import Metrics

log = logging.getLogger("jaxpeft.serving")


class QueueFull(Exception):
    """The queue has no room for a request's rows; retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class ShuttingDown(Exception):
    """The server is draining; it takes no new requests."""


class EngineFailure(Exception):
    """The device call holding some of a request's rows raised."""


@dataclasses.dataclass(eq=False)
class _Request:
    adapter: str
    results: list
    left: int
    future: asyncio.Future
    failed: bool = False

    def done(self) -> bool:
        return self.failed or self.future.done()

    def set(self, index: int, result: Any) -> None:
        self.results[index] = result
        self.left -= 1
        if self.left == 0 and not self.future.done():
            self.future.set_result(self.results)

    def fail(self, error: BaseException) -> None:
        self.failed = True
        if not self.future.done():
            self.future.set_exception(error)


@dataclasses.dataclass(eq=False)
class _Item:
    t: float                 # arrival (time.monotonic)
    request: _Request
    index: int               # the row's place among its request's inputs
    row: Row


class Batcher:
    """The queue and the batching loop (see the module docstring). Start it with :meth:`start`
    inside the event loop, stop it with :meth:`close`."""

    def __init__(self, engine: Engine, *, max_batch: int | None = None, max_wait_ms: float = 5.0,
                 max_queue_rows: int = 1024, metrics: Metrics | None = None):
        self.engine = engine
        self.max_batch = engine.max_batch if max_batch is None else max_batch
        if not 1 <= self.max_batch <= engine.max_batch:
            raise ValueError(f"max_batch={max_batch}: must be in 1..{engine.max_batch} (the engine's)")
        if max_wait_ms < 0 or max_queue_rows < 1:
            raise ValueError(f"max_wait_ms={max_wait_ms}, max_queue_rows={max_queue_rows}: must be >= 0 and >= 1")
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue_rows = max_queue_rows
        self.metrics = metrics
        self.queued_rows = 0          # rows waiting (skipped rows included until they are popped)
        self.draining = False
        self._queues: dict[int, collections.deque[_Item]] = {}
        self._pending: collections.Counter[str] = collections.Counter()   # queued + in-flight rows
        self._idle: dict[str, asyncio.Event] = {}
        self._call_seconds = 0.0      # a running mean of a device call's duration
        self._device = ThreadPoolExecutor(1, thread_name_prefix="jaxpeft-device")
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._task = self._loop.create_task(self._run_loop(), name="jaxpeft-batching-loop")

    def begin_drain(self) -> None:
        """Refuse new requests from now on and flush the queue without waiting (any thread)."""
        self.draining = True
        if self._loop is not None and self._wake is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake.set)

    async def close(self) -> None:
        """Drain: answer every queued row, then stop the loop and the device thread."""
        self.begin_drain()
        self._closed = True
        if self._task is not None:
            self._wake.set()
            await self._task
        self._device.shutdown(wait=False)

    async def call_on_device(self, fn: Callable, *args: Any) -> Any:
        """Runs ``fn(*args)`` on the device thread, between two device calls."""
        return await asyncio.get_running_loop().run_in_executor(self._device, fn, *args)

    # ------------------------------------------------------------------ requests

    async def submit(self, adapter: str, rows: list[Row]) -> list[Any]:
        """Queues one request's rows; returns their results in order once all are done.

        Raises :class:`QueueFull`, :class:`ShuttingDown`, :class:`EngineFailure`, or
        :class:`~jaxpeft.serving.engine.TooLarge` for more rows than the queue can ever hold."""
        if self.draining or self._task is None or self._task.done():
            raise ShuttingDown("the server is shutting down")
        n = len(rows)
        if n > self.max_queue_rows:
            raise TooLarge(f"{n} rows in one request; the queue holds {self.max_queue_rows}")
        if self.queued_rows + n > self.max_queue_rows:
            raise QueueFull(f"the queue is full ({self.queued_rows} of {self.max_queue_rows} rows waiting)",
                            self.retry_after())
        if n == 0:
            return []
        req = _Request(adapter, [None] * n, n, self._loop.create_future())
        now, wake = time.monotonic(), self.queued_rows == 0
        for i, row in enumerate(rows):
            q = self._queues.setdefault(row.length, collections.deque())
            q.append(_Item(now, req, i, row))
            wake = wake or len(q) == self.max_batch
        self.queued_rows += n
        self._pending[adapter] += n
        if wake:
            self._wake.set()
        try:
            return await req.future
        except asyncio.CancelledError:
            req.failed = True        # its queued rows are skipped
            raise

    def retry_after(self) -> int:
        """Seconds until the queue has likely cleared (at least 1): the calls it needs times the
        mean duration of a call."""
        calls = math.ceil(self.queued_rows / self.max_batch) + 1
        return max(1, min(60, math.ceil(calls * self._call_seconds)))

    def pending(self, adapter: str) -> int:
        """Rows of ``adapter`` queued or in a device call."""
        return self._pending.get(adapter, 0)

    async def wait_idle(self, adapter: str) -> None:
        """Returns once ``adapter`` has no queued or in-flight rows."""
        if self._pending.get(adapter, 0):
            await self._idle.setdefault(adapter, asyncio.Event()).wait()

    def _settle(self, adapter: str, n: int) -> None:
        self._pending[adapter] -= n
        if self._pending[adapter] <= 0:
            del self._pending[adapter]
            event = self._idle.pop(adapter, None)
            if event is not None:
                event.set()

    # ------------------------------------------------------------------ the loop

    async def _run_loop(self) -> None:
        try:
            while True:
                batch = await self._next_batch()
                if batch is None:
                    return
                await self._dispatch(batch)
        except Exception:
            log.exception("the batching loop stopped")
            raise
        finally:   # nothing is left here after a normal close; after a crash, no request hangs
            self.draining = True
            error = EngineFailure("the server stopped before this request was computed")
            for item in [it for q in self._queues.values() for it in q]:
                item.request.fail(error)
                self._settle(item.request.adapter, 1)
            self._queues.clear()
            self.queued_rows = 0

    async def _next_batch(self) -> list[_Item] | None:
        """The next device call's rows (see the module docstring); None once closed and empty."""
        while True:
            if self.queued_rows == 0:
                if self._closed:
                    return None
                self._wake.clear()
                await self._wake.wait()
                continue
            t0, length = min((q[0].t, n) for n, q in self._queues.items() if q)
            wait = t0 + self.max_wait - time.monotonic()
            if wait > 0 and not self.draining:
                full = [(q[0].t, n) for n, q in self._queues.items() if len(q) >= self.max_batch]
                if not full:
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), wait)
                    except asyncio.TimeoutError:
                        pass
                    continue
                length = min(full)[1]
            batch = self._take(length)
            if batch:
                return batch

    def _take(self, length: int) -> list[_Item]:
        """Up to ``max_batch`` live rows of one bucket, oldest first; skipped rows are dropped."""
        q, out = self._queues[length], []
        while q and len(out) < self.max_batch:
            item = q.popleft()
            self.queued_rows -= 1
            if item.request.done():
                self._settle(item.request.adapter, 1)
            else:
                out.append(item)
        if not q:
            del self._queues[length]
        return out

    async def _dispatch(self, batch: list[_Item]) -> None:
        rows = [it.row for it in batch]
        start = time.monotonic()
        if self.metrics is not None:
            self.metrics.batch_rows.observe(len(rows))
            self.metrics.batch_adapters.observe(len({r.adapter for r in rows}))
            for it in batch:
                self.metrics.queue_seconds.observe(start - it.t)
        try:
            results = await self._loop.run_in_executor(self._device, self.engine.run, rows)
            if not isinstance(results, list) or len(results) != len(rows):
                got = len(results) if isinstance(results, list) else type(results).__name__
                raise RuntimeError(f"engine.run returned {got} results for {len(rows)} rows")
        except Exception as e:
            log.error("a device call of %d rows (%s) failed", len(rows),
                      ", ".join(sorted({r.adapter for r in rows})), exc_info=True)
            if self.metrics is not None:
                self.metrics.engine_failures.inc()
            error = EngineFailure(f"the engine failed on this request's batch: {type(e).__name__}: {e}")
            for it in batch:
                it.request.fail(error)
        except BaseException:    # the loop is cancelled: these requests are not left waiting
            for it in batch:
                it.request.fail(EngineFailure("the server stopped during this request's batch"))
            raise
        else:
            for it, result in zip(batch, results):
                if not it.request.done():
                    it.request.set(it.index, result)
        finally:
            seconds = time.monotonic() - start
            self._call_seconds = seconds if not self._call_seconds else 0.9 * self._call_seconds + 0.1 * seconds
            if self.metrics is not None:
                self.metrics.engine_seconds.observe(seconds)
            for adapter, n in collections.Counter(r.adapter for r in rows).items():
                self._settle(adapter, n)
