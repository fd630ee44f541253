#!/usr/bin/env python
"""How far a head alone can go: the best linear classifier on the frozen encoder's features.

    python -m experiments.bitfit_study.linear_probe --task=rte --data_dir=../shared/data/glue

The frozen setting trains the classification head (and nothing else) by SGD. This computes the
pretrained model's features once, in float32 with transformers' own BERT (an independent code
path), for three read-outs ([CLS], the mean of the attended tokens, BERT's pooler), and fits
scikit-learn's logistic regression on the training split at several regularisation strengths:
the optimum a linear head on these features can reach. For sentence pairs it adds ``pair``: the
two sentences encoded apart, as a sentence-embedding model is used for pairs, and the features
[u, v, |u - v|, u * v] of their means (standardised), and ``cosine``: the one number cos(u, v),
the comparison the bundled sentence-embedding model was trained for (what ``--pooling=cosine``
reads). It prints the train and dev accuracy of each, and the dev set's majority-class rate.
Classification tasks only.
"""

import argparse
import sys

CS = (0.01, 0.1, 1.0, 10.0, 100.0)
PAIR_CS = (0.001, 0.01, 0.1, 1.0)


def features(model, tokenizer, texts, max_length: int, batch: int = 64):
    import numpy as np
    import torch

    def mean(cols):
        enc = tokenizer(*cols, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        o = model(**enc)
        h, m = o.last_hidden_state, enc["attention_mask"][..., None].float()
        return o, h, ((h * m).sum(1) / m.sum(1)).numpy()

    pairs = {"pair": [], "cosine": []} if len(texts) == 2 else {}
    out: dict[str, list] = {"cls": [], "mean": [], "pooler": []} | pairs
    with torch.no_grad():
        for i in range(0, len(texts[0]), batch):
            cols = [list(t[i:i + batch]) for t in texts]
            o, h, m = mean(cols)
            out["cls"].append(h[:, 0].numpy())
            out["mean"].append(m)
            out["pooler"].append(o.pooler_output.numpy())
            if "pair" in out:
                u, v = mean(cols[:1])[2], mean(cols[1:])[2]
                out["pair"].append(np.concatenate([u, v, np.abs(u - v), u * v], axis=1))
                cos = (u * v).sum(1) / (np.linalg.norm(u, axis=1) * np.linalg.norm(v, axis=1))
                out["cosine"].append(cos[:, None])
    return {k: np.concatenate(v) for k, v in out.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="rte")
    ap.add_argument("--data_dir", default=None)
    ap.add_argument("--model", default=None, help="a BERT folder (default: the bundled MiniLM)")
    ap.add_argument("--max_seq_length", type=int, default=256)
    a = ap.parse_args(argv)
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from transformers import AutoModel, AutoTokenizer

    from jaxpeft.tasks import glue
    from jaxpeft.models.hf_weights import resolve_model_dir

    task = glue.get_task(a.task)
    if task.is_regression:
        print(f"error: --task={a.task} is a regression task", file=sys.stderr)
        return 2
    model_dir = resolve_model_dir(a.model or "sentence-transformers/all-MiniLM-L6-v2")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModel.from_pretrained(str(model_dir)).eval()
    train = glue.load_split(task, "train", a.data_dir)
    dev = glue.load_split(task, task.eval_splits[0], a.data_dir)
    ftr, fdv = (features(model, tokenizer, s.texts, a.max_seq_length) for s in (train, dev))
    ytr, ydv = np.asarray(train.labels), np.asarray(dev.labels)
    majority = max(np.mean(ydv == c) for c in np.unique(ydv))
    print(f"# Linear probe: {a.task}, {a.model or 'the bundled MiniLM'}, length {a.max_seq_length}\n")
    print(f"dev majority class: {100 * majority:.1f}%\n")
    print("| read-out | C | train acc | dev acc |\n|---|---:|---:|---:|")
    for k in ftr:
        for c in PAIR_CS if k == "pair" else CS:
            clf = LogisticRegression(C=c, max_iter=5000)
            clf = (make_pipeline(StandardScaler(), clf) if k == "pair" else clf).fit(ftr[k], ytr)
            print(f"| {k} | {c:g} | {100 * clf.score(ftr[k], ytr):.1f} | {100 * clf.score(fdv[k], ydv):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
