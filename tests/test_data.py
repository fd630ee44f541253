"""GLUE reading (TSV layout quirks, bad files), tokenizing and length-bucketed batches."""

import numpy as np
import pytest

from jaxpeft.data import batches as batching, encoding
from jaxpeft.tasks import glue as glue_tasks
from jaxpeft.errors import UserError

COUNTS = {"sst2": (67349, 872), "cola": (8551, 1043), "mrpc": (3668, 408), "stsb": (5749, 1500),
          "rte": (2490, 277), "wnli": (635, 71)}


@pytest.mark.parametrize("task", sorted(COUNTS))
def test_local_glue_counts_and_labels(glue, task):
    t = glue_tasks.get_task(task)
    train = glue_tasks.load_split(t, "train", glue)
    dev = glue_tasks.load_split(t, "dev", glue)
    assert (len(train), len(dev)) == COUNTS[task]
    assert len(train.texts) == (1 if task in ("sst2", "cola") else 2)
    if t.is_regression:
        assert train.labels.dtype == np.float32 and 0 <= train.labels.min() and train.labels.max() <= 5
    else:
        assert set(np.unique(train.labels)) == set(range(t.num_labels))
    assert all(isinstance(s, str) and s for s in train.texts[0][:100])


def test_quirks_cola_no_header_mrpc_bom(glue):
    cola = glue_tasks.load_split(glue_tasks.get_task("cola"), "dev", glue)
    assert cola.texts[0][0] == "The sailors rode the breeze clear of the rocks."
    cola_test = glue_tasks.load_split(glue_tasks.get_task("cola"), "test", glue)
    assert cola_test.labels is None and cola_test.texts[0][0] == "Bill whistled past the house."
    mrpc = glue_tasks.load_split(glue_tasks.get_task("mrpc"), "dev", glue)
    assert mrpc.labels[0] == 1 and mrpc.texts[0][0].startswith("He said the foodservice pie")
    rte = glue_tasks.load_split(glue_tasks.get_task("rte"), "dev", glue)
    assert rte.labels[0] == 1  # not_entailment


def test_env_var_glue_dir(glue, monkeypatch):
    monkeypatch.setenv("GLUE_DIR", str(glue))
    assert len(glue_tasks.load_split(glue_tasks.get_task("rte"), "dev")) == 277


def test_bad_inputs(glue, tmp_path):
    with pytest.raises(UserError, match="unknown task 'sst3'"):
        glue_tasks.get_task("sst3")
    with pytest.raises(UserError, match="does not exist"):
        glue_tasks.load_split(glue_tasks.get_task("sst2"), "dev", tmp_path / "nope")
    with pytest.raises(UserError, match="QNLI/train.tsv not found"):
        glue_tasks.load_split(glue_tasks.get_task("qnli"), "train", glue)
    bad = tmp_path / "SST-2"
    bad.mkdir()
    (bad / "dev.tsv").write_text("sentence\tlabel\ngood movie\t1\nno label here\n")
    with pytest.raises(UserError, match=r"dev.tsv:3: malformed row, expected 2 tab-separated fields"):
        glue_tasks.load_split(glue_tasks.get_task("sst2"), "dev", tmp_path)
    (bad / "dev.tsv").write_text("sentence\tlabel\ngood movie\tpositive\n")
    with pytest.raises(UserError, match=r"dev.tsv:2: label 'positive' is not one of"):
        glue_tasks.load_split(glue_tasks.get_task("sst2"), "dev", tmp_path)
    (bad / "dev.tsv").write_text("text\tlabel\ngood movie\t1\n")
    with pytest.raises(UserError, match="lacks the columns"):
        glue_tasks.load_split(glue_tasks.get_task("sst2"), "dev", tmp_path)


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    from jaxpeft.models.hf_weights import load_tokenizer

    return load_tokenizer(minilm_dir)


def test_encode_pairs_truncation_and_token_types(glue, tokenizer):
    ex = glue_tasks.load_split(glue_tasks.get_task("rte"), "dev", glue)
    enc = encoding.encode(tokenizer, ex, max_length=64)
    assert enc.input_ids.shape == (277, 64) and enc.lengths.max() == 64
    ref = tokenizer(ex.texts[0][0], ex.texts[1][0], truncation=True, max_length=64)
    n = enc.lengths[0]
    assert list(enc.input_ids[0, :n]) == ref["input_ids"]
    assert list(enc.token_type_ids[0, :n]) == ref["token_type_ids"]
    assert (enc.input_ids[0, n:] == 0).all()


def test_buckets():
    assert batching.length_buckets(128) == (16, 32, 64, 128)
    assert batching.length_buckets(100) == (16, 32, 64, 100)
    assert batching.bucket_for(17, (16, 32)) == 32
    with pytest.raises(ValueError):
        batching.bucket_for(33, (16, 32))


def test_epoch_order_covers_every_example_once_and_is_deterministic():
    lengths = np.random.default_rng(0).integers(3, 128, size=1003)
    a = batching.epoch_order(lengths, 32, seed=1, epoch=0)
    b = batching.epoch_order(lengths, 32, seed=1, epoch=0)
    c = batching.epoch_order(lengths, 32, seed=1, epoch=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    flat = np.concatenate(a)
    assert sorted(flat[flat >= 0].tolist()) == list(range(1003))
    assert all(len(x) == 32 for x in a) and (flat < 0).sum() == 32 * len(a) - 1003


def _lengths_only(lengths: np.ndarray) -> encoding.Encoded:
    ids = (np.arange(int(lengths.max()))[None] < lengths[:, None]).astype(np.int32)
    return encoding.Encoded(ids, np.zeros_like(ids), lengths.astype(np.int32), np.zeros(len(lengths), np.int32))


def _members(order: list[np.ndarray]) -> list[frozenset]:
    return [frozenset(b[b >= 0].tolist()) for b in order]


def test_group_by_length_sorts_inside_pools_and_off_takes_random_batches():
    """``group_by_length`` (the default): a batch holds examples of similar lengths, all from one pool
    of 50 batches of the epoch's shuffled examples, sorted by length inside the pool. Off: a batch's
    examples are the shuffled examples taken ``batch_size`` at a time (a uniformly random sample).
    Either way every example comes once per epoch and the order is a function of (seed, epoch)."""
    n, size, seed = 5000, 32, 4
    lengths = np.random.default_rng(0).integers(3, 129, size=n)
    enc = _lengths_only(lengths)
    grouped = batching.BucketBatches(enc, size, 128, seed)
    shuffled = batching.BucketBatches(enc, size, 128, seed, group_by_length=False)
    assert grouped.group_by_length and not shuffled.group_by_length
    spread = lambda order: np.mean([lengths[b[b >= 0]].std() for b in order])   # noqa: E731
    for epoch in (0, 1):
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        for bb in (grouped, shuffled):
            order = bb.order(epoch)
            flat = np.concatenate(order)
            assert sorted(flat[flat >= 0].tolist()) == list(range(n))       # every example once
            assert all(len(b) == size for b in order) and len(order) == -(-n // size)
            again = batching.BucketBatches(enc, size, 128, seed, group_by_length=bb.group_by_length)
            assert all(np.array_equal(a, b) for a, b in zip(again.order(epoch), order))
            assert _members(bb.order(1 - epoch)) != _members(order)
        # off: the batches are the plain permutation in chunks (whatever order the batches then take)
        chunks = {frozenset(perm[s:s + size].tolist()) for s in range(0, n, size)}
        assert set(_members(shuffled.order(epoch))) == chunks
        # on: each batch lies in one pool of 50 batches; inside a pool the batches do not overlap in length
        pool_of = np.empty(n, np.int64)
        pool_of[perm] = np.arange(n) // (size * batching.BucketBatches.POOL)
        by_pool: dict[int, list[tuple[int, int]]] = {}
        for b in grouped.order(epoch):
            b = b[b >= 0]
            assert len(set(pool_of[b].tolist())) == 1
            by_pool.setdefault(int(pool_of[b[0]]), []).append((int(lengths[b].min()), int(lengths[b].max())))
        for spans in by_pool.values():
            spans.sort()
            assert all(hi <= lo for (_, hi), (lo, _) in zip(spans, spans[1:]))
        assert set(_members(grouped.order(epoch))) != chunks
        # lengths inside a batch: close together when grouped, as spread as the whole set when not
        assert spread(grouped.order(epoch)) < 0.1 * lengths.std()
        assert spread(shuffled.order(epoch)) > 0.8 * lengths.std()


def test_no_group_by_length_flag_reaches_the_training_batches(glue, tiny_bert_dir, tmp_path):
    from jaxpeft import config
    from jaxpeft.training import single

    flags = ["--method=bitfit", "--task=rte", f"--model={tiny_bert_dir}", f"--data_dir={glue}",
             f"--output_dir={tmp_path}", "--max_train_examples=200", "--max_eval_examples=16",
             "--batch_size=16", "--max_seq_length=64", "--seed=3", "--no-progress"]
    unset = config.parse_args(flags)
    assert unset.data.group_by_length is None
    single.SingleTask(unset, echo=lambda s: None)
    assert unset.data.group_by_length is True          # RTE's loss is a mean over examples: grouped
    cfg = config.parse_args(flags + ["--no-group_by_length"])
    assert cfg.data.group_by_length is False and cfg.to_flat()["group_by_length"] is False
    job = single.SingleTask(cfg, echo=lambda s: None)
    assert not cfg.data.packing      # RTE's BitFit config pads batches to length buckets
    assert isinstance(job.batches, batching.BucketBatches) and job.batches.group_by_length is False
    assert job.cfg.resume_settings(job.compute)["group_by_length"] is False   # a resumed run must keep it
    n = len(job.train_data)
    perm = np.random.default_rng([3, 0]).permutation(n)
    assert set(_members(job.batches.order(0))) == {frozenset(perm[s:s + 16].tolist()) for s in range(0, n, 16)}


def test_batches_pad_to_buckets_with_little_waste(glue, tokenizer):
    ex = glue_tasks.load_split(glue_tasks.get_task("sst2"), "dev", glue)
    enc = encoding.encode(tokenizer, ex, max_length=64)
    buckets = batching.length_buckets(64)
    order = batching.epoch_order(enc.lengths, 32, seed=0, epoch=0)
    shapes, real_tokens, padded_tokens = set(), 0, 0
    for idx in order:
        b = batching.make_batch(enc, idx, buckets)
        shapes.add(b["input_ids"].shape)
        real = b["weights"] > 0
        assert (b["attention_mask"][real].sum(1) == enc.lengths[idx[real]]).all()
        assert (b["labels"][real] == enc.labels[idx[real]]).all()
        real_tokens += int(b["attention_mask"][real].sum())
        padded_tokens += b["input_ids"].size
    assert shapes <= {(32, w) for w in buckets}
    assert real_tokens / padded_tokens > 0.6
    ev = batching.eval_order(enc.lengths, 100)
    seen = np.concatenate(ev)
    assert sorted(seen[seen >= 0].tolist()) == list(range(len(enc)))


@pytest.mark.parametrize("task", ["sst2", "mrpc", "rte"])
def test_fast_encoding_equals_the_transformers_tokenizer(task, glue, minilm_dir):
    """The ``tokenizers`` path on tokenizer.json gives transformers' ids, token types and lengths
    (single sentences and pairs, truncated longest-first), and the cache returns the same."""
    from jaxpeft.models.hf_weights import load_tokenizer

    tok = load_tokenizer(minilm_dir)
    ex = glue_tasks.load_split(glue_tasks.get_task(task), "dev", glue).take(300)
    fast = encoding.encode(tok, ex, 48)
    slow = encoding.encode(tok.hf, ex, 48)
    for k in ("input_ids", "token_type_ids", "lengths"):
        np.testing.assert_array_equal(getattr(fast, k), getattr(slow, k), err_msg=k)
    assert (fast.lengths == 48).any() and tok.pad_token_id == tok.hf.pad_token_id
    cached = encoding.encode_cached(tok, ex, 48)
    again = encoding.encode_cached(tok, ex, 48)
    for k in ("input_ids", "token_type_ids", "lengths"):
        np.testing.assert_array_equal(getattr(cached, k), getattr(fast, k))
        np.testing.assert_array_equal(getattr(again, k), getattr(fast, k))


def test_the_data_cache_is_keyed_by_the_tokenizing_code(tmp_path, monkeypatch, glue, minilm_dir):
    """A split cached by other tokenizing code (an edit of encoding.py or tokenizing.py, another
    tokenizers or transformers version) is not read: the key changes and the split is tokenized
    again, where a stale entry at the old key would have been returned."""
    import shutil
    from pathlib import Path

    from jaxpeft.models.hf_weights import load_tokenizer

    here = Path(encoding.__file__).resolve().parent
    code = tmp_path / "code"
    code.mkdir()
    for name in ("encoding.py", "tokenizing.py"):
        shutil.copy(here / name, code / name)
    digest = encoding.code_digest(str(code))
    assert digest == encoding.code_digest()               # the copy is the code
    for name in ("encoding.py", "tokenizing.py"):
        with open(code / name, "a") as f:
            f.write("\n# edited\n")
        encoding.code_digest.cache_clear()
        edited = encoding.code_digest(str(code))
        assert edited != digest, name
        digest = edited
    encoding.code_digest.cache_clear()

    tok = load_tokenizer(minilm_dir)
    ex = glue_tasks.load_split(glue_tasks.get_task("sst2"), "dev", glue).take(50)
    monkeypatch.setenv("JAXPEFT_DATA_CACHE", str(tmp_path / "cache"))
    first = encoding.encode_cached(tok, ex, 48)
    path = encoding.cache_path(tmp_path / "cache", tok, ex, 48)
    assert path.is_file() and encoding.cache_path(tmp_path / "cache", tok, ex, 32) != path
    # a stale entry: what older code wrote at this key
    np.savez(path, input_ids=np.zeros_like(first.input_ids), token_type_ids=first.token_type_ids,
             lengths=first.lengths)
    assert not encoding.encode_cached(tok, ex, 48).input_ids.any()     # the same code reads it
    monkeypatch.setattr(encoding, "code_digest", lambda folder=None: "other code")
    assert encoding.cache_path(tmp_path / "cache", tok, ex, 48) != path
    np.testing.assert_array_equal(encoding.encode_cached(tok, ex, 48).input_ids, first.input_ids)


def test_a_write_cut_off_by_its_process_ending_is_removed_by_the_next_one(tmp_path, monkeypatch, glue, minilm_dir):
    """A process that ends while its background thread writes a cache entry leaves the half-written
    file behind; the next write removes it, and leaves a running process's file alone."""
    import os
    import subprocess
    import sys

    from jaxpeft.models.hf_weights import load_tokenizer

    root = tmp_path / "cache"
    root.mkdir()
    # a process that starts its entry and ends before finishing it
    code = ("import os, sys; p = os.path.join(sys.argv[1], f'.0123abcd.npz.{os.getpid()}.npz'); "
            "open(p, 'wb').write(b'PK half'); print(p)")
    orphan = subprocess.run([sys.executable, "-c", code, str(root)], check=True, capture_output=True,
                            text=True).stdout.strip()
    running = root / f".4567cdef.npz.{os.getppid()}.npz"
    running.write_bytes(b"PK writing")
    monkeypatch.setenv("JAXPEFT_DATA_CACHE", str(root))
    tok = load_tokenizer(minilm_dir)
    ex = glue_tasks.load_split(glue_tasks.get_task("sst2"), "dev", glue).take(20)
    enc = encoding.encode_cached(tok, ex, 32)
    assert not os.path.exists(orphan) and running.is_file()
    entries = sorted(p.name for p in root.iterdir())
    assert entries == sorted([running.name, encoding.cache_path(root, tok, ex, 32).name])
    np.testing.assert_array_equal(encoding.encode_cached(tok, ex, 32).input_ids, enc.input_ids)


def test_vocabulary_and_special_tokens_without_transformers_equal_transformers(minilm_dir):
    """What prompt initialisation samples from comes from tokenizer.json (no transformers import),
    the same as transformers' tokenizer gives."""
    from transformers import AutoTokenizer

    from jaxpeft.methods.prompt import ordinary_token_ids
    from jaxpeft.data.tokenizing import Tokenizer

    ours, ref = Tokenizer(minilm_dir), AutoTokenizer.from_pretrained(str(minilm_dir))
    assert ours.get_vocab() == ref.get_vocab()
    assert ours.all_special_ids == sorted(ref.all_special_ids)
    assert ours._hf is None                      # transformers' tokenizer was never loaded
    np.testing.assert_array_equal(ordinary_token_ids(ours), ordinary_token_ids(ref))


def _brute_force_cost(train, evals, chosen, row, program):
    """The expected seconds of padding to ``chosen``, counted by hand (the planner's reference)."""
    seconds, programs = 0.0, 0
    for rows, is_train in ((train, True), (evals, False)):
        used = set()
        for w, n in rows.items():
            b = min(c for c in chosen if c >= w)
            used.add(b)
            seconds += n * row(b, is_train)
        programs += len(used)
    return seconds + programs * program


def test_plan_buckets_weighs_compiling_against_padding():
    ladder = batching.length_buckets(256)                      # (16, 32, 64, 128, 256)
    row = lambda w, train: w * (3.0 if train else 1.0) * 1e-6  # noqa: E731  (seconds per row)
    train, evals = {16: 50_000, 64: 20_000, 256: 1_000}, {16: 2_000, 256: 500}
    # compiling is free: every length in use, none that no batch has
    assert batching.plan_buckets(train, evals, ladder, row, 0.0) == (16, 64, 256)
    # compiling is dear: one length
    assert batching.plan_buckets(train, evals, ladder, row, 1e6) == (256,)
    # in between: the plan is the cheapest subset, by hand over all of them
    import itertools
    for program in (0.05, 0.5, 2.0, 5.0, 20.0):
        plan = batching.plan_buckets(train, evals, ladder, row, program)
        best = min(_brute_force_cost(train, evals, sub + (256,), row, program)
                   for k in range(4) for sub in itertools.combinations((16, 64), k))
        assert _brute_force_cost(train, evals, plan, row, program) == pytest.approx(best)
    # by hand at 20 s a program: (256,) 95.2 s, (16, 256) 98.7, (64, 256) 94.5, (16, 64, 256) 107.0
    assert batching.plan_buckets(train, evals, ladder, row, 20.0) == (64, 256)
    # a tie keeps the finer plan
    assert batching.plan_buckets({16: 1}, {}, ladder, lambda w, t: 0.0, 0.0) == (16, 256)


def test_chosen_buckets_pad_batches_but_keep_the_order(glue, tokenizer):
    ex = glue_tasks.load_split(glue_tasks.get_task("rte"), "dev", glue)
    enc = encoding.encode(tokenizer, ex, max_length=128)
    fine = batching.BucketBatches(enc, 16, 128, seed=3)
    coarse = batching.BucketBatches(enc, 16, 128, seed=3)
    coarse.use_buckets((64, 128))
    for e in (0, 1):
        assert all(np.array_equal(a, b) for a, b in zip(fine.order(e), coarse.order(e)))
        assert batching.order_digest(fine.order(e)) == batching.order_digest(coarse.order(e))
    widths = {coarse.batch(i)["input_ids"].shape[1] for i in coarse.order(0)}
    assert widths <= {64, 128} and len({fine.batch(i)["input_ids"].shape[1] for i in fine.order(0)}) > 2
    rows = fine.ladder_rows(0)
    assert sum(rows.values()) == 16 * fine.steps_per_epoch and set(rows) <= set(fine.ladder)
    for i in coarse.order(0)[:5]:                         # same examples, more padding
        a, b = fine.batch(i), coarse.batch(i)
        w = a["input_ids"].shape[1]
        assert np.array_equal(b["input_ids"][:, :w], a["input_ids"]) and not b["input_ids"][:, w:].any()
        assert np.array_equal(b["attention_mask"].sum(1), a["attention_mask"].sum(1))
    with pytest.raises(ValueError, match="longest length 128"):
        coarse.use_buckets((64,))
