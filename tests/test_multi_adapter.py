"""Several adapters in one batch (jaxpeft.adapters.mixed): for every supported family, mixed
predictions equal each adapter's own predictions on its rows (float32 on the CPU, within 1e-5),
through the library and ``jaxpeft-predict --adapter=NAME=DIR ...``; bad input is one line and exit
status 2 before anything is written; and the mixed forward runs our Pallas kernels (interpreted)."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpeft import cli, masks, methods
from jaxpeft.adapters import folder as adapters, mixed as multi_adapter
from jaxpeft.adapters import predict as prediction
from jaxpeft.data import encoding
from jaxpeft.compute import FAST
from jaxpeft.models.kernels import pallas_common
from jaxpeft.models.loading import init_params
from jaxpeft.tasks.base import softmax

import multi_helpers as mh
from masked_step import SMALL, random_batch
from model_helpers import classifier, mask as full_mask

#: per family: (method, options) of three adapters (two trained methods where the family has two)
FAMILY_ADAPTERS = {
    "bitfit": [("bitfit", {}), ("bitfit", {"bitfit_terms": "query,intermediate"}), ("bitfit", {})],
    "prompt": [("prompt", {"num_virtual_tokens": 4}),
               ("ptuning", {"num_virtual_tokens": 4, "encoder_type": "mlp"}),
               ("prompt", {"num_virtual_tokens": 4})],
    "prefix": [("prefix", {"num_virtual_tokens": 3, "encoder_hidden_size": 16}),
               ("ptuning_v2", {"num_virtual_tokens": 3}),
               ("prefix", {"num_virtual_tokens": 3, "prefix_projection": False})],
    "lora": [("lora", {"lora_r": 4}), ("lora", {"lora_r": 4, "lora_dropout": 0.1}), ("lora", {"lora_r": 4})],
    "bottleneck": [("bottleneck", {"adapter_size": 8}), ("bottleneck", {"adapter_size": 8, "train_layer_norms": False}),
                   ("bottleneck", {"adapter_size": 8})],
}
#: the three adapters' tasks (2, 3 and 1 labels: padded heads, a regression head) and lengths
TASKS, LENGTHS, NAMES = ("sst2", "mnli", "stsb"), (32, 48, 24), ("pos", "nli", "sim")
#: where each adapter's texts come from (no local MNLI copy: RTE's pairs)
TEXTS_FROM = {"sst2": "sst2", "mnli": "rte", "stsb": "stsb"}


@pytest.fixture(scope="module")
def family_adapters(tiny_bert_dir, tmp_path_factory):
    made = {}

    def get(family):
        if family not in made:
            root = tmp_path_factory.mktemp(f"multi-{family}")
            made[family] = [mh.make_adapter(root / name, tiny_bert_dir, m, task, seed=i, max_seq_length=length, **opts)
                            for i, ((m, opts), task, length, name)
                            in enumerate(zip(FAMILY_ADAPTERS[family], TASKS, LENGTHS, NAMES))]
        return made[family]

    return get


def mixed_file(glue, path, counts=(7, 6, 5)):
    """Rows of the three adapters interleaved; returns (file, {adapter k: its texts})."""
    texts = {k: mh.texts_of(glue, TEXTS_FROM[t], n) for k, (t, n) in enumerate(zip(TASKS, counts))}
    rows = [(NAMES[k], texts[k][j]) for j in range(max(counts)) for k in range(3) if j < counts[k]]
    return mh.write_mixed(path, rows), texts


def run_predict(args, capsys):
    from jaxpeft.cli import predict

    rc = cli.guarded(lambda: predict.main(args))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("family", sorted(FAMILY_ADAPTERS))
def test_mixed_predictions_equal_each_adapter_alone(family, family_adapters, glue, tmp_path, capsys):
    dirs = family_adapters(family)
    path, texts = mixed_file(glue, tmp_path / "in.tsv")
    specs = [f"--adapter={n}={d}" for n, d in zip(NAMES, dirs)]
    out = tmp_path / "out.tsv"
    rc, _, err = run_predict([*specs, f"--input={path}", f"--output={out}", "--batch_size=8"], capsys)
    assert rc == 0, err
    lines = [r.split("\t") for r in out.read_text().splitlines()]
    assert lines[0] == ["index", "adapter", "prediction", "probabilities"] and len(lines) == 19
    cli_rows = {k: [r for r in lines[1:] if r[1] == NAMES[k]] for k in range(3)}

    multi = multi_adapter.load(list(zip(NAMES, map(str, dirs))))
    assert multi.mix == family and tuple(t.num_labels for t in multi.tasks) == (2, 3, 1)
    rows = multi_adapter.read_mixed_tsv(path, multi)
    mixed, _ = multi_adapter.row_outputs(multi, rows, batch_size=8)
    preds = multi_adapter.predict_rows(multi, rows, batch_size=8)
    for k in range(3):
        loaded, params, m, task = adapters.load_adapter(dirs[k])
        examples = encoding.Examples(tuple(map(list, zip(*texts[k]))), None, "t")
        alone, enc = prediction.outputs(loaded, params, m, task, examples, max_seq_length=LENGTHS[k], batch_size=4)
        mine = rows.adapter == k
        np.testing.assert_allclose(mixed[mine][:, :task.num_labels], alone, atol=1e-5, rtol=1e-5)
        assert not mixed[mine][:, task.num_labels:].any()             # a narrower head's padding
        own = task.predictions(alone, enc, examples)
        assert len(cli_rows[k]) == len(alone) == len(own)
        if task.is_regression:
            np.testing.assert_allclose([float(r[2]) for r in cli_rows[k]], alone[:, 0], atol=1e-5, rtol=1e-5)
            assert all(r[3] == "" for r in cli_rows[k])
            np.testing.assert_allclose([p["prediction"] for p, a in zip(preds, rows.adapter) if a == k],
                                       alone[:, 0], atol=1e-5, rtol=1e-5)
        else:
            assert [r[2] for r in cli_rows[k]] == [p["prediction"] for p in own]
            assert [p["prediction"] for p, a in zip(preds, rows.adapter) if a == k] == [p["prediction"] for p in own]
            probs = [[float(p.split(":")[1]) for p in r[3].split(",")] for r in cli_rows[k]]
            assert [[p.split(":")[0] for p in r[3].split(",")] for r in cli_rows[k]][0] == list(task.label_names)
            np.testing.assert_allclose(probs, softmax(alone.astype(np.float64)), atol=1e-5)


def test_bad_input_is_one_line_before_anything_is_written(family_adapters, glue, tiny_bert_dir,
                                                          other_tiny_bert_dir, tmp_path, capsys):
    bitfit, prompt = family_adapters("bitfit"), family_adapters("prompt")
    other = mh.make_adapter(tmp_path / "other", other_tiny_bert_dir, "bitfit", "sst2")
    longer = mh.make_adapter(tmp_path / "longer", tiny_bert_dir, "prompt", "sst2", num_virtual_tokens=6)
    path, _ = mixed_file(glue, tmp_path / "in.tsv", (3, 2, 2))
    unknown = tmp_path / "unknown.tsv"
    unknown.write_text(path.read_text().replace("\nnli\t", "\nnlj\t", 1))
    no_column = tmp_path / "no_column.tsv"
    no_column.write_text(path.read_text().replace("adapter\t", "name\t", 1))
    ok = [f"--adapter={n}={d}" for n, d in zip(NAMES, bitfit)]
    cosine = tmp_path / "cosine"
    shutil.copytree(bitfit[1], cosine)
    record = json.loads((cosine / "adapter_config.json").read_text())
    record["jaxpeft"]["pooling"] = "cosine"
    (cosine / "adapter_config.json").write_text(json.dumps(record))
    cases = {
        "unknown name": (ok + [f"--input={unknown}"], "adapter 'nlj' is not one of pos, nli, sim"),
        "other base": ([ok[0], f"--adapter=nli={other}", ok[2], f"--input={path}"],
                       "were trained on different base models"),
        "mixed families": ([ok[0], f"--adapter=nli={prompt[1]}", ok[2], f"--input={path}"],
                           "different method families"),
        "prompt lengths": ([f"--adapter=pos={prompt[0]}", f"--adapter=nli={longer}", f"--input={path}"],
                           "num_virtual_tokens=4 and 6"),
        "duplicate name": ([ok[0], ok[0], f"--input={path}"], "the name 'pos' is given twice"),
        "not NAME=DIR": ([ok[0], f"--adapter={bitfit[1]}", f"--input={path}"], "each is given as --adapter=NAME=DIR"),
        "no adapter column": (ok + [f"--input={no_column}"], "has no 'adapter' column"),
        "texts, not a file": (ok + ["--text=fine"], "give --input=FILE.tsv"),
        "missing adapter": (ok[:2] + [f"--adapter=sim={tmp_path / 'nope'}", f"--input={path}"], "not found"),
        "cosine read-out": ([ok[0], f"--adapter=nli={cosine}", ok[2], f"--input={path}"],
                            "reads the cosine of a pair's two sentences"),
    }
    out = tmp_path / "out.tsv"
    out.write_text("previous\n")
    for name, (args, needle) in cases.items():
        rc, _, err = run_predict([*args, f"--output={out}"], capsys)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (name, err)
        assert out.read_text() == "previous\n", name


@pytest.mark.parametrize("method,options", [("bitfit", {}), ("ptuning_v2", {"num_virtual_tokens": 4}),
                                            ("lora", {"lora_r": 4})])
def test_mixed_forward_runs_the_pallas_kernels(method, options):
    """The GPU fast path (bfloat16, Pallas attention and sublayer kernels) under the row vmap, in
    Pallas's interpreter: each row's logits as the plain fast model's with that row's adapter.
    Per-row biases reach both kernels (BitFit), per-row prefixes the attention kernel (a prompt
    is only a longer input)."""
    m = methods.create(method, options).for_inference()
    cfg = SMALL.replace(num_attention_heads=2)          # head_dim 16: the kernel's smallest
    exact = classifier(cfg, 2, m)
    inits = [masks.flatten(init_params(exact, jax.random.key(k))) for k in range(2)]
    base = init_params(exact, jax.random.key(0))
    owned = masks.trainable_paths(full_mask(m, base))
    # two adapters on one base: their own leaves from two inits, the rest the base's
    per = [masks.unflatten({p: (init[p] if p in owned else v) for p, v in masks.flatten(base).items()}, base)
           for init in inits]
    stacked = multi_adapter.stack_adapters([{p: i[p] for p in owned} for i in inits], masks.flatten(base), owned, 2)
    frozen = masks.unflatten({p: v for p, v in masks.flatten(base).items() if p not in stacked}, base)
    fast = exact.clone(compute=FAST.replace(prng_impl="threefry2x32"))
    t = 16 - m.extra_positions()                         # 16 tokens in all: a length the kernel takes
    batch = random_batch(np.random.default_rng(0), b=4, t=t, vocab=cfg.vocab_size)
    batch = {k: v for k, v in batch.items() if k not in ("labels", "weights")}
    index = np.array([1, 0, 0, 1], np.int32)
    with pallas_common.interpreter():
        mixed = jax.jit(multi_adapter.make_mixed_predict_step(fast))(stacked, frozen,
                                                                      {**batch, "adapter_index": index})
        plain_fn = jax.jit(lambda p, b: fast.apply({"params": p}, **b))
        for k in range(2):
            rows = index == k
            plain = plain_fn(per[k], {n: v[rows] for n, v in batch.items()})
            np.testing.assert_allclose(np.asarray(mixed)[rows], np.asarray(plain), atol=2e-3, rtol=2e-2)
    with_exact = multi_adapter.mixed_outputs(exact, stacked, frozen, {**batch, "adapter_index": jnp.asarray(index)})
    np.testing.assert_allclose(np.asarray(mixed), np.asarray(with_exact), atol=0.1)   # bf16 against float32
