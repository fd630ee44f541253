"""The model's tokenizer, loaded only as far as a run needs it.

Encoding a split goes through Hugging Face's ``tokenizers`` library on the model's
``tokenizer.json`` (what transformers' fast tokenizer runs underneath; it loads in milliseconds),
and a split already tokenized comes from the on-disk cache (``jaxpeft.data.encoding.encode_cached``)
without any tokenizer; the vocabulary and the special tokens (what prompt initialisation samples
from) come from the same file. Everything else (``tokenize``, calling it like a transformers
tokenizer) goes to transformers' ``AutoTokenizer``, loaded on first use: importing transformers
takes seconds, which a run does not need to spend.
Both give the same ids (``tests/test_data.py`` checks them on GLUE sentences and pairs).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from jaxpeft.errors import UserError

#: files whose bytes decide the tokenizer's output
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
                   "added_tokens.json")


class Tokenizer:
    """The tokenizer stored with a model in ``model_dir``."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        self._hf: Any = None
        self._fast: Any = None

    # -- what a run needs -----------------------------------------------------------------------
    def digest(self) -> str:
        """A hash of the tokenizer's files: what a cache of tokenized data is keyed by."""
        h = hashlib.sha256()
        for name in TOKENIZER_FILES:
            p = self.model_dir / name
            if p.is_file():
                h.update(name.encode())
                h.update(p.read_bytes())
        return h.hexdigest()[:16]

    def encode_arrays(self, texts: Sequence[Sequence[str]], max_length: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(input_ids, token_type_ids, lengths)`` of one or two columns of texts, with the model's
        special tokens, truncated longest-first to ``max_length`` and right-padded with the pad id."""
        n = len(texts[0])
        ids = np.full((n, max_length), self.pad_token_id, np.int32)
        types = np.zeros((n, max_length), np.int32)
        lengths = np.zeros((n,), np.int32)
        fast = self._fast_tokenizer()
        if fast is None:
            enc = self.hf(*[list(t) for t in texts], truncation=True, max_length=max_length,
                          return_token_type_ids=True)
            rows = zip(enc["input_ids"], enc["token_type_ids"])
        else:
            fast.enable_truncation(max_length, strategy="longest_first")
            fast.no_padding()
            inputs = list(zip(*texts)) if len(texts) > 1 else list(texts[0])
            rows = ((e.ids, e.type_ids) for e in fast.encode_batch(inputs))
        for i, (row_ids, row_types) in enumerate(rows):
            m = len(row_ids)
            ids[i, :m] = row_ids
            types[i, :m] = row_types
            lengths[i] = m
        return ids, types, lengths

    @property
    def pad_token_id(self) -> int:
        fast = self._fast_tokenizer()
        if fast is not None:
            pad = fast.padding.get("pad_id") if fast.padding else None
            # the pad token the tokenizer's config names (RoBERTa's <pad> is 1), else BERT's or RoBERTa's
            for token in (self._configured_pad_token(), "[PAD]", "<pad>"):
                if pad is None and token:
                    pad = fast.token_to_id(token)
            return int(pad or 0)
        return int(self.hf.pad_token_id or 0)

    def _configured_pad_token(self) -> str | None:
        """``pad_token`` of ``tokenizer_config.json`` or ``special_tokens_map.json`` (a string or
        an added-token dict), if either names one."""
        import json

        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            try:
                tok = json.loads((self.model_dir / name).read_text()).get("pad_token")
            except (OSError, ValueError, AttributeError):
                continue
            tok = tok.get("content") if isinstance(tok, dict) else tok
            if isinstance(tok, str) and tok:
                return tok
        return None

    def get_vocab(self) -> dict[str, int]:
        """``{token: id}`` of the whole vocabulary, added tokens included."""
        fast = self._fast_tokenizer()
        return fast.get_vocab(with_added_tokens=True) if fast is not None else self.hf.get_vocab()

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of the special tokens ([CLS], [SEP], [PAD], ...), as transformers lists them."""
        fast = self._fast_tokenizer()
        if fast is None:
            return list(self.hf.all_special_ids)
        return sorted(i for i, t in fast.get_added_tokens_decoder().items() if t.special)

    # -- everything else: transformers' tokenizer ----------------------------------------------------
    @property
    def hf(self) -> Any:
        """transformers' fast tokenizer of the model (loaded on first use)."""
        if self._hf is None:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
            from transformers import AutoTokenizer

            try:
                self._hf = AutoTokenizer.from_pretrained(str(self.model_dir), use_fast=True)
            except Exception as e:
                raise UserError(f"cannot load a tokenizer from {self.model_dir}: {type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}") from None
        return self._hf

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.hf(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.hf, name)

    def _fast_tokenizer(self) -> Any:
        if self._fast is None:
            path = self.model_dir / "tokenizer.json"
            if not path.is_file():
                self._fast = False
            else:
                from tokenizers import Tokenizer as RustTokenizer

                try:
                    self._fast = RustTokenizer.from_file(str(path))
                except Exception as e:
                    raise UserError(f"cannot read the tokenizer {path}: {type(e).__name__}: {e}") from None
        return self._fast or None
