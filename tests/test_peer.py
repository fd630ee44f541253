"""The PyTorch peer of the accuracy comparison (benchmarks/peft_job.py): it trains what our config
trains, and the study driver runs it at each group's chosen learning rate."""

from pathlib import Path

import pytest

from benchmarks.peft_job import build, parser, peer_args
from jaxpeft import config, trainer

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
    assert a.pooling == "cls"
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
