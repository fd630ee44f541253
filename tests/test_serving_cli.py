"""``jaxpeft-serve`` as a command: bad flags, the SIGTERM drain of a real server process, and the
open-loop load generator (benchmarks/load.py) against a fake server."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serving_helpers import load_all, make_adapters, running

from jaxpeft.serving import cli
from jaxpeft.serving.app import create_app
from jaxpeft.serving.fake import FakeEngine, write_adapter

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}


@pytest.mark.parametrize("flags, words", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--port=x"], "invalid int value"),
    (["--port=70000"], "--port=70000"),
    (["--compute=fastest"], "invalid choice"),
    (["--adapter=nodir"], "--adapter=nodir: give it as NAME=DIR"),
    (["--adapter=a=x", "--adapter=a=y"], "given twice"),
    (["--adapter=bad name=x"], "adapter name 'bad name'"),
    (["--adapters_dir=/no/such/folder"], "not a folder"),
    ([], "nothing to serve: give --model"),
    (["--buckets=16,x"], "positive integers"),
    (["--engine=jaxpeft.serving.fake:factory", "--max_labels=4"], "the engine does not take --max_labels"),
    (["--engine=no_such_module:factory"], "cannot import no_such_module"),
    (["--engine=jaxpeft.serving.fake"], "MODULE:CALLABLE"),
    (["--engine=jaxpeft.serving.fake:nothing"], "has no nothing"),
    (["--max_batch=0"], "--max_batch=0"),
    (["--max_wait_ms=-1"], "--max_wait_ms=-1.0"),
    (["--max_queue_rows=8", "--max_inputs_per_request=9"], "could never be queued"),
])
def test_bad_flags(flags, words, capsys):
    assert cli.main(["--port=0", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and words in err, err


def test_bad_adapters_and_engines(tmp_path, capsys):
    other = write_adapter(tmp_path / "other", base="another-base")
    broken = tmp_path / "broken"
    broken.mkdir()
    for flags, words in [
        ([f"--adapter=x={other}"], "another-base"),
        ([f"--adapter=x={broken}"], "holds no fake_adapter.json"),
        ([f"--adapters_dir={tmp_path}"], "holds no fake_adapter.json"),
        (["--max_batch=9"], "at most 8"),
    ]:
        fixed = lambda **_: FakeEngine(max_batch=8)   # noqa: E731  (takes no --max_batch)
        assert cli.main(["--port=0", *flags], engine_factory=fixed) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err, err
    assert cli.main(["--port=0"], engine_factory=lambda **_: object()) == 2
    assert "not an engine" in capsys.readouterr().err


def test_bad_flags_as_a_process():
    p = subprocess.run([sys.executable, "-m", "jaxpeft.serving", "--bogus"], env=env(), capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.startswith("error: unrecognized arguments") and not p.stdout


def start_server(args: list[str], timeout: float = 30.0) -> tuple[subprocess.Popen, str]:
    """``python -m jaxpeft.serving ARGS --port=0``; returns the process and its URL."""
    proc = subprocess.Popen([sys.executable, "-m", "jaxpeft.serving", "--port=0", "--log_level=warning", *args],
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stderr], daemon=True).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.1)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        m = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
        if m:
            return proc, m.group(1)
    proc.kill()
    raise RuntimeError("the server did not start")


def in_progress(client: httpx.Client) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        if family.name == "jaxpeft_serve_requests_in_progress":
            return family.samples[0].value
    raise AssertionError("no requests_in_progress gauge")


def test_sigterm_drains_and_exits_0(tmp_path):
    """Accepted requests are all answered after SIGTERM, the process exits 0."""
    root = make_adapters(tmp_path)
    proc, url = start_server(["--engine=serving_helpers:slow_engine", f"--adapters_dir={root}", "--max_wait_ms=0"])
    try:
        n = 12                     # 12 rows, 2 a call, 0.1 s a call: 0.6 s of device work

        async def scenario():
            async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                bodies = [{"adapter": "sst2", "inputs": [f"r{i}"]} for i in range(n)]
                sends = [asyncio.ensure_future(client.post("/v1/predict", json=b)) for b in bodies]
                with httpx.Client(base_url=url, timeout=5) as probe:
                    deadline = time.monotonic() + 5
                    while in_progress(probe) < n:      # all accepted: queued or in the device
                        assert time.monotonic() < deadline, "the requests were not all accepted"
                        await asyncio.sleep(0.01)
                proc.send_signal(signal.SIGTERM)
                t_term = time.monotonic()
                responses = await asyncio.gather(*sends)
                assert time.monotonic() - t_term > 0.2     # most of the work was still queued at the signal
                return responses, t_term

        responses, t_term = asyncio.run(scenario())
        assert [r.status_code for r in responses] == [200] * n
        # new requests are refused: 503 while the port is still open, then no connection
        try:
            r = httpx.post(url + "/v1/predict", json={"adapter": "sst2", "inputs": ["late"]}, timeout=5)
            assert r.status_code == 503 and "shutting down" in r.json()["error"]
        except httpx.TransportError:
            pass
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - t_term < 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_load_generator_against_the_fake_server(tmp_path):
    engine = load_all(FakeEngine(max_batch=8), make_adapters(tmp_path / "adapters"))
    out = tmp_path / "load.json"
    with running(create_app(engine, max_wait_ms=5)) as url:
        p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "load.py"), f"--url={url}", "--rate=100",
                            "--duration=1", "--num_adapters=4", "--words=12", "--inputs_per_request=2",
                            f"--output={out}"], env=env(), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    result = json.loads(out.read_text())
    assert result == json.loads(p.stdout)
    assert result["errors"] == {} and result["not_sent"] == 0 and result["ok"] == result["sent"]
    assert 50 <= result["sent"] <= 160                      # ~100 Poisson arrivals in a second
    assert result["adapters"] == ["cola", "mnli", "mrpc", "ner"]
    assert result["throughput"] > 0 and 0 < result["latency_ms"]["p50"] <= result["latency_ms"]["p99"]
    rows = collections.Counter(adapter for call in engine.calls for adapter, _ in call)
    assert set(rows) == {"cola", "mnli", "mrpc", "ner"}      # spread evenly over the K adapters
    assert max(rows.values()) - min(rows.values()) <= 2 * 2

