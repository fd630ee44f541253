"""The server's Prometheus metrics, in a registry of their own (one per app, so that several
apps in one process -- the tests -- keep separate counts).

======================================  =========  ==============================================
metric                                  type       what
======================================  =========  ==============================================
``jaxpeft_serve_requests_total``        counter    predict requests answered, by ``adapter`` and
                                                   ``status`` (HTTP code); ``adapter`` is empty
                                                   where the request named no loaded adapter
``jaxpeft_serve_request_seconds``       histogram  a predict request's latency, arrival to answer
``jaxpeft_serve_queue_seconds``         histogram  a row's wait in the queue, until its device call
``jaxpeft_serve_batch_rows``            histogram  rows per device call
``jaxpeft_serve_batch_adapters``        histogram  distinct adapters per device call
``jaxpeft_serve_engine_seconds``        histogram  the duration of a device call
``jaxpeft_serve_engine_failures_total`` counter    device calls that raised
``jaxpeft_serve_adapters_loaded``       gauge      adapters loaded
``jaxpeft_serve_queue_rows``            gauge      rows waiting for a device call
``jaxpeft_serve_requests_in_progress``  gauge      predict requests accepted and not yet answered
======================================  =========  ==============================================
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "jaxpeft_serve_"
#: seconds: from a millisecond to ten seconds
TIME_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


def count_buckets(top: int) -> tuple[float, ...]:
    """Histogram bounds for counts 1..top: powers of two, and top itself.

    >>> count_buckets(12)
    (1, 2, 4, 8, 12)
    """
    out, b = [], 1
    while b < top:
        out.append(b)
        b *= 2
    return tuple(out + [top])


class Metrics:
    """The metrics of one app; :meth:`render` is the ``/metrics`` body."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, *, max_batch: int, queue_rows: Callable[[], float]):
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(PREFIX + "requests", "Predict requests answered, by adapter and HTTP status",
                                ["adapter", "status"], registry=r)
        self.request_seconds = Histogram(PREFIX + "request_seconds", "Predict request latency, arrival to answer",
                                         buckets=TIME_BUCKETS, registry=r)
        self.queue_seconds = Histogram(PREFIX + "queue_seconds", "A row's wait in the queue until its device call",
                                       buckets=TIME_BUCKETS, registry=r)
        self.batch_rows = Histogram(PREFIX + "batch_rows", "Rows per device call",
                                    buckets=count_buckets(max_batch), registry=r)
        self.batch_adapters = Histogram(PREFIX + "batch_adapters", "Distinct adapters per device call",
                                        buckets=count_buckets(max_batch), registry=r)
        self.engine_seconds = Histogram(PREFIX + "engine_seconds", "Duration of a device call",
                                        buckets=TIME_BUCKETS, registry=r)
        self.engine_failures = Counter(PREFIX + "engine_failures", "Device calls that raised", registry=r)
        self.adapters_loaded = Gauge(PREFIX + "adapters_loaded", "Adapters loaded", registry=r)
        self.queue_rows = Gauge(PREFIX + "queue_rows", "Rows waiting for a device call", registry=r)
        self.queue_rows.set_function(queue_rows)
        self.in_progress = Gauge(PREFIX + "requests_in_progress", "Predict requests accepted, not yet answered",
                                 registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
