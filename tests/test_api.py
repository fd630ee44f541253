"""The Python API: train from keyword flags, load an adapter, predict, save -- the same as the CLI."""

import json
import subprocess
import sys

import jaxpeft


def test_train_load_predict_save_as_the_cli_does(glue, tiny_bert_dir, tmp_path):
    run = jaxpeft.train(method="lora", task="sst2", model=str(tiny_bert_dir), data_dir=str(glue),
                        output_dir=str(tmp_path / "run"), max_steps=3, batch_size=8, max_seq_length=32,
                        max_train_examples=64, max_eval_examples=32, progress=False, compilation_cache="off",
                        echo=None)
    assert run.results["steps"] == 3 and run.adapter_dir.is_dir()
    assert json.loads((run.output_dir / "results.json").read_text())["best_dev"] == run.results["best_dev"]
    adapter = jaxpeft.load(run.adapter_dir, compute="exact")
    texts = ["a gripping , funny film", "dull and far too long"]
    preds = adapter.predict(texts)
    assert [p["prediction"] in ("negative", "positive") for p in preds] == [True, True]
    assert abs(sum(preds[0]["scores"].values()) - 1.0) < 1e-5
    # the command line prints the same predictions
    out = subprocess.run([sys.executable, "-m", "jaxpeft.cli.predict", f"--adapter={run.adapter_dir}",
                          "--compute=exact", *[f"--text={t}" for t in texts]], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[0].split("\t") == ["index", "adapter", "prediction", "probabilities"]
    for line, p in zip(out[1:], preds):
        index, _, label, probs = line.split("\t")
        assert label == p["prediction"]
        got = dict(kv.split(":") for kv in probs.split(","))
        assert all(abs(float(got[k]) - v) < 1e-5 for k, v in p["scores"].items())
    # saved again, it predicts the same
    again = jaxpeft.load(adapter.save(tmp_path / "saved"), compute="exact").predict(texts)
    assert [a["scores"] for a in again] == [p["scores"] for p in preds]
