#!/usr/bin/env python
"""A SQuAD folder with a train file of the real train set's size, for timing the full-size job.

SQuAD v1.1's train set (87,599 questions in 442 articles) is on the hub, not in the offline copy,
which has only the dev set. This writes ``OUT/dev-v1.1.json`` (a copy of the dev file) and beside it
``OUT/train-v1.1.json``: the dev set's articles repeated, titles numbered, until it holds at least
``--questions`` questions. ``--task=squad`` on ``OUT`` then trains on the stand-in and evaluates on the
whole dev set, the shape of a user's job with the real files: the same number of windows a epoch,
the same lengths, the same evaluation. Its scores mean nothing (it trains on the questions it
evaluates); it exists only to time the job at full size, ours and the peer's alike::

    python benchmarks/squad_standin.py --dev=../shared/data/squad/dev-v1.1.json --out=/tmp/squad-full
    python -m benchmarks.job --method=bitfit --task=squad --data_dir=/tmp/squad-full --runs=cold --peer=eager
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

#: Questions in SQuAD v1.1's official train set.
TRAIN_QUESTIONS = 87_599


def questions(article: dict) -> int:
    return sum(len(p["qas"]) for p in article["paragraphs"])


def standin(dev: dict, n_questions: int = TRAIN_QUESTIONS) -> dict:
    """``dev``'s articles repeated, in order, until at least ``n_questions`` questions; each copy's
    titles and question ids get the copy's number, so ids stay unique."""
    articles, total, copy = [], 0, 0
    while total < n_questions:
        for article in dev["data"]:
            if total >= n_questions:
                break
            a = json.loads(json.dumps(article))
            a["title"] = f"{a['title']} ({copy})"
            for p in a["paragraphs"]:
                for qa in p["qas"]:
                    qa["id"] = f"{qa['id']}-{copy}"
            articles.append(a)
            total += questions(a)
        copy += 1
    return {"version": dev.get("version", "1.1"), "data": articles}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dev", required=True, help="the official dev-v1.1.json")
    ap.add_argument("--out", required=True, help="folder to write dev-v1.1.json and train-v1.1.json into")
    ap.add_argument("--questions", type=int, default=TRAIN_QUESTIONS)
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = json.loads(Path(a.dev).read_text(encoding="utf-8"))
    train = standin(dev, a.questions)
    shutil.copyfile(a.dev, out / "dev-v1.1.json")
    (out / "train-v1.1.json").write_text(json.dumps(train), encoding="utf-8")
    n = sum(questions(x) for x in train["data"])
    print(f"{out / 'train-v1.1.json'}: {len(train['data'])} articles, {n} questions (a stand-in: the dev set repeated)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
