"""The server's dynamic batching, through real HTTP on loopback against the fake engine: answers
equal the engine's own on the same rows, calls mix adapters and stay within max_batch, the wait
bound, oldest-first order, and a failed call failing only its own requests."""

from __future__ import annotations

import asyncio
import random
import time

import httpx
from serving_helpers import SEQUENCE, load_all, make_adapters, running

from jaxpeft.serving.app import create_app
from jaxpeft.serving.fake import FakeEngine

WORDS = "the a film plot actor scene gripping dull long short story music bright dark".split()


def random_input(rng: random.Random, adapter: str):
    """An input of the adapter's kind, of a random length (so several buckets are used)."""
    def text(n):
        return " ".join(rng.choice(WORDS) for _ in range(n))
    n = rng.choice([3, 8, 20, 40])
    if adapter == "ner":
        return {"tokens": text(n).split()}
    if adapter == "squad":
        return {"question": text(3), "context": text(n)}
    return [text(n), text(n // 2)] if rng.random() < 0.3 else text(n)


async def post_all(url: str, bodies: list[dict], timeout: float = 10.0) -> list[httpx.Response]:
    """All bodies to /v1/predict at once, one client each in effect (no connection limit)."""
    limits = httpx.Limits(max_connections=len(bodies) + 5, max_keepalive_connections=len(bodies) + 5)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        return await asyncio.gather(*(client.post("/v1/predict", json=b) for b in bodies))


def test_concurrent_requests_of_many_adapters(tmp_path):
    root = make_adapters(tmp_path)
    engine = load_all(FakeEngine(max_batch=8), root)
    reference = load_all(FakeEngine(), root)     # computes the expected answers, a row at a time
    rng = random.Random(0)
    names = [*SEQUENCE, "ner", "squad"]
    bodies = []
    for i in range(50):        # 50 concurrent clients, and one request of 30 inputs
        adapter = names[i % len(names)]
        bodies.append({"adapter": adapter, "inputs": [random_input(rng, adapter) for _ in range(rng.randint(1, 4))]})
    bodies.append({"adapter": "sst2", "inputs": [random_input(rng, "sst2") for _ in range(30)]})   # > max_batch
    with running(create_app(engine, max_wait_ms=20)) as url:
        t0 = time.monotonic()
        responses = asyncio.run(post_all(url, bodies))
        assert time.monotonic() - t0 < 5
    for body, r in zip(bodies, responses):
        assert r.status_code == 200, r.text
        expected = [reference.run([row])[0] for row in reference.prepare(body["adapter"], body["inputs"])]
        assert r.json() == {"adapter": body["adapter"], "outputs": expected}
    rows = sum(len(b["inputs"]) for b in bodies)
    assert sum(map(len, engine.calls)) == rows                  # every row computed once
    assert all(1 <= len(call) <= 8 for call in engine.calls)    # never more than max_batch
    assert all(len({n for _, n in call}) == 1 for call in engine.calls)   # one length bucket a call
    assert max(len({a for a, _ in call}) for call in engine.calls) > 1    # calls mix adapters
    assert len(engine.calls) < rows / 2                         # batched, not one row per call


def test_a_lone_request_waits_at_most_max_wait(tmp_path):
    engine = load_all(FakeEngine(max_batch=8), make_adapters(tmp_path))
    with running(create_app(engine, max_wait_ms=50)) as url, httpx.Client(base_url=url, timeout=5) as client:
        client.get("/health")     # the connection is open before timing
        times = []
        for _ in range(3):
            t0 = time.monotonic()
            r = client.post("/v1/predict", json={"adapter": "sst2", "inputs": ["a gripping film"]})
            times.append(time.monotonic() - t0)
            assert r.status_code == 200
        # waited for company up to the deadline, and not much longer (the fake's call is ~0 s)
        assert 0.045 <= sorted(times)[1] < 0.05 + 0.15, times
        # a request that fills a call by itself goes at once, long before a 2 s deadline
        engine2 = load_all(FakeEngine(max_batch=4), make_adapters(tmp_path / "b"))
    with running(create_app(engine2, max_wait_ms=2000)) as url, httpx.Client(base_url=url, timeout=5) as client:
        client.get("/health")
        t0 = time.monotonic()
        r = client.post("/v1/predict", json={"adapter": "cola", "inputs": ["one", "two", "three", "four"]})
        assert r.status_code == 200 and time.monotonic() - t0 < 0.5
        assert engine2.calls == [[("cola", 16)] * 4]


def test_oldest_row_goes_first(tmp_path):
    """While the device is busy, an old lone row of one bucket is taken before a newer full call
    of another bucket."""
    engine = load_all(FakeEngine(max_batch=2, delay=0.3), make_adapters(tmp_path))
    long_text = " ".join(["word"] * 20)      # bucket 32; short texts are bucket 16

    async def scenario(url):
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            def post(adapter, inputs):
                return client.post("/v1/predict", json={"adapter": adapter, "inputs": inputs})

            first = asyncio.ensure_future(post("sst2", ["busy", "device"]))   # occupies the device
            await asyncio.sleep(0.1)
            old = asyncio.ensure_future(post("cola", ["old"]))
            await asyncio.sleep(0.05)
            full = asyncio.ensure_future(post("mrpc", [long_text, long_text]))
            return await asyncio.gather(first, old, full)

    with running(create_app(engine, max_wait_ms=0)) as url:
        responses = asyncio.run(scenario(url))
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert engine.calls == [[("sst2", 16)] * 2, [("cola", 16)], [("mrpc", 32)] * 2]


def test_an_engine_failure_fails_only_its_batch(tmp_path):
    engine = load_all(FakeEngine(max_batch=4), make_adapters(tmp_path))
    with running(create_app(engine, max_wait_ms=5)) as url:
        with httpx.Client(base_url=url, timeout=5) as client:
            engine.fail_next()
            r = client.post("/v1/predict", json={"adapter": "sst2", "inputs": ["fails"]})
            assert r.status_code == 500 and "the fake device failed" in r.json()["error"]
            assert list(r.json()) == ["error"] and r.text.count("\n") == 1
            r = client.post("/v1/predict", json={"adapter": "sst2", "inputs": ["works"]})
            assert r.status_code == 200

        # a poisoned adapter among many concurrent requests: exactly the requests whose rows
        # shared a call with its rows fail; the others are answered
        engine.add("poison", str(tmp_path / "sst2"))
        engine.fail_adapter = "poison"
        engine.batches.clear()
        names = ["sst2", "cola", "mrpc", "poison"]
        bodies = [{"adapter": names[i % 4], "inputs": [f"request {i} text {j}" for j in range(1 + i % 3)]}
                  for i in range(40)]
        responses = asyncio.run(post_all(url, bodies))
        failed_texts = {r.data[1][0] for b in engine.batches if any(x.adapter == "poison" for x in b) for r in b}
        for body, r in zip(bodies, responses):
            shared = any(t in failed_texts for t in body["inputs"])
            assert r.status_code == (500 if shared else 200), (body, r.text)
        assert sum(r.status_code == 200 for r in responses) > 0
        # and the loop goes on
        with httpx.Client(base_url=url, timeout=5) as client:
            assert client.post("/v1/predict", json={"adapter": "cola", "inputs": ["after"]}).status_code == 200
