"""The real engine (jaxpeft.serving.jax_engine) through real HTTP on loopback, on the tiny random
BERT: concurrent requests of adapters of several families and all three task kinds get the
answers ``jaxpeft.adapters.predict.predict`` gives for each adapter alone (float32, ``exact``);
adapters are hot-added and removed under load without compiling anything; an adapter of another
base model or a broken folder is refused while the others keep serving; bad inputs get 4xx."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
from pathlib import Path

import httpx
import jax
import numpy as np
import pytest
from serving_helpers import running

from jaxpeft import masks, methods
from jaxpeft.adapters import folder as folders
from jaxpeft.adapters import predict as prediction
from jaxpeft.compute import EXACT
from jaxpeft.data.encoding import Examples
from jaxpeft.models import fingerprint
from jaxpeft.models.bert import FAMILY as BERT
from jaxpeft.models.heads import head_modules
from jaxpeft.models.loading import load_model
from jaxpeft.serving.app import create_app
from jaxpeft.serving.jax_engine import JaxEngine, powers_of_two
from jaxpeft.tasks import conll, glue, squad
from jaxpeft.tasks.qa import ExtractiveQA
from jaxpeft.tasks.tagging import Tagging

TAGS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")
WORDS = ("the film was a gripping story of love and loss told with great care though the second half drags "
         "and the music is too loud for its quiet scenes john lives in paris").split()
LENGTH = 64        # every adapter's max_seq_length
#: name: (method, options, task); the server starts with these
STARTUP = {
    "sst2_lora": ("lora", {"lora_r": 4}, "sst2"),
    "mnli_lora": ("lora", {"lora_r": 4}, "mnli"),         # 3 labels: the group's head is padded
    "sst2_bitfit": ("bitfit", {}, "sst2"),
    "stsb_bitfit": ("bitfit", {}, "stsb"),                # regression
    "ner_lora": ("lora", {"lora_r": 4}, "tagging"),
    "qa_prefix": ("prefix", {"num_virtual_tokens": 3, "prefix_projection": False}, "qa"),
}
#: added while serving (the LoRA group holds 3: the second fits once one is removed)
LATER = {"rte_lora": ("lora", {"lora_r": 4}, "rte"), "cola_lora": ("lora", {"lora_r": 4}, "cola")}


def task_of(name: str):
    if name == "tagging":
        return Tagging("myner", TAGS, "f1", metric="seqeval")
    if name == "qa":
        return ExtractiveQA("myqa", None, "f1", doc_stride=16)
    return glue.task(name)


def make_adapter(directory: Path, model_dir: Path, method: str, task_name: str, seed: int, **options) -> Path:
    """An adapter folder whose trained leaves are the fresh init moved by random noise."""
    m, task = methods.create(method, options), task_of(task_name)
    loaded = load_model(str(model_dir), task.head(), m, seed=seed)
    params = m.init_params(loaded.params, BERT, tokenizer=loaded.tokenizer, rng=jax.random.key(seed))
    flat = masks.flatten(params)
    rng = np.random.default_rng(seed)
    for p in masks.trainable_paths(m.mask(params, BERT, head_modules(BERT, task.head()))):
        x = np.asarray(flat[p])
        flat[p] = x + 0.5 * rng.standard_normal(x.shape).astype(np.float32) * (1.0 if x.std() == 0 else x.std())
    params = masks.unflatten(flat, params)
    fp = fingerprint.fingerprint(loaded.params, str(model_dir), exclude=m.added)
    return folders.save_adapter(directory, params, m, task, family=BERT, model_config=loaded.config,
                                base_model=str(model_dir), fingerprint=fp, max_seq_length=LENGTH)


@pytest.fixture(scope="module")
def dirs(tiny_bert_dir, other_tiny_bert_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("serving-adapters")
    out = {name: make_adapter(root / name, tiny_bert_dir, m, t, seed=i, **o)
           for i, (name, (m, o, t)) in enumerate({**STARTUP, **LATER}.items())}
    out["other_base"] = make_adapter(root / "other_base", other_tiny_bert_dir, "lora", "sst2", seed=9, lora_r=4)
    broken = root / "broken"
    shutil.copytree(out["sst2_bitfit"], broken)
    (broken / "adapter_config.json").write_text("{")
    out["broken"] = broken
    return out


@pytest.fixture(scope="module")
def server(dirs, tiny_bert_dir):
    engine = JaxEngine(str(tiny_bert_dir), compute="exact", max_batch=4, batch_sizes=(2, 4), buckets=(32, 64),
                       max_adapters_per_family=3, max_labels=8)
    for name in STARTUP:
        engine.add(name, str(dirs[name]))
    calls: list[list[str]] = []
    run = engine.run

    def recording(rows):
        calls.append([r.adapter for r in rows])
        return run(rows)

    engine.run = recording
    with running(create_app(engine, max_wait_ms=20)) as url:
        yield engine, url, calls


def text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def inputs_for(name: str, rng: random.Random, n: int) -> list:
    """``n`` inputs of adapter ``name``'s kind, short and long (both buckets; some texts longer
    than the adapter's 64 tokens, which are truncated)."""
    task = STARTUP.get(name, LATER.get(name))[2]
    sizes = [rng.choice([3, 12, 30, 45, 90]) for _ in range(n)]
    if task == "tagging":
        return [{"tokens": text(rng, min(k, 40)).split()} for k in sizes]
    if task == "qa":
        return [{"question": text(rng, 4), "context": text(rng, min(k, 40))} for k in sizes]
    if task in ("mnli", "rte", "stsb"):
        return [[text(rng, k), text(rng, max(1, k // 3))] for k in sizes]
    return [text(rng, k) for k in sizes]


def alone(directory: Path, inputs: list) -> list[dict]:
    """``jaxpeft-predict``'s predictions of one adapter loaded alone."""
    loaded, params, m, task = folders.load_adapter(directory, compute=EXACT)
    if task.kind == "token":
        raw = conll.TaggedSentences([x["tokens"] for x in inputs], None, "t", [0] * len(inputs))
    elif task.kind == "span":
        raw = squad.SquadData([squad.QAExample(str(i), x["question"], x["context"], (), (), 0, "")
                               for i, x in enumerate(inputs)], 1, "t")
    else:
        cols = [[x] for x in inputs] if isinstance(inputs[0], str) else inputs
        raw = Examples(tuple(list(c) for c in zip(*cols)), None, "t")
    return prediction.predict(loaded, params, m, task, raw, max_seq_length=LENGTH, batch_size=8)


def assert_same(served: dict, own: dict, x) -> None:
    """A served answer is jaxpeft-predict's: the same label, tags or span, the same numbers."""
    if "scores" in own:
        assert served["label"] == own["prediction"] and list(served["scores"]) == list(own["scores"])
        np.testing.assert_allclose(list(served["scores"].values()), list(own["scores"].values()), atol=1e-5)
    elif "tags" in own:
        assert [t["token"] for t in served["tags"]] == own["tokens"] == x["tokens"]
        assert [t["label"] for t in served["tags"]] == own["tags"]
        assert all(0 < t["score"] <= 1 for t in served["tags"])
    elif "answer" in own:
        assert served["answer"] == own["answer"]
        np.testing.assert_allclose([served["score"], served["probability"]], [own["score"], own["probability"]],
                                   rtol=1e-5, atol=1e-5)
        if served["start"] is not None:
            assert x["context"][served["start"]:served["end"]] == served["answer"]
    else:
        np.testing.assert_allclose(served["value"], own["prediction"], rtol=1e-5, atol=1e-5)


async def post_all(url: str, bodies: list[dict]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(bodies) + 5)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        return await asyncio.gather(*(client.post("/v1/predict", json=b) for b in bodies))


def test_answers_equal_each_adapter_alone(server, dirs):
    engine, url, calls = server
    rng = random.Random(0)
    asked = {name: inputs_for(name, rng, 6) for name in STARTUP}
    bodies = [{"adapter": name, "inputs": [x]} for k in range(6) for name, xs in asked.items() for x in [xs[k]]]
    bodies.append({"adapter": "sst2_lora", "inputs": asked["sst2_lora"][:3]})       # one request, three rows
    traces = engine.traces
    responses = asyncio.run(post_all(url, bodies))
    assert [r.status_code for r in responses] == [200] * len(bodies), [r.text for r in responses if r.status_code != 200]
    assert engine.traces == traces                      # serving compiles nothing
    served = {name: [] for name in STARTUP}
    for body, r in zip(bodies[:-1], responses[:-1]):
        served[body["adapter"]] += r.json()["outputs"]
    for name, xs in asked.items():
        own = alone(dirs[name], xs)
        assert len(own) == len(served[name]) == len(xs)
        for s, o, x in zip(served[name], own, xs):
            assert_same(s, o, x)
    # the three rows in one request answer as they did one by one (other rows share the batch: bits may differ)
    together = responses[-1].json()["outputs"]
    assert [o["label"] for o in together] == [o["label"] for o in served["sst2_lora"][:3]]
    np.testing.assert_allclose([list(o["scores"].values()) for o in together],
                               [list(o["scores"].values()) for o in served["sst2_lora"][:3]], atol=1e-6)
    # calls mixed adapters of a group; no call held rows of two groups' adapters in one program
    assert any(len(set(c)) > 1 for c in calls)
    listed = {a["name"]: a for a in httpx.get(url + "/v1/adapters").json()["adapters"]}
    assert {a["group"] for a in listed.values()} == {"lora/sequence#0", "bitfit/sequence#1", "lora/token#2",
                                                     "prefix/span#3"}
    assert listed["mnli_lora"]["labels"] == ["entailment", "neutral", "contradiction"]
    assert listed["ner_lora"]["task"] == "token" and listed["qa_prefix"]["task"] == "span"


def test_hot_add_and_remove_under_load_compile_nothing(server, dirs):
    engine, url, _ = server
    traces = engine.traces
    rng = random.Random(1)
    late = {name: inputs_for(name, rng, 3) for name in LATER}

    async def scenario():
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=20)) as client:
            codes: dict[str, list[int]] = {"sst2_bitfit": [], "ner_lora": [], "sst2_lora": []}
            stop = asyncio.Event()

            async def keep_asking(adapter):
                while not stop.is_set():
                    r = await client.post("/v1/predict", json={"adapter": adapter,
                                                               "inputs": inputs_for(adapter, rng, 2)})
                    codes[adapter].append(r.status_code)

            workers = [asyncio.ensure_future(keep_asking(a)) for a in codes for _ in range(2)]
            await asyncio.sleep(0.3)
            add = await client.post("/v1/adapters", json={"name": "rte_lora", "path": str(dirs["rte_lora"])})
            full = await client.post("/v1/adapters", json={"name": "cola_lora", "path": str(dirs["cola_lora"])})
            first = await client.post("/v1/predict", json={"adapter": "rte_lora", "inputs": late["rte_lora"]})
            removed = await client.delete("/v1/adapters/mnli_lora")
            gone = await client.post("/v1/predict", json={"adapter": "mnli_lora", "inputs": ["x"]})
            again = await client.post("/v1/adapters", json={"name": "cola_lora", "path": str(dirs["cola_lora"])})
            second = await client.post("/v1/predict", json={"adapter": "cola_lora", "inputs": late["cola_lora"]})
            await asyncio.sleep(0.3)
            stop.set()
            await asyncio.gather(*workers)
            return codes, add, full, first, removed, gone, again, second

    codes, add, full, first, removed, gone, again, second = asyncio.run(scenario())
    assert add.status_code == 201 and add.json()["adapter"]["group"] == "lora/sequence#0", add.text
    assert full.status_code == 409 and "at capacity" in full.json()["error"]
    assert removed.status_code == 200 and gone.status_code == 404
    assert again.status_code == 201 and again.json()["adapter"]["slot"] == 1, again.text   # mnli_lora's slot
    for adapter, got in codes.items():
        assert len(got) >= 2 and set(got) == {200}, (adapter, got)
    assert engine.traces == traces                       # neither adding nor removing compiled
    for name, r in (("rte_lora", first), ("cola_lora", second)):
        assert r.status_code == 200, r.text
        for s, o, x in zip(r.json()["outputs"], alone(dirs[name], late[name]), late[name]):
            assert_same(s, o, x)


def test_other_base_and_broken_folders_are_refused_and_the_others_keep_serving(server, dirs):
    engine, url, _ = server
    with httpx.Client(base_url=url, timeout=60) as client:
        for name, words in (("other_base", "was trained on base model"), ("broken", "not valid JSON")):
            r = client.post("/v1/adapters", json={"name": name, "path": str(dirs[name])})
            assert r.status_code == 400 and words in r.json()["error"] and "\n" not in r.json()["error"], r.text
        r = client.post("/v1/predict", json={"adapter": "sst2_bitfit", "inputs": ["still here"]})
        assert r.status_code == 200 and r.json()["outputs"][0]["label"] in ("negative", "positive")
    assert "other_base" not in {a["name"] for a in engine.adapters()}


def test_jaxpeft_serve_refuses_an_adapter_of_another_base_at_start(dirs, tiny_bert_dir, capsys):
    from jaxpeft.serving import cli

    assert cli.load_factory(cli.DEFAULT_ENGINE).__module__ == "jaxpeft.serving.jax_engine"
    code = cli.main(["--port=0", f"--model={tiny_bert_dir}", "--compute=exact", f"--adapter=x={dirs['other_base']}",
                     f"--adapter=sst2_bitfit={dirs['sst2_bitfit']}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: adapter x was trained on base model"), err


def test_bad_inputs(server):
    _, url, _ = server
    long_words = ["word"] * 80
    cases = [
        ({"adapter": "ner_lora", "inputs": [{"tokens": long_words}]}, 413, "not truncated"),
        ({"adapter": "qa_prefix", "inputs": [{"question": "q", "context": " ".join(long_words)}]}, 413, "not truncated"),
        ({"adapter": "sst2_lora", "inputs": [["a", "pair"]]}, 400, "classifies one text"),
        ({"adapter": "stsb_bitfit", "inputs": ["one text"]}, 400, "[text, text] pair"),
        ({"adapter": "ner_lora", "inputs": ["a text"]}, 400, "tokens"),
        ({"adapter": "qa_prefix", "inputs": [{"question": "q", "context": ""}]}, 400, "must not be empty"),
        ({"adapter": "nope", "inputs": ["x"]}, 404, "no adapter named nope"),
    ]
    with httpx.Client(base_url=url, timeout=60) as client:
        for body, status, words in cases:
            r = client.post("/v1/predict", json=body)
            assert r.status_code == status and words in r.json()["error"], (body, r.text)


def test_batch_sizes():
    assert powers_of_two(16) == (1, 2, 4, 8, 16) and powers_of_two(1) == (1,)
    with pytest.raises(Exception, match="the largest = max_batch"):
        JaxEngine(max_batch=8, batch_sizes=(2, 4))
    assert json.dumps(powers_of_two(3)) == "[1, 2, 3]"
