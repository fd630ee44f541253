"""Shared pieces of the serving tests: a uvicorn server on a free loopback port in a thread, fake
adapter folders, and engine factories for the subprocess tests (``--engine=serving_helpers:...``,
with ``tests/`` on ``PYTHONPATH``)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import uvicorn

from jaxpeft.serving.fake import FakeEngine, write_adapter

#: sequence adapters of the fixtures, with their label names
SEQUENCE = {"sst2": ("negative", "positive"), "cola": ("unacceptable", "acceptable"),
            "mnli": ("entailment", "neutral", "contradiction"), "mrpc": ("different", "same"),
            "rte": ("entailment", "not_entailment"), "stsb": ("score",)}
TAGS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")


def make_adapters(root: Path) -> Path:
    """Six sequence adapters, a tagger (``ner``) and a QA adapter (``squad``) under ``root``."""
    for name, labels in SEQUENCE.items():
        write_adapter(root / name, labels=labels)
    write_adapter(root / "ner", task="token", labels=TAGS)
    write_adapter(root / "squad", task="span", labels=("answer",), method="prefix")
    return root


def load_all(engine: FakeEngine, root: Path) -> FakeEngine:
    for d in sorted(root.iterdir()):
        engine.add(d.name, str(d))
    return engine


@contextlib.contextmanager
def running(app, timeout: float = 10.0) -> Iterator[str]:
    """Serves ``app`` with uvicorn in a thread on a free 127.0.0.1 port; yields its base URL and
    stops it (graceful shutdown, lifespan included) on exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        assert not thread.is_alive(), "the test server did not stop"


def slow_engine(**options) -> FakeEngine:
    """A fake whose device call takes 0.1 s, 2 rows at most (for the drain test)."""
    return FakeEngine(delay=0.1, max_batch=2, base=options.get("model") or "fake-base")
