"""Open-loop load for ``jaxpeft-serve``: Poisson arrivals at a fixed rate, spread evenly over K
adapters, fixed-length inputs; throughput, latency percentiles and errors as JSON.

    python benchmarks/load.py --url=http://127.0.0.1:8000 --rate=200 --duration=30 \\
        --num_adapters=8 --words=32 --output=load.json

*Open loop*: each request is sent at its scheduled arrival time whether or not the earlier ones
have been answered (a closed loop -- N clients each waiting for its answer -- slows down with the
server and hides queueing). Inter-arrival times are exponential with mean ``1/rate`` (a seeded
Poisson process); request ``i`` goes to adapter ``i mod K``. The adapters are ``--adapters`` or
the first ``--num_adapters`` the server lists (``GET /v1/adapters``); each request carries
``--inputs_per_request`` inputs of ``--words`` words, shaped for the adapter's task (a text, a
``{"tokens"}`` list, a ``{"question", "context"}`` pair).

The JSON: requests sent, answered 200, errors by status (or exception name), ``throughput``
(answered sequences per second, first send to last answer), latency percentiles in ms of the
answered requests, the achieved arrival rate, ``send_lag_ms`` -- how late the sends left against their
schedule (large when the generator itself cannot keep up: then ``achieved_rate`` is below
``rate`` and the numbers measure the generator, so run it on other cores or another host), and
``not_sent`` -- arrivals skipped because ``--max_in_flight`` requests were already waiting (the
generator's own limit; nonzero means the server fell behind the offered rate).

``--concurrency=N`` runs a *closed* loop instead (:func:`run_closed`): N clients, each sending its
next request as soon as its previous one is answered, for ``--duration`` seconds. That keeps the
server saturated with the generator's own cost proportional to the answers, so its throughput is
the server's capacity -- what to take half of for an open-loop rate.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import sys
import time
from typing import Any, Sequence

import httpx

VOCAB = ("the film was a gripping story of love and loss told with great care though the second half "
         "drags and the music is too loud for its quiet scenes").split()


def make_input(task: str, words: int, rng: random.Random) -> Any:
    text = [rng.choice(VOCAB) for _ in range(words)]
    if task == "token":
        return {"tokens": text}
    if task == "span":
        return {"question": "what is it about", "context": " ".join(text)}
    return " ".join(text)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) by linear interpolation; None for no values.

    >>> percentile([1, 2, 3, 4], 50)
    2.5
    """
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


async def run_load(url: str, *, rate: float, duration: float, adapters: Sequence[str] | None = None,
                   num_adapters: int | None = None, words: int = 16, inputs_per_request: int = 1,
                   max_in_flight: int = 1000, timeout: float = 30.0, seed: int = 0) -> dict[str, Any]:
    """Runs the load for ``duration`` seconds of arrivals, waits for the answers; the summary."""
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=max_in_flight, max_keepalive_connections=max_in_flight)
    async with httpx.AsyncClient(base_url=url.rstrip("/"), timeout=timeout, limits=limits) as client:
        try:
            listed = (await client.get("/v1/adapters")).raise_for_status().json()["adapters"]
        except httpx.HTTPError as e:
            raise SystemExit(f"error: cannot list the adapters at {url}: {e}") from None
        tasks = {a["name"]: a.get("task", "sequence") for a in listed}
        chosen = list(adapters) if adapters else sorted(tasks)[:num_adapters or len(tasks)]
        unknown = [a for a in chosen if a not in tasks]
        if not chosen or unknown:
            raise SystemExit(f"error: adapters {unknown or chosen} are not served at {url} (it has {sorted(tasks)})")
        # the bodies are made before the clock starts: the generator's own cost stays out of it
        bodies = [{"adapter": a, "inputs": [make_input(tasks[a], words, rng) for _ in range(inputs_per_request)]}
                  for a in chosen]
        latencies: list[float] = []
        errors: collections.Counter[str] = collections.Counter()
        in_flight, sent, not_sent, lags = set(), 0, 0, []

        async def one(body):
            t0 = time.perf_counter()
            try:
                r = await client.post("/v1/predict", json=body)
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors[str(r.status_code)] += 1
            except httpx.HTTPError as e:
                errors[type(e).__name__] += 1

        start = time.perf_counter()
        next_at, i = start, 0
        while True:
            next_at += rng.expovariate(rate)
            if next_at - start >= duration:
                break
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            lags.append(time.perf_counter() - next_at)
            if len(in_flight) >= max_in_flight:
                not_sent += 1
            else:
                task = asyncio.ensure_future(one(bodies[i % len(bodies)]))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                sent += 1
            i += 1
        sending = time.perf_counter() - start
        if in_flight:
            await asyncio.gather(*in_flight)
        elapsed = time.perf_counter() - start
    ms, lag_ms = [x * 1000 for x in latencies], [x * 1000 for x in lags]
    return {
        "url": url, "adapters": chosen, "rate": rate, "duration_s": duration, "words": words,
        "inputs_per_request": inputs_per_request, "sent": sent, "not_sent": not_sent, "ok": len(latencies),
        "errors": dict(errors), "achieved_rate": sent / sending if sending else 0.0, "elapsed_s": elapsed,
        "send_lag_ms": {"p50": percentile(lag_ms, 50), "p99": percentile(lag_ms, 99)},
        "throughput": len(latencies) * inputs_per_request / elapsed if elapsed else 0.0,
        "latency_ms": {"p50": percentile(ms, 50), "p90": percentile(ms, 90), "p99": percentile(ms, 99),
                       "max": max(ms) if ms else None, "mean": sum(ms) / len(ms) if ms else None},
    }


async def run_closed(url: str, *, concurrency: int, duration: float, adapters: Sequence[str] | None = None,
                     num_adapters: int | None = None, words: int = 16, inputs_per_request: int = 1,
                     timeout: float = 60.0, seed: int = 0) -> dict[str, Any]:
    """``concurrency`` clients, each sending its next request when the last is answered, for
    ``duration`` seconds (requests in flight then are awaited and counted); the summary."""
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    async with httpx.AsyncClient(base_url=url.rstrip("/"), timeout=timeout, limits=limits) as client:
        listed = (await client.get("/v1/adapters")).raise_for_status().json()["adapters"]
        tasks = {a["name"]: a.get("task", "sequence") for a in listed}
        chosen = list(adapters) if adapters else sorted(tasks)[:num_adapters or len(tasks)]
        unknown = [a for a in chosen if a not in tasks]
        if not chosen or unknown:
            raise SystemExit(f"error: adapters {unknown or chosen} are not served at {url} (it has {sorted(tasks)})")
        bodies = [{"adapter": a, "inputs": [make_input(tasks[a], words, rng) for _ in range(inputs_per_request)]}
                  for a in chosen]
        latencies: list[float] = []
        errors: collections.Counter[str] = collections.Counter()
        counter = iter(range(1 << 62))
        start = time.perf_counter()

        async def client_loop():
            while time.perf_counter() - start < duration:
                body = bodies[next(counter) % len(bodies)]
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/predict", json=body)
                    if r.status_code == 200:
                        latencies.append(time.perf_counter() - t0)
                    else:
                        errors[str(r.status_code)] += 1
                except httpx.HTTPError as e:
                    errors[type(e).__name__] += 1

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    ms = [x * 1000 for x in latencies]
    return {
        "url": url, "adapters": chosen, "concurrency": concurrency, "duration_s": duration, "words": words,
        "inputs_per_request": inputs_per_request, "ok": len(latencies), "errors": dict(errors), "elapsed_s": elapsed,
        "throughput": len(latencies) * inputs_per_request / elapsed if elapsed else 0.0,
        "latency_ms": {"p50": percentile(ms, 50), "p90": percentile(ms, 90), "p99": percentile(ms, 99),
                       "max": max(ms) if ms else None, "mean": sum(ms) / len(ms) if ms else None},
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--rate", type=float, help="requests per second (Poisson); required unless --concurrency")
    p.add_argument("--concurrency", type=int, help="a closed loop of this many clients instead of --rate")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of arrivals")
    p.add_argument("--adapters", help="comma-separated adapter names (default: the first --num_adapters listed)")
    p.add_argument("--num_adapters", type=int, help="K: how many of the served adapters to spread over")
    p.add_argument("--words", type=int, default=16, help="words per input")
    p.add_argument("--inputs_per_request", type=int, default=1)
    p.add_argument("--max_in_flight", type=int, default=1000)
    p.add_argument("--timeout", type=float, default=30.0, help="per-request timeout, seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", help="write the JSON here too")
    args = p.parse_args(argv)
    adapters = args.adapters.split(",") if args.adapters else None
    if args.concurrency is not None:
        if args.concurrency < 1 or args.duration <= 0 or args.words < 1 or args.inputs_per_request < 1:
            p.error("--concurrency, --duration, --words and --inputs_per_request must be positive")
        result = asyncio.run(run_closed(
            args.url, concurrency=args.concurrency, duration=args.duration, adapters=adapters,
            num_adapters=args.num_adapters, words=args.words, inputs_per_request=args.inputs_per_request,
            timeout=args.timeout, seed=args.seed))
        return _write(result, args.output)
    if args.rate is None:
        p.error("give --rate (an open loop) or --concurrency (a closed loop)")
    if args.rate <= 0 or args.duration <= 0 or args.words < 1 or args.inputs_per_request < 1 or args.max_in_flight < 1:
        p.error("--rate, --duration, --words, --inputs_per_request and --max_in_flight must be positive")
    result = asyncio.run(run_load(
        args.url, rate=args.rate, duration=args.duration,
        adapters=adapters, num_adapters=args.num_adapters,
        words=args.words, inputs_per_request=args.inputs_per_request, max_in_flight=args.max_in_flight,
        timeout=args.timeout, seed=args.seed))
    return _write(result, args.output)


def _write(result: dict[str, Any], output: str | None) -> int:
    text = json.dumps(result, indent=2)
    print(text)
    if output:
        with open(output, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
