"""What the DeBERTa and ModernBERT family tests share: tiny tokenizers of each kind trained on a
few GLUE sentences, a transformers checkpoint's weights put into jaxpeft's params, short CLI runs."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from jaxpeft import masks
from jaxpeft.models.family import name_table


def sentences(glue: Path, n: int = 300) -> list[str]:
    """Both sentences of the first ``n`` RTE training pairs."""
    with open(Path(glue) / "RTE" / "train.tsv", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:n + 1]
    return [r[1] for r in rows] + [r[2] for r in rows]


def unigram_tokenizer(folder: Path, texts: list[str], vocab_size: int = 400) -> int:
    """A SentencePiece-style Unigram tokenizer as DeBERTa-v3's (``[PAD]`` 0, ``[CLS]`` 1, ``[SEP]``
    2, ``[UNK]`` 3, ``[MASK]`` last), written by transformers' ``DebertaV2Tokenizer``; returns
    its vocabulary size."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import DebertaV2Tokenizer

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.Replace(Regex(r"\s{2,}|[\n\r\t]"), " "), normalizers.NFC(),
                                           normalizers.Strip(left=False, right=True)])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.train_from_iterator(texts, trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["[PAD]", "[CLS]", "[SEP]", "[UNK]"], unk_token="[UNK]"))
    vocab = [(p, float(s)) for p, s in json.loads(tok.to_str())["model"]["vocab"]] + [("[MASK]", 0.0)]
    DebertaV2Tokenizer(vocab=vocab).save_pretrained(folder)
    return len(vocab)


def bpe_tokenizer(folder: Path, texts: list[str], vocab_size: int = 400) -> dict[str, int]:
    """A byte-level BPE tokenizer as ModernBERT's (``[CLS] a [SEP] b [SEP]``), written by
    transformers' fast tokenizer; returns the special tokens' ids and the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    ids = {s: tok.token_to_id(s) for s in specials}
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0", pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                            pad_token="[PAD]", mask_token="[MASK]",
                            model_input_names=["input_ids", "attention_mask"]).save_pretrained(folder)
    return {**ids, "vocab_size": tok.get_vocab_size()}


def check_tokenizer(folder: Path, texts: list[str], max_length: int = 24) -> None:
    """jaxpeft's ``encode_arrays`` gives transformers' ids (and token types) for singles and pairs,
    truncation included."""
    from transformers import AutoTokenizer

    from jaxpeft.data.tokenizing import Tokenizer

    ours, theirs = Tokenizer(folder), AutoTokenizer.from_pretrained(str(folder))
    assert ours.pad_token_id == theirs.pad_token_id
    a, b = texts[:6], texts[-6:]
    for cols in ([a], [a, b]):
        ids, types, lengths = ours.encode_arrays(cols, max_length)
        enc = theirs(*cols, truncation=True, max_length=max_length, return_token_type_ids=True)
        assert max(len(r) for r in enc["input_ids"]) == max_length     # truncation happened
        for i in range(len(a)):
            assert list(ids[i, :lengths[i]]) == enc["input_ids"][i]
            assert list(types[i, :lengths[i]]) == enc["token_type_ids"][i]
            assert (ids[i, lengths[i]:] == theirs.pad_token_id).all()


def with_torch_weights(params: Any, state_dict: Mapping[str, Any]) -> tuple[Any, set[str]]:
    """``params`` with every tensor of a transformers state dict that names one of them, and the
    paths that were set."""
    flat = masks.flatten(params)
    table = name_table(list(flat))
    found = set()
    for name, t in state_dict.items():
        hit = table.get(name)
        if hit is None:
            continue
        path, transpose = hit
        arr = t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)
        arr = arr.T if transpose else arr
        assert arr.shape == tuple(flat[path].shape), (name, arr.shape, flat[path].shape)
        flat[path] = arr.astype(np.float32)
        found.add(path)
    return masks.unflatten(flat, params), found


def train_argv(model: Path, glue: Path, out: Path, method: str, *extra: str) -> list[str]:
    """A two-step run on a few RTE pairs."""
    return [f"--model={model}", f"--data_dir={glue}", f"--output_dir={out}", "--task=rte", f"--method={method}",
            "--max_steps=2", "--batch_size=4", "--max_train_examples=8", "--max_eval_examples=4",
            "--max_seq_length=32", "--eval_every=0", "--keep=0", "--compute=exact", "--no-progress", "--no-plot",
            *extra]


def apply(module: Any, variables: Any, *args: Any, **kw: Any) -> Any:
    """``module.apply(variables, *args, **kw)``, compiled (one compilation beats op-by-op dispatch
    on a CPU); ``mutable`` and plain Python values stay static."""
    import jax

    static = {k: v for k, v in kw.items() if k == "mutable" or isinstance(v, (bool, str, int, float, type(None)))}
    traced = {k: v for k, v in kw.items() if k not in static}
    return jax.jit(lambda v, a, t: module.apply(v, *a, **t, **static))(variables, args, traced)


def peft_logits(adapter: Path, model_dir: Path, torch_cls: Any, glue: Path, n: int = 8,
                **from_pretrained: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(jaxpeft's, peft's)`` logits of ``n`` RTE dev pairs with an adapter folder a run exported:
    jaxpeft's prediction, and peft's ``PeftModel.from_pretrained`` on transformers' ``torch_cls``."""
    import peft
    import torch
    from transformers import AutoTokenizer

    from jaxpeft.adapters import folder as adapters
    from jaxpeft.adapters import predict as prediction
    from jaxpeft.compute import EXACT
    from jaxpeft.tasks import glue as glue_tasks

    ex = glue_tasks.load_split(glue_tasks.get_task("rte"), "dev", glue).take(n)
    loaded, params, method, task = adapters.load_adapter(adapter, compute=EXACT)
    ours = prediction.outputs(loaded, params, method, task, ex, max_seq_length=32, batch_size=n)[0]
    model = torch_cls.from_pretrained(str(model_dir), num_labels=2, **from_pretrained)
    pm = peft.PeftModel.from_pretrained(model, str(adapter)).eval()
    enc = AutoTokenizer.from_pretrained(str(model_dir))(*ex.texts, padding=True, truncation=True, max_length=32,
                                                        return_tensors="pt")
    with torch.no_grad():
        theirs = pm(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.numpy()
    return np.asarray(ours), theirs


def close(ours: Any, theirs: Any, what: str, atol: float = 1e-4) -> float:
    """Asserts ``|ours - theirs| <= atol`` everywhere; prints and returns the largest difference
    (``pytest -s`` shows the parity numbers)."""
    ours, theirs = np.asarray(ours, np.float32), np.asarray(theirs, np.float32)
    assert ours.shape == theirs.shape, (what, ours.shape, theirs.shape)
    d = float(np.abs(ours - theirs).max())
    print(f"PARITY {what}: max |diff| {d:.2e}")
    np.testing.assert_allclose(ours, theirs, atol=atol, rtol=0, err_msg=what)
    return d
