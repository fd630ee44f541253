"""Raw text examples and their tokenized form, with an on-disk cache of tokenized splits.

:func:`encode_cached` keys the cache by the texts, the tokenizer, the length and the tokenizing
code, so a second run skips the tokenizer.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

#: the label of a position no loss reads (later sub-words, special tokens, padding), as transformers'
IGNORE = -100


@dataclasses.dataclass
class Examples:
    """One split as raw text: ``texts`` is a tuple of 1 or 2 lists; labels are float for STS-B,
    class ids otherwise, and ``None`` for unlabeled test splits."""

    texts: tuple[list[str], ...]
    labels: np.ndarray | None
    source: str

    def __len__(self) -> int:
        return len(self.texts[0])

    def take(self, n: int) -> "Examples":
        labels = None if self.labels is None else self.labels[:n]
        return Examples(tuple(t[:n] for t in self.texts), labels, self.source)

@dataclasses.dataclass
class Encoded:
    """A tokenized split, right-padded to ``max_length``; ``lengths`` are the real token counts.

    ``labels``: one per row (``[N]``: class ids or values) or one per token (``[N, max_length]``,
    :data:`IGNORE` where no loss reads). ``extra``: more per-row arrays that go into batches with
    the row (a span's ``start_positions``, ``end_positions``). ``host``: what the task keeps to
    decode predictions (which example a window is of, token offsets), never sent to a device.
    """

    input_ids: np.ndarray       # [N, max_length] int32
    token_type_ids: np.ndarray  # [N, max_length] int32
    lengths: np.ndarray         # [N] int32
    labels: np.ndarray | None   # [N] or [N, max_length]
    extra: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    host: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def max_length(self) -> int:
        return int(self.input_ids.shape[1])

    def rows(self, idx: np.ndarray) -> "Encoded":
        """The rows ``idx`` (host data of row-aligned arrays kept)."""
        host = {k: (v[idx] if isinstance(v, np.ndarray) and len(v) == len(self) else v) for k, v in self.host.items()}
        return Encoded(self.input_ids[idx], self.token_type_ids[idx], self.lengths[idx],
                       None if self.labels is None else self.labels[idx],
                       {k: v[idx] for k, v in self.extra.items()}, host)

def encode(tokenizer, examples: Examples, max_length: int, chunk: int = 4096) -> Encoded:
    """Tokenizes with the fast tokenizer in chunks; pairs are truncated longest-first.
    ``tokenizer``: a :class:`jaxpeft.tokenizing.Tokenizer` or a transformers tokenizer."""
    if hasattr(tokenizer, "encode_arrays"):
        ids, types, lengths = tokenizer.encode_arrays(examples.texts, max_length)
        return Encoded(ids, types, lengths, examples.labels)
    n = len(examples)
    ids = np.zeros((n, max_length), np.int32)
    types = np.zeros((n, max_length), np.int32)
    lengths = np.zeros((n,), np.int32)
    pad = tokenizer.pad_token_id or 0
    for start in range(0, n, chunk):
        parts = [t[start:start + chunk] for t in examples.texts]
        enc = tokenizer(*parts, truncation=True, max_length=max_length, padding="max_length",
                        return_tensors="np", return_token_type_ids=True, return_attention_mask=True)
        sl = slice(start, start + len(parts[0]))
        ids[sl] = enc["input_ids"]
        types[sl] = enc["token_type_ids"]
        lengths[sl] = enc["attention_mask"].sum(axis=1)
    if pad != 0:
        ids[np.arange(max_length)[None, :] >= lengths[:, None]] = pad
    return Encoded(ids, types, lengths, examples.labels)

def _tokenizer_digest(tokenizer) -> str:
    """What identifies a tokenizer's output: its files, or its vocabulary and settings."""
    if hasattr(tokenizer, "digest"):
        return tokenizer.digest()
    h = hashlib.sha256()
    try:
        h.update(tokenizer.backend_tokenizer.to_str().encode())
    except Exception:  # noqa: BLE001 -- a slow tokenizer: its vocabulary and class
        h.update(repr(sorted(tokenizer.get_vocab().items())).encode())
        h.update(type(tokenizer).__name__.encode())
    return h.hexdigest()[:16]

def cache_dir() -> Path | None:
    """Where tokenized splits are cached: ``$JAXPEFT_DATA_CACHE`` (``off``: nowhere), else
    ``~/.cache/jaxpeft/data`` (``$XDG_CACHE_HOME`` honoured)."""
    v = os.environ.get("JAXPEFT_DATA_CACHE")
    if v is not None:
        return None if v.strip().lower() in ("", "off", "0", "none") else Path(v).expanduser()
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "jaxpeft" / "data"

#: the modules whose code decides what :func:`encode` returns
_ENCODING_MODULES = ("encoding.py", "tokenizing.py")
_ENCODING_PACKAGES = ("tokenizers", "transformers")


@functools.lru_cache(maxsize=4)
def code_digest(folder: str | None = None) -> str:
    """A hash of the code that tokenizes: this module and :mod:`jaxpeft.data.tokenizing` (as found
    in ``folder``, default this package's), and the versions of ``tokenizers`` and
    ``transformers``. A cached split made by other code is not read."""
    from importlib import metadata

    h = hashlib.sha256()
    here = Path(folder) if folder is not None else Path(__file__).resolve().parent
    for name in _ENCODING_MODULES:
        h.update(name.encode())
        h.update((here / name).read_bytes())
    for pkg in _ENCODING_PACKAGES:
        try:
            h.update(f"{pkg}={metadata.version(pkg)}".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{pkg}=none".encode())
    return h.hexdigest()[:16]


def cache_path(root: Path, tokenizer, examples: Examples, max_length: int) -> Path:
    """The cache file of ``examples`` tokenized by ``tokenizer`` at ``max_length`` under ``root``:
    keyed by the texts themselves (not a file name, so an edited file never reads a stale entry),
    the tokenizer's files, the length and :func:`code_digest`."""
    h = hashlib.sha256(f"{max_length}|{_tokenizer_digest(tokenizer)}|{code_digest()}|{len(examples)}".encode())
    for col in examples.texts:
        h.update("\x1f".join(col).encode("utf-8", "surrogatepass"))
        h.update(b"\x1e")
    return root / f"{h.hexdigest()[:24]}.npz"


def encode_cached(tokenizer, examples: Examples, max_length: int) -> Encoded:
    """:func:`encode` through an on-disk cache (:func:`cache_path`). A cache that cannot be written
    is skipped silently."""
    root = cache_dir()
    if root is None:
        return encode(tokenizer, examples, max_length)
    path = cache_path(root, tokenizer, examples, max_length)
    if path.is_file():
        try:
            with np.load(path) as z:
                return Encoded(z["input_ids"], z["token_type_ids"], z["lengths"], examples.labels)
        except Exception:  # noqa: BLE001 -- a damaged entry: tokenize again
            pass
    enc = encode(tokenizer, examples, max_length)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.npz")
    try:
        root.mkdir(parents=True, exist_ok=True)
        remove_orphans(root)
        np.savez(tmp, input_ids=enc.input_ids, token_type_ids=enc.token_type_ids, lengths=enc.lengths)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
    return enc


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:          # exists, another user's
        return True
    return True


def remove_orphans(root: Path) -> list[Path]:
    """Removes the cache's half-written entries (``.NAME.npz.PID.npz``) whose process is gone, e.g.
    one that exited while its background thread was writing; returns them. Those of running
    processes are theirs to finish."""
    gone = []
    for p in root.glob(".*.npz.*.npz"):
        pid = p.name[:-len(".npz")].rsplit(".", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            p.unlink(missing_ok=True)
            gone.append(p)
    return gone
