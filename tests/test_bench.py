"""scripts/bench.py on CPU with a tiny config (it must not rot); no speed is asserted."""

import json
import re
import subprocess
import sys
from pathlib import Path

from jaxpeft.bench import step

REPO = Path(__file__).resolve().parent.parent


def test_analytic_flops_match_the_published_flop_limits():
    """BERT-base, seq 128, at 790 TFLOP/s: ~11,800 seq/s full fine-tuning, ~17,400 BitFit."""
    base = step.SIZES["base"]
    full = 790e12 / (step.analytic_flops(base, "full", 1, 128))
    bitfit = 790e12 / (step.analytic_flops(base, "bitfit", 1, 128))
    assert abs(full - 11_800) / 11_800 < 0.01, full
    assert abs(bitfit - 17_400) / 17_400 < 0.01, bitfit
    assert step.analytic_flops(base, "frozen", 1, 128) * 3 == step.analytic_flops(base, "full", 1, 128)
    # prompts lengthen the queries, prefixes only the keys
    assert step.analytic_flops(base, "prompt", 1, 128) > step.analytic_flops(base, "prefix", 1, 128) \
        > step.analytic_flops(base, "bitfit", 1, 128)


def test_capacity_prediction_is_affine_in_batch():
    recs = [{"framework": "jaxpeft", "size": "s", "method": "m", "seq": 8, "batch": b, "step_bytes": 100 + 10 * b}
            for b in (4, 16)]
    cap = step.predict_capacity(recs, "s", "m", limit_bytes=1100, headroom=1.0)
    assert cap["max_batch"] == 96 and cap["fixed_bytes"] == 100 and cap["bytes_per_example"] == 10


def test_bench_script_runs_tiny_on_cpu(tmp_path):
    out = tmp_path / "bench"
    p = subprocess.run([sys.executable, str(REPO / "scripts" / "bench.py"), "--sizes=tiny",
                        "--methods=full,bitfit,frozen", "--batches=4", "--seq=16", "--steps=2", "--repeats=1",
                        f"--out={out}"], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    recs = [json.loads(x) for x in (out / "bench.jsonl").read_text().splitlines()]
    speed = [r for r in recs if "seq_per_s" in r]
    assert len(speed) == 3 and not any("error" in r for r in recs)
    for r in speed:
        assert r["seq_per_s"] > 0 and r["step_bytes"] > 0 and r["compile_s"] > 0
        assert r["analytic_flops"] == step.analytic_flops(step.SIZES["tiny"], r["method"], r["batch"], 16)
    by = {(r["method"], r["batch"]): r for r in speed}
    assert by[("bitfit", 4)]["trainable_params"] < by[("full", 4)]["trainable_params"]
    assert by[("frozen", 4)]["xla_flops"] < by[("bitfit", 4)]["xla_flops"] < by[("full", 4)]["xla_flops"]
    md = (out / "bench.md").read_text()
    assert "| tiny | bitfit | 4 |" in md and "## Memory" in md


def test_memory_table_without_a_full_row_says_so():
    gib = 2 ** 30
    recs = [dict(framework="jaxpeft", size="base", method=m, batch=b, seq=128, step_bytes=g * gib)
            for m, b, g in [("bitfit", 64, 2), ("full", 256, 4), ("bitfit", 256, 3)]]
    rows = {line.split("|")[3].strip() + line.split("|")[4].strip(): line     # | family | size | method | batch |
            for line in step.memory_table(recs).splitlines()[2:]}
    assert "| 0.75x |" in rows["bitfit256"] and "| 1.00x |" in rows["full256"]
    assert "| — |" in rows["bitfit64"] and "nan" not in rows["bitfit64"]


def test_report_of_a_peer_only_run_lists_the_peer_rows():
    """A --no_ours run has nothing for the speed table to pair the peer with: its rows get their own
    table instead of vanishing, and rows that pair with ours stay out of it."""
    peer = [dict(framework="torch 2.11", mode="compile", size="base", method=m, batch=256, seq=128,
                 seq_per_s=s, step_ms=256e3 / s, peak_bytes=8 * 2 ** 30) for m, s in (("bitfit", 6625.2), ("full", 4912.1))]
    failed = dict(framework="torch 2.11", mode="eager", size="base", method="prefix", batch=64, seq=128,
                  error="timeout after 240s")
    md = step.markdown_report(peer + [failed], "# t")
    assert "| base | bitfit | 256 | 128 | compile | 6,625 | 38.64 | 8.00 |" in md
    assert "| base | full | 256 | 128 | compile | 4,912 |" in md and "fails: timeout after 240s" in md
    ours = dict(framework="jaxpeft", size="base", method="bitfit", batch=256, seq=128, seq_per_s=8650.0, mfu=0.5,
                step_bytes=6 * 2 ** 30, compile_s=19.0)
    md = step.markdown_report(peer + [ours], "# t")
    assert "| 6,625 | 1.31x |" in md                               # paired in the speed table
    assert "| base | bitfit | 256 | 128 | compile |" not in md      # so not listed again
    assert "| base | full | 256 | 128 | compile | 4,912 |" in md
    assert "without one of ours" not in step.markdown_report([ours], "# t")


def test_bench_families_run_tiny_on_cpu_with_the_peer_on_the_same_shapes(tmp_path):
    """--families on tiny shapes: every family gives a speed record; a method the family refuses
    (BitFit on ModernBERT, which has no biases) is recorded as skipped with the family's reason,
    the peer's rows with it; the peer's column (eager, RoBERTa BitFit) is of the same model as ours:
    its trainable and total params are ours and those of transformers' model of that config."""
    import transformers

    from jaxpeft.bench import peer
    from jaxpeft.cli import bench

    out = tmp_path / "bench"
    common = ["--family_size=tiny", "--batches=4", "--seq=16", "--steps=1", "--repeats=1", f"--out={out}"]
    assert bench.main(["--families=roberta,modernbert", "--methods=frozen,bitfit", *common]) == 0
    assert bench.main(["--families=roberta", "--methods=bitfit", "--peer=eager", "--no_ours", *common]) == 0
    recs = [json.loads(x) for x in (out / "bench.jsonl").read_text().splitlines()]
    ours = {(r["family"], r["method"]): r for r in recs if r["framework"] == "jaxpeft"}
    theirs = {(r["family"], r["method"]): r for r in recs if r["framework"].startswith("torch")}
    # (a) each family: a step measured, on its own shapes
    for family in ("roberta", "modernbert"):
        r = ours[(family, "frozen")]
        assert r["seq_per_s"] > 0 and r["size"] == "tiny" and "error" not in r, r
    assert ours[("roberta", "frozen")]["total_params"] != ours[("modernbert", "frozen")]["total_params"]
    # (b) refused, with the family's reason
    refused = ours[("modernbert", "bitfit")]
    assert refused["skipped"] == "--method=bitfit: the modernbert encoder has no bias terms to train"
    assert "seq_per_s" not in refused and "error" not in refused
    # (c) the peer's column: the same model as ours, by an independent count of transformers' model
    mine, other = ours[("roberta", "bitfit")], theirs[("roberta", "bitfit")]
    assert other["mode"] == "eager" and other["seq_per_s"] > 0, other
    model = transformers.AutoModelForSequenceClassification.from_config(peer.hf_config("roberta", "tiny"))
    assert isinstance(model, transformers.RobertaForSequenceClassification)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for n, p in model.named_parameters()
                    if n.endswith(".bias") or n.startswith("classifier."))
    assert model.config.hidden_size == 64 and model.config.vocab_size == 50265 and total > 3_000_000
    assert (mine["trainable_params"], mine["total_params"]) == (trainable, total)
    assert (other["trainable_params"], other["total_params"]) == (trainable, total)
    # the report: one table row per family and method, the peer's column filled where it ran
    assert bench.main(["--report", str(out / "bench.jsonl"), f"--out={out}"]) == 0
    md = (out / "bench.md").read_text()
    assert "| family | size | method | batch |" in md
    row = next(line for line in md.splitlines() if line.startswith("| roberta | tiny | bitfit | 4 |"))
    assert row.split("|")[10].strip() not in ("—", "fails", "skipped")     # peft eager seq/s
    assert "| modernbert | tiny | frozen | 4 |" in md
    assert "| modernbert | tiny | bitfit | jaxpeft | 4 | --method=bitfit: the modernbert encoder has no bias" in md


def test_bench_family_shapes_are_the_peers():
    """Every family the benchmark takes: our model of its tiny config has transformers' parameter
    count, and the peer's peft targets and head are our family's."""
    import jax
    import transformers

    from jaxpeft import methods
    from jaxpeft.bench import peer
    from jaxpeft.models.heads import Head
    from jaxpeft.models.loading import build_module, param_shapes

    assert step.FAMILY_NAMES[0] == "bert" and set(step.FAMILY_NAMES[1:]) == set(peer.FAMILY_CONFIGS)
    for name in peer.FAMILY_CONFIGS:
        family, cfg = step.family_config(name, "tiny")
        assert cfg.hidden_size == 64 and cfg.num_hidden_layers == 2, name
        shapes = param_shapes(build_module(family, cfg, Head("sequence", 2), methods.create("full")))
        torch_model = transformers.AutoModelForSequenceClassification.from_config(peer.hf_config(name, "tiny"))
        assert sum(int(x.size) for x in jax.tree_util.tree_leaves(shapes)) == \
            sum(p.numel() for p in torch_model.parameters()), name
        assert peer.PEFT_TARGETS[name] == (family.lora_targets, family.ia3_targets, family.ia3_feedforward), name
        assert tuple(peer.head_names(torch_model)) == family.head_modules, name
    # base: the shapes of each base checkpoint
    base = {n: step.family_config(n, "base")[1] for n in peer.FAMILY_CONFIGS}
    assert all(c.hidden_size == 768 and c.num_attention_heads == 12 for c in base.values())
    assert {n: c.num_hidden_layers for n, c in base.items() if c.num_hidden_layers != 12} == \
        {"distilbert": 6, "modernbert": 22}
    assert {n: c.vocab_size for n, c in base.items()} == {
        "roberta": 50265, "xlm-roberta": 250002, "electra": 30522, "distilbert": 30522, "mpnet": 30527,
        "deberta-v2": 128100, "modernbert": 50368}


def test_memory_table_runs_tiny_on_cpu_and_counts_the_params_transformers_has(tmp_path):
    """``--memory_table`` at a tiny size: one child process per configuration, the model's bytes from
    its shapes (full fine-tuning's params counted against transformers' own model of the same
    config), XLA's step memory below full fine-tuning's for BitFit, a quantized base holding less,
    full fine-tuning refused on it, and a second run of the same command adding nothing."""
    import torch
    import transformers

    from jaxpeft.models import sizes

    out = tmp_path / "memory"
    cmd = [sys.executable, str(REPO / "scripts" / "bench.py"), "--memory_table", "--sizes=tiny", "--methods=full,bitfit",
           "--base_dtypes=bfloat16,int8", "--remats=none", "--max_batch=none", "--memory_batch=4", "--seq=16",
           "--steps=2", "--repeats=1", "--memory_limit_gib=1", f"--out={out}"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert p.returncode == 0, p.stderr[-2000:]
    recs = {(r["method"], r["base_dtype"]): r for r in map(json.loads, (out / "memory.jsonl").read_text().splitlines())}
    assert set(recs) == {("full", "bfloat16"), ("full", "int8"), ("bitfit", "bfloat16"), ("bitfit", "int8")}
    assert "int8" in recs[("full", "int8")]["skipped"]
    full, bitfit, bitfit8 = recs[("full", "bfloat16")], recs[("bitfit", "bfloat16")], recs[("bitfit", "int8")]
    assert not any("error" in r for r in (full, bitfit, bitfit8))

    cfg = sizes.config("tiny")
    hf = transformers.BertConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                                 num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                                 intermediate_size=cfg.intermediate_size,
                                 max_position_embeddings=cfg.max_position_embeddings,
                                 type_vocab_size=cfg.type_vocab_size, num_labels=2)
    torch.manual_seed(0)
    n = sum(t.numel() for t in transformers.BertForSequenceClassification(hf).parameters())
    assert full["params"] == full["trainable_params"] == n
    assert full["trainable_bytes"] == 4 * n and full["optimizer_bytes"] == 8 * n and full["frozen_bytes"] == 0
    assert bitfit["params"] == n and 0 < bitfit["trainable_params"] < n / 50
    assert 0 < bitfit["step_bytes"] < full["step_bytes"]
    assert 0 < bitfit8["frozen_bytes"] < bitfit["frozen_bytes"]
    md = (out / "bench.md").read_text()
    assert "| tiny |" in md and "not possible" in md and (out / "memory.png").stat().st_size > 0
    before = (out / "memory.jsonl").read_text()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert p.returncode == 0 and (out / "memory.jsonl").read_text() == before


def test_bench_refuses_an_unknown_method_and_family_in_one_line(tmp_path):
    for flag, word in (("--methods=bitfit,nope", "'nope'"), ("--families=bert,gpt2", "'gpt2'")):
        p = subprocess.run([sys.executable, str(REPO / "scripts" / "bench.py"), "--sizes=tiny", flag,
                            f"--out={tmp_path / 'b'}"], capture_output=True, text=True, timeout=300)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and word in lines[0], p.stderr
    assert not (tmp_path / "b").exists()


def test_a_run_reuses_the_step_its_memory_analysis_compiled():
    """On one device the step compiled for XLA's memory analysis at the run's shapes is the one the
    run executes (no second compilation), and it trains as a freshly compiled step does."""
    from jaxpeft.compute import Compute

    bc = step.BenchConfig(size="tiny", method="bitfit", batch=4, seq=16, compute=Compute(), steps=1, repeats=1,
                          warmup=1)
    su = step.setup_step(bc)
    assert su.memory(4, 16)["total"] > 0 and (4, 16) in su.compiled
    reused = step.run(bc, setup=su)
    assert su.compiled == {}
    fresh = step.run(bc)
    assert reused["loss"] == fresh["loss"] and reused["compile_s"] > 0


def test_bench_peer_refuses_prefix_methods_whose_prefixes_cannot_reach_attention(monkeypatch):
    """The peer's memory/speed row of prefix tuning or P-tuning v2 is measured only where peft's
    prefixes change the model's output. Where peft refuses the encoder (peft up to 0.21 on
    transformers 5's ``RobertaModel``) the row is refused with peft's reason; where the
    prefixes would be swallowed without a word (here: a task model whose encoder ignores them),
    it is refused too, instead of timing a prefix encoder whose output reaches nothing."""
    import peft
    import transformers

    from jaxpeft.bench import peer

    for method in ("prefix", "ptuning_v2"):
        try:
            built = peer.build("tiny", method, 4, family="roberta")
        except peer.Unavailable as e:       # peft up to 0.21: transformers 5's RoBERTa takes no past_key_values
            assert re.search(f"--method={method}: peft cannot run it .*past key values", str(e)), e
        else:                               # peft 0.22 runs it: the prefixes reach the logits
            assert peer.prefixes_dropped(built, method) is None
    # an encoder that takes the prefixes and drops them: the check sees the logits unmoved
    model = transformers.AutoModelForSequenceClassification.from_config(peer.hf_config("roberta", "tiny"))
    encoder = type(model.roberta)
    plain = encoder.forward

    # the cache argument: past_key_values, renamed cache in transformers 5.24 (peft 0.22 passes that)
    def swallowing(self, input_ids=None, attention_mask=None, past_key_values=None, cache=None, **kw):
        return plain(self, input_ids=input_ids, attention_mask=attention_mask, **kw)

    monkeypatch.setattr(encoder, "forward", swallowing)
    wrapped = peft.get_peft_model(model, peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4))
    assert "transformers" in peer.prefixes_dropped(wrapped, "prefix")
    assert peer.prefixes_dropped(wrapped, "lora") is None
    # where the prefixes do reach the output (an encoder that adds their keys' sum), it passes

    def reading(self, input_ids=None, attention_mask=None, past_key_values=None, cache=None, **kw):
        out = plain(self, input_ids=input_ids, attention_mask=attention_mask, **kw)
        kv = cache if cache is not None else past_key_values
        layers = getattr(kv, "layers", None)
        shift = layers[0].keys.sum() if layers is not None else kv[0][0].sum()
        out.last_hidden_state = out.last_hidden_state + 1e-3 * shift
        return out

    monkeypatch.setattr(encoder, "forward", reading)
    assert peer.prefixes_dropped(wrapped, "prefix") is None
