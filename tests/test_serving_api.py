"""The server's HTTP API through real HTTP on loopback against the fake engine: bad input, hot
add and remove while serving, back-pressure, and the Prometheus metrics."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serving_helpers import load_all, make_adapters, running

from jaxpeft.serving.app import create_app
from jaxpeft.serving.fake import FakeEngine, write_adapter

LONG = " ".join(["word"] * 200)   # 202 tokens: longer than the fake's longest bucket (128)


def assert_error(r: httpx.Response, status: int, *words: str) -> None:
    """An error answer: the status, one line of JSON holding only "error"."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"] == "application/json"
    assert r.text.endswith("\n") and r.text.count("\n") == 1
    assert list(r.json()) == ["error"] and isinstance(r.json()["error"], str)
    for w in words:
        assert w in r.json()["error"], r.json()["error"]


@pytest.fixture
def served(tmp_path):
    engine = load_all(FakeEngine(max_batch=8, max_chars=2000), make_adapters(tmp_path / "adapters"))
    with running(create_app(engine, max_wait_ms=2, max_inputs_per_request=5, max_body_bytes=10_000)) as url:
        with httpx.Client(base_url=url, timeout=5) as client:
            yield engine, client


BAD = [   # (body, status, words in the error)
    (b"{not json", 400, "malformed JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (b'{"inputs": ["x"]}', 400, 'missing field "adapter"'),
    (b'{"adapter": "sst2"}', 400, 'missing field "inputs"'),
    (b'{"adapter": 3, "inputs": ["x"]}', 400, '"adapter" must be'),
    (b'{"adapter": "sst2", "inputs": "x"}', 400, '"inputs" must be'),
    (b'{"adapter": "sst2", "inputs": []}', 400, '"inputs" must be'),
    (b'{"adapter": "nope", "inputs": ["x"]}', 404, "no adapter named nope"),
    (b'{"adapter": "sst2", "inputs": ["a", "b", "c", "d", "e", "f"]}', 413, "6 inputs", "at most 5"),
    (json.dumps({"adapter": "sst2", "inputs": ["x" * 2001]}).encode(), 413, "inputs[0]", "2001 characters"),
    (json.dumps({"adapter": "ner", "inputs": [{"tokens": LONG.split()}]}).encode(), 413, "not truncated"),
    (json.dumps({"adapter": "squad", "inputs": [{"question": "q", "context": LONG}]}).encode(), 413, "tokens"),
    (b'{"adapter": "sst2", "inputs": [{"tokens": ["a"]}]}', 400, "inputs[0]", "a text or a [text, text] pair"),
    (b'{"adapter": "sst2", "inputs": ["ok", ["a", "b", "c"]]}', 400, "inputs[1]"),
    (b'{"adapter": "ner", "inputs": ["a text"]}', 400, "tokens"),
    (b'{"adapter": "squad", "inputs": [{"question": "q"}]}', 400, "context"),
    (json.dumps({"adapter": "sst2", "inputs": ["x" * 20_000]}).encode(), 413, "10000"),
]


def test_bad_input_gets_one_error_line_and_the_server_keeps_serving(served):
    engine, client = served
    for body, status, *words in BAD:
        assert_error(client.post("/v1/predict", content=body), status, *words)
    chunked = iter([b'{"adapter": "sst2", "inputs": ["' + b"x" * 6000, b"x" * 6000 + b'"]}'])   # no length given
    assert_error(client.post("/v1/predict", content=chunked), 413, "over 10000 bytes")
    assert_error(client.get("/v1/nothing"), 404, "no route GET /v1/nothing")
    assert_error(client.get("/v1/predict"), 405)
    assert_error(client.delete("/v1/adapters/nope"), 404, "no adapter named nope")
    assert engine.calls == []                      # nothing bad reached the device
    r = client.post("/v1/predict", json={"adapter": "sst2", "inputs": ["a long trunc " + LONG, ["a", LONG]]})
    assert r.status_code == 200 and len(r.json()["outputs"]) == 2   # over-long texts truncated
    assert engine.calls == [[("sst2", 128)] * 2]


def test_adapter_admin_errors(served, tmp_path):
    engine, client = served
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "fake_adapter.json").write_text("{")
    other = write_adapter(tmp_path / "other", base="another-base")
    cases = [
        ({"name": "x", "path": str(tmp_path / "missing")}, 400, "holds no fake_adapter.json"),
        ({"name": "x", "path": str(broken)}, 400, "is broken"),
        ({"name": "x", "path": str(other)}, 400, "another-base"),
        ({"name": "sst2", "path": str(other)}, 409, "already loaded"),
        ({"name": "bad name", "path": str(other)}, 400, "adapter name"),
        ({"name": "x"}, 400, 'missing field "path"'),
    ]
    for body, status, words in cases:
        assert_error(client.post("/v1/adapters", json=body), status, words)
    # a family at capacity
    engine.max_adapters_per_family = len(engine.adapters()) - 1     # the fixtures: 7 bitfit, 1 prefix
    assert_error(client.post("/v1/adapters", json={"name": "x", "path": str(tmp_path / "adapters/sst2")}),
                 409, "family is full")
    assert {a["name"] for a in client.get("/v1/adapters").json()["adapters"]} == {
        "sst2", "cola", "mnli", "mrpc", "rte", "stsb", "ner", "squad"}
    assert client.post("/v1/predict", json={"adapter": "cola", "inputs": ["still"]}).status_code == 200


def test_hot_add_and_remove_while_serving(tmp_path):
    engine = load_all(FakeEngine(max_batch=4, delay=0.005), make_adapters(tmp_path / "adapters"))
    new = write_adapter(tmp_path / "new", labels=("no", "yes"))

    async def scenario(url):
        async with httpx.AsyncClient(base_url=url, timeout=5) as client:
            results: dict[str, list[int]] = {"sst2": [], "cola": [], "mrpc": []}
            stop = asyncio.Event()

            async def keep_asking(adapter):
                while not stop.is_set():
                    r = await client.post("/v1/predict", json={"adapter": adapter, "inputs": ["go on", "and on"]})
                    results[adapter].append(r.status_code)

            workers = [asyncio.ensure_future(keep_asking(a)) for a in results for _ in range(3)]
            await asyncio.sleep(0.2)
            r = await client.post("/v1/adapters", json={"name": "new", "path": str(new)})
            assert r.status_code == 201 and r.json()["adapter"]["labels"] == ["no", "yes"]
            r = await client.post("/v1/predict", json={"adapter": "new", "inputs": ["hello"]})
            assert r.status_code == 200 and r.json()["outputs"][0]["label"] in ("no", "yes")
            await asyncio.sleep(0.2)
            r = await client.delete("/v1/adapters/mrpc")          # while mrpc's requests are queued
            assert r.status_code == 200 and r.json() == {"removed": "mrpc"}
            n = len(results["mrpc"])
            await asyncio.sleep(0.2)
            stop.set()
            await asyncio.gather(*workers)
            listed = (await client.get("/v1/adapters")).json()["adapters"]
            return results, n, {a["name"] for a in listed}

    with running(create_app(engine, max_wait_ms=5)) as url:
        t0 = time.monotonic()
        results, n, names = asyncio.run(scenario(url))
        assert time.monotonic() - t0 < 5
    assert "new" in names and "mrpc" not in names
    for adapter in ("sst2", "cola"):                       # the others kept answering
        assert len(results[adapter]) > 10 and set(results[adapter]) == {200}
    # mrpc: answered until its removal, then 404 -- never a failure (a worker may still be
    # reading a 200 accepted before the removal when the removal's own answer arrives)
    head, tail = results["mrpc"][:n], results["mrpc"][n:]
    assert head[0] == 200 and set(head) <= {200, 404}
    assert set(tail) <= {200, 404} and tail.count(200) <= 3 and tail.count(404) >= 3 and tail[-1] == 404
    assert all("mrpc" not in {a for a, _ in call} for call in engine.calls[-3:])


def test_back_pressure_answers_503_with_retry_after(tmp_path):
    engine = load_all(FakeEngine(max_batch=2, delay=0.1), make_adapters(tmp_path))

    async def scenario(url):
        async with httpx.AsyncClient(base_url=url, timeout=10, limits=httpx.Limits(max_connections=50)) as client:
            return await asyncio.gather(*(client.post("/v1/predict", json={"adapter": "sst2", "inputs": [f"r{i}"]})
                                          for i in range(30)))

    with running(create_app(engine, max_wait_ms=0, max_queue_rows=4, max_inputs_per_request=4)) as url:
        t0 = time.monotonic()
        responses = asyncio.run(scenario(url))
        assert time.monotonic() - t0 < 5
        with httpx.Client(base_url=url, timeout=5) as client:
            families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    codes = [r.status_code for r in responses]
    assert len(codes) == 30 and set(codes) == {200, 503}      # every request answered
    for r in responses:
        if r.status_code == 503:
            assert_error(r, 503, "queue is full")
            assert int(r.headers["retry-after"]) >= 1
    counts = {(s.labels["status"]): s.value for s in families["jaxpeft_serve_requests"].samples
              if s.name.endswith("_total")}
    assert counts == {"200": codes.count(200), "503": codes.count(503)}


def test_metrics_count_what_happened(served):
    engine, client = served
    for i in range(3):
        assert client.post("/v1/predict", json={"adapter": "sst2", "inputs": [f"text {i}", "more"]}).status_code == 200
    assert client.post("/v1/predict", json={"adapter": "ner", "inputs": [{"tokens": ["a", "b"]}]}).status_code == 200
    assert client.post("/v1/predict", json={"adapter": "nope", "inputs": ["x"]}).status_code == 404
    assert client.post("/v1/predict", content=b"{").status_code == 400
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}

    def value(family, sample, **labels):
        return next(s.value for s in families[family].samples
                    if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))

    p = "jaxpeft_serve_"
    assert value(p + "requests", p + "requests_total", adapter="sst2", status="200") == 3
    assert value(p + "requests", p + "requests_total", adapter="ner", status="200") == 1
    assert value(p + "requests", p + "requests_total", adapter="", status="404") == 1
    assert value(p + "requests", p + "requests_total", adapter="", status="400") == 1
    assert value(p + "request_seconds", p + "request_seconds_count") == 6
    assert value(p + "batch_rows", p + "batch_rows_count") == len(engine.calls)
    assert value(p + "batch_rows", p + "batch_rows_sum") == 7
    assert value(p + "batch_rows", p + "batch_rows_bucket", le="+Inf") == len(engine.calls)
    assert value(p + "queue_seconds", p + "queue_seconds_count") == 7
    assert value(p + "engine_seconds", p + "engine_seconds_count") == len(engine.calls)
    assert value(p + "adapters_loaded", p + "adapters_loaded") == 8
    assert value(p + "queue_rows", p + "queue_rows") == 0
    assert value(p + "requests_in_progress", p + "requests_in_progress") == 0
    health = client.get("/health")
    assert health.status_code == 200 and health.json() == {"status": "ok", "adapters": 8, "queue_rows": 0}
