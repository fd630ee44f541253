"""The PyTorch peer of the accuracy comparison (benchmarks/peft_job.py): it trains what our config
trains, and the study driver runs it at each group's chosen learning rate."""

from pathlib import Path

import pytest

from benchmarks.peft_job import build, parser, peer_args
from jaxpeft import config
from jaxpeft.training import trainer

REPO = Path(__file__).resolve().parent.parent


def peer_namespace(flags: list[str]):
    """peft_job.py's parsed arguments for ``flags`` (its own parser, defaults included)."""
    return parser().parse_args([*flags, "--data_dir=unused"])


@pytest.mark.parametrize("method,options", [
    ("full", {}), ("frozen", {}), ("bitfit", {}), ("bitfit", {"bitfit_terms": "b_q,b_m2"}),
    ("bitfit", {"bitfit_terms": "key,value,attention_output,attention_layernorm,output,output_layernorm"}),
    ("lora", {}), ("adapter", {}), ("adapter", {"adapter_type": "pfeiffer"})])
def test_peer_trains_what_our_config_trains(method, options, tiny_bert_dir, glue, tmp_path):
    cfg = config.build({"method": method, "task": "rte", "model": str(tiny_bert_dir), "data_dir": str(glue),
                        "output_dir": str(tmp_path / "run"), **options})
    ours = trainer.Trainer(cfg).param_report()["trainable_params"]
    a = peer_namespace(peer_args(cfg))
    model = build(str(tiny_bert_dir), a, num_labels=2)
    theirs = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert theirs == ours


def test_peer_adapter_starts_as_the_identity(tiny_bert_dir):
    import torch
    from transformers import BertForSequenceClassification

    cfg = config.build({"method": "adapter", "task": "sst2"})
    a = peer_namespace(peer_args(cfg))
    torch.manual_seed(0)
    with_adapters = build(str(tiny_bert_dir), a, num_labels=2).eval()
    plain = BertForSequenceClassification.from_pretrained(str(tiny_bert_dir), num_labels=2).eval()
    plain.classifier.load_state_dict(with_adapters.classifier.state_dict())
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    with torch.no_grad():
        torch.testing.assert_close(with_adapters(input_ids=ids).logits, plain(input_ids=ids).logits)
    assert sum(".adapter." in n for n, _ in with_adapters.named_parameters()) == 4 * 2 * 3


def test_peer_args_mirror_the_config():
    cfg = config.build({"method": "ptuning", "task": "rte", "seed": 2, "eval_every": 50})
    a = peer_namespace(peer_args(cfg))
    o = cfg.optim
    assert (a.method, a.task, a.learning_rate, a.head_learning_rate, a.num_epochs, a.seed, a.eval_every) == \
        ("ptuning", "rte", o.learning_rate, o.head_learning_rate, o.num_epochs, 2, 50)
    assert (a.encoder_type, a.encoder_num_layers, a.num_virtual_tokens) == ("lstm", 2, 20)
    assert a.pooling == cfg.head.pooling == "cosine"      # RTE's P-tuning config reads the cosine
    assert peer_namespace(peer_args(config.build({"method": "ptuning", "task": "sst2"}))).pooling == "cls"
    with pytest.raises(SystemExit, match="modules_to_save"):
        peer_args(config.build({"method": "bitfit", "task": "rte", "modules_to_save": "pooler"}))


@pytest.mark.parametrize("method", ["frozen", "prompt"])
def test_peer_mean_pooling_reads_the_mean_of_the_attended_outputs(method, tiny_bert_dir):
    import torch

    cfg = config.build({"method": method, "task": "rte", "pooling": "mean"})
    a = peer_namespace(peer_args(cfg))
    assert a.pooling == "mean"
    torch.manual_seed(0)
    model = build(str(tiny_bert_dir), a, num_labels=2).eval()
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102], [101, 2023, 102, 0, 0, 0]])
    mask = (ids > 0).long()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        # the same model's last layer, read independently: every attended position, virtual tokens included
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    n_virtual = hidden.shape[1] - ids.shape[1]
    assert n_virtual == (cfg.method_obj().num_virtual_tokens if method == "prompt" else 0)
    full_mask = torch.cat([torch.ones(2, n_virtual), mask.float()], 1).unsqueeze(-1)
    mean = (hidden * full_mask).sum(1) / full_mask.sum(1)
    classifier = model.classifier if method == "frozen" else model.base_model.classifier.modules_to_save["default"]
    torch.testing.assert_close(logits, classifier(mean))
    assert torch.isfinite(logits).all() and not torch.allclose(logits[0], logits[1])


def test_peer_paused_and_resumed_trains_as_one_run(tiny_bert_dir, glue, tmp_path):
    """``--time_limit`` with ``--state``: a run paused after every step and resumed each time ends
    with the same evaluations as the run made in one go, and its state file is gone at the end."""
    import json
    import subprocess
    import sys

    from benchmarks.peft_job import PAUSED

    flags = [sys.executable, str(REPO / "benchmarks" / "peft_job.py"), "--method=ptuning", "--task=stsb",
             f"--data_dir={glue}", f"--model={tiny_bert_dir}", "--learning_rate=1e-2", "--max_steps=3",
             "--eval_every=2", "--max_train_examples=96", "--max_eval_examples=32", "--num_virtual_tokens=4"]

    def run(*extra) -> tuple[int, dict]:
        p = subprocess.run(flags + list(extra), capture_output=True, text=True, timeout=300)
        lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
        assert lines, p.stderr[-2000:]
        return p.returncode, json.loads(lines[-1])

    rc, whole = run()
    assert rc == 0 and whole["parts"] == 1
    state = tmp_path / "peer.state.pt"
    codes, steps = [], []
    while True:
        rc, out = run(f"--state={state}", "--time_limit=0.001")     # pauses after every step
        codes.append(rc)
        if rc != PAUSED:
            break
        steps.append(out["step"])
        assert state.is_file()
    assert codes == [PAUSED, PAUSED, 0] and steps == [1, 2]
    assert out["parts"] == 3 and not state.exists()
    assert [e["step"] for e in out["evals"]] == [e["step"] for e in whole["evals"]] == [2, 3]
    for a, b in zip(out["evals"], whole["evals"]):     # a continuous metric: equal weights, equal values
        assert a["pearson"] == b["pearson"] and a["spearman"] == b["spearman"]
    assert out["evals"][0]["pearson"] != out["evals"][1]["pearson"]
    assert out["steps"] == whole["steps"] == 3
    # a state saved with other settings is refused, not silently mixed in
    rc, _ = run(f"--state={state}", "--time_limit=0.001")
    assert rc == PAUSED
    p = subprocess.run(flags[:-1] + ["--num_virtual_tokens=5", f"--state={state}"], capture_output=True, text=True)
    assert p.returncode != 0 and "other settings (num_virtual_tokens)" in p.stderr


@pytest.mark.parametrize("method", ["frozen", "lora"])
def test_peer_cosine_pooling_gives_our_logits(method, tiny_bert_dir):
    """``--pooling=cosine``: the peer splits the pair rows on the host (numpy) and reads the cosine of
    the two sentences' means; with the same head, its logits are ours (LoRA starts as the identity)."""
    import numpy as np
    import torch

    from benchmarks.peft_job import split_pairs
    from jaxpeft.models import load_classifier

    cfg = config.build({"method": method, "task": "rte", "pooling": "cosine"})
    a = peer_namespace(peer_args(cfg))
    assert a.pooling == "cosine"
    torch.manual_seed(0)
    model = build(str(tiny_bert_dir), a, num_labels=2).eval()
    ours = load_classifier(str(tiny_bert_dir), 2, pooling="cosine")
    enc = ours.tokenizer(["A man is dancing in the rain.", "Two dogs.", "The cat sat on the mat today."],
                         ["A man dances.", "Several animals play in a big green park.", "The cat sat."],
                         padding=True, return_tensors="np")
    enc = {k: enc[k].astype(np.int32) for k in ("input_ids", "attention_mask", "token_type_ids")}
    head = model.classifier if method == "frozen" else model.base_model.model.classifier.modules_to_save["default"]
    kernel = head.dense.weight.detach().numpy().T
    ours_logits = np.asarray(ours.module.apply(
        {"params": {**ours.params, "classifier": {"kernel": kernel, "bias": head.dense.bias.detach().numpy()}}},
        **enc))
    split = split_pairs(enc)
    assert split["input_ids"].shape == (6, enc["input_ids"].shape[1])
    with torch.no_grad():
        theirs = model(**{k: torch.from_numpy(v).long() for k, v in split.items()}).logits.numpy()
    assert theirs.shape == (3, 2) and np.ptp(theirs[:, 0]) > 0
    np.testing.assert_allclose(ours_logits, theirs, atol=1e-5)
