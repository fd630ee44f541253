"""Your own classification / regression files: formats, spreadsheet quirks, label inference, errors."""

import csv
import json

import numpy as np
import pytest

from jaxpeft.errors import UserError
from jaxpeft.tasks import files

# A spreadsheet export: BOM, CRLF, quoted commas, doubled quotes, a line break inside a field, a
# blank line, non-ASCII text. Rows start on physical lines 2, 3, 5, 7 and 8.
TRICKY = ('\ufeffsentence,label,extra\r\n'
          'plain text,pos,1\r\n'
          '"with, a comma and ""quotes""","neg",2\r\n'
          '\r\n'
          '"two\r\nlines",pos,3\r\n'
          '"trailing space ",neg,4\r\n'
          'naïve café — ok,pos,5\r\n')
EXPECTED = [["plain text", "pos"], ['with, a comma and "quotes"', "neg"], ["two\r\nlines", "pos"],
            ["trailing space ", "neg"], ["naïve café — ok", "pos"]]


def write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding))
    return path


def test_tricky_csv_matches_pandas(tmp_path):
    p = write(tmp_path / "train.csv", TRICKY)
    ex = files.read_examples(p, "sentence")
    got = [[t, ex.label_names[k]] for t, k in zip(ex.texts[0], ex.labels)]
    assert got == EXPECTED
    pd = pytest.importorskip("pandas")
    ref = pd.read_csv(p, encoding="utf-8-sig", dtype=str, keep_default_na=False)
    assert ex.texts[0] == ref["sentence"].tolist()
    assert [ex.label_names[k] for k in ex.labels] == ref["label"].tolist()
    assert ex.label_names == ("neg", "pos") and ex.task_type == "classification"


def test_tricky_csv_matches_csv_module(tmp_path):
    p = write(tmp_path / "train.csv", TRICKY)
    with open(p, encoding="utf-8-sig", newline="") as f:
        rows = [r for r in csv.reader(f) if r][1:]
    assert [r[:2] for r in rows] == EXPECTED
    header, records = files.read_records(p)
    assert header == ["sentence", "label", "extra"]
    assert [line for line, _ in records] == [2, 3, 5, 7, 8]


def test_tsv_pairs_and_error_lines_count_physical_lines(tmp_path):
    text = 'a\tb\tscore\r\nx\t"y\ny"\t0.5\r\nu\tv\t\r\n'
    p = write(tmp_path / "dev.tsv", text)
    with pytest.raises(UserError, match=r"dev\.tsv:4: empty label in column 'score'"):
        files.read_examples(p, ["a", "b"], "score")
    p = write(tmp_path / "train.tsv", 'a\tb\tscore\nx\t"y\ny"\t0.5\nu\tv\t2\n')
    ex = files.read_examples(p, ["a", "b"], "score")
    assert ex.texts == (["x", "u"], ["y\ny", "v"])
    assert ex.task_type == "regression" and ex.label_names is None
    np.testing.assert_array_equal(ex.labels, np.array([0.5, 2.0], np.float32))
    assert ex.labels.dtype == np.float32 and ex.num_labels == 1


def test_json_jsonl_and_data_object_agree(tmp_path):
    recs = [{"text": "a", "label": 2}, {"text": "b", "label": 10}, {"text": "c", "label": 2}]
    p1 = write(tmp_path / "t.json", json.dumps(recs, indent=1))
    p2 = write(tmp_path / "t.jsonl", "\n".join(json.dumps(r) for r in recs) + "\n\n")
    p3 = write(tmp_path / "t2.json", json.dumps({"version": 1, "data": recs}))
    got = [files.read_examples(p, "text") for p in (p1, p2, p3)]
    for ex in got:
        assert ex.texts == (["a", "b", "c"],)
        assert ex.label_names == ("2", "10")          # numbers sort numerically, named as strings
        assert ex.labels.tolist() == [0, 1, 0] and ex.labels.dtype == np.int32


def test_label_inference_rules(tmp_path):
    def labels_of(values, **kw):
        p = tmp_path / "x.jsonl"
        p.write_text("".join(json.dumps({"t": "s", "y": v}) + "\n" for v in values))
        return files.read_examples(p, "t", "y", **kw)

    ex = labels_of(["b", "a", "c", "a"])
    assert (ex.task_type, ex.label_names, ex.labels.tolist()) == ("classification", ("a", "b", "c"),
                                                                   [1, 0, 2, 0])
    ex = labels_of([1, "1.0", "01", 0])               # integral numbers, however written: one class
    assert ex.label_names == ("0", "1") and ex.labels.tolist() == [1, 1, 1, 0]
    assert labels_of([0.5, 1, 2]).task_type == "regression"
    assert labels_of(["0.5", "x"]).label_names == ("0.5", "x")     # not all numbers: classification
    assert labels_of([1, 2, 3], task_type="regression").labels.dtype == np.float32
    ex = labels_of([0.5, 1.5, 0.5], task_type="classification")
    assert ex.label_names == ("0.5", "1.5") and ex.labels.tolist() == [0, 1, 0]
    # the rule itself, as run_glue sorts label_list
    assert files.class_names(["10", "9", "-1"]) == ("-1", "9", "10")
    assert files.class_names(["b", "B", "a"]) == ("B", "a", "b")
    assert files.infer_task_type(["1", "2"]) == "classification"
    assert files.infer_task_type(["1", "2.25"]) == "regression"


def test_dev_and_test_files_use_the_training_labels(tmp_path):
    train = files.read_examples(write(tmp_path / "train.csv", "text,label\na,pos\nb,neg\n"), "text")
    dev = files.read_examples(write(tmp_path / "dev.csv", "text,label\nc,neg\n"), "text", reference=train)
    assert dev.label_names == train.label_names and dev.labels.tolist() == [0]
    single = files.read_examples(write(tmp_path / "one.csv", "text,label\nc,pos\n"), "text")
    assert single.label_names == ("pos",)
    test = files.read_examples(write(tmp_path / "test.csv", "text\nd\ne\n"), "text", reference=train)
    assert test.labels is None and test.label_names == ("neg", "pos") and len(test) == 2
    bad = write(tmp_path / "dev2.csv", 'text,label\nc,neg\n"multi\nline",neutral\n')
    with pytest.raises(UserError, match=r"dev2\.csv:3: label 'neutral' is not one of the training "
                                        r"labels \['neg', 'pos'\]"):
        files.read_examples(bad, "text", reference=train)
    reg = files.read_examples(write(tmp_path / "r.csv", "text,label\na,0.5\n"), "text")
    with pytest.raises(UserError, match=r"rdev\.csv:2: label 'high' in column 'label' is not a number"):
        files.read_examples(write(tmp_path / "rdev.csv", "text,label\na,high\n"), "text", reference=reg)


def test_holdout_is_seeded_and_disjoint(tmp_path):
    rows = "".join(f"s{i},{i % 3}\n" for i in range(50))
    ex = files.read_examples(write(tmp_path / "t.csv", "text,label\n" + rows), "text")
    tr, va = files.holdout(ex, 0.2, seed=3)
    assert (len(tr), len(va)) == (40, 10)
    assert sorted(tr.texts[0] + va.texts[0]) == sorted(ex.texts[0])
    assert not set(tr.texts[0]) & set(va.texts[0])
    assert tr.label_names == va.label_names == ex.label_names
    _tr2, va2 = files.holdout(ex, 0.2, seed=3)
    assert va2.texts == va.texts and np.array_equal(va2.labels, va.labels)
    assert files.holdout(ex, 0.2, seed=4)[1].texts != va.texts
    for i, t in enumerate(va.texts[0]):                     # labels travel with their texts
        assert ex.labels[ex.texts[0].index(t)] == va.labels[i]
    with pytest.raises(UserError, match="between 0 and 1"):
        files.holdout(ex, 1.0)


@pytest.mark.parametrize("name,content,kw,message", [
    ("t.csv", "text,lbl\na,1\n", {"text_columns": "sentence"},
     r"t\.csv: no column 'sentence'; the header has columns \['text', 'lbl'\]"),
    ("t.csv", "text,lbl\na,1\n", {"text_columns": "text"},
     r"t\.csv: no label column 'label'; the header has columns \['text', 'lbl'\]"),
    ("t.jsonl", '{"text": "a", "label": 1}\n', {"text_columns": ["text", "text2"]},
     r"t\.jsonl: no column 'text2'; the first record has fields \['text', 'label'\]"),
    ("t.csv", "text,label\na,1\nb,\nc,0\n", {"text_columns": "text"},
     r"t\.csv:3: empty label in column 'label'"),
    ("t.csv", "text,label\na,1\nb, \n", {"text_columns": "text"}, r"t\.csv:3: empty label"),
    ("t.jsonl", '{"text": "a", "label": 1}\n\n{"text": "b", "label": null}\n', {"text_columns": "text"},
     r"t\.jsonl:3: empty label in column 'label'"),
    ("t.json", '[{"text": "a", "label": 1},\n {"text": "b",\n  "label": ""}]', {"text_columns": "text"},
     r"t\.json:2: empty label in column 'label'"),
    ("t.csv", "", {"text_columns": "text"}, r"t\.csv: file is empty"),
    ("t.jsonl", "\n  \n", {"text_columns": "text"}, r"t\.jsonl: file is empty"),
    ("t.csv", "text,label\n", {"text_columns": "text"}, r"t\.csv: no rows after the header"),
    ("t.json", "[]", {"text_columns": "text"}, r"t\.json: no records"),
    ("t.txt", "text\tlabel\na\t1\n", {"text_columns": "text"},
     r"t\.txt: cannot tell the format from the extension '\.txt'"),
    ("t.csv", "text,label\na,1\n", {"text_columns": "text", "file_format": "xlsx"},
     r"t\.csv: unknown file format 'xlsx'"),
    ("t.csv", "text,label\na,1\nb,2,3\n", {"text_columns": "text"},
     r"t\.csv:3: row has 3 fields, the header has 2"),
    ("t.jsonl", '{"text": "a", "label": 1}\n{"text": "b", label: 2}\n', {"text_columns": "text"},
     r"t\.jsonl:2: invalid JSON"),
    ("t.json", '[{"text": "a", "label": 1},\n\n {"text": "b" "label": 2}]', {"text_columns": "text"},
     r"t\.json:3: invalid JSON"),
    ("t.json", '[{"text": "a", "label": 1}, 7]', {"text_columns": "text"},
     r"t\.json:1: expected a JSON object, got int"),
    ("t.json", '{"rows": []}', {"text_columns": "text"}, r"t\.json: a JSON object file needs a 'data' list"),
    ("t.csv", "text,label\na,1\n", {"text_columns": "text", "task_type": "ordinal"},
     r"task_type 'ordinal'"),
    ("t.csv", "text,label\na,x\n", {"text_columns": "text", "task_type": "regression"},
     r"t\.csv:2: label 'x' in column 'label' is not a number"),
])
def test_bad_files(tmp_path, name, content, kw, message):
    p = write(tmp_path / name, content)
    with pytest.raises(UserError, match=message) as e:
        files.read_examples(p, **kw)
    assert "\n" not in str(e.value)


def test_not_utf8_names_file_and_line(tmp_path):
    p = tmp_path / "latin1.csv"
    p.write_bytes("text,label\r\nok,1\r\ncaf\xe9,0\r\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1\.csv:3: byte 0xe9 at column 4 is not UTF-8"):
        files.read_examples(p, "text")
    with pytest.raises(UserError, match=r"nope\.csv: file not found"):
        files.read_examples(tmp_path / "nope.csv", "text")


def test_file_format_overrides_the_extension(tmp_path):
    p = write(tmp_path / "data.txt", "text\tlabel\na,b\tx\n")
    assert files.read_examples(p, "text", file_format="tsv").texts == (["a,b"],)
    assert files.read_examples(p, "text", file_format=".TSV").labels.tolist() == [0]


def test_local_dataset_folder_through_datasets(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    d = tmp_path / "mydata"
    d.mkdir()
    write(d / "train.csv", 'text,label\n"a, b",pos\nc,neg\nd,pos\n')
    write(d / "test.csv", "text,label\ne,neg\n")
    train = files.load_hub_dataset(str(d), None, "train", "text")
    assert train.texts == (["a, b", "c", "d"],) and train.label_names == ("neg", "pos")
    assert train.labels.tolist() == [1, 0, 1]
    assert files.read_examples(d / "train.csv", "text").labels.tolist() == train.labels.tolist()
    test = files.load_hub_dataset(str(d), None, "test", "text", reference=train)
    assert test.labels.tolist() == [0]
    with pytest.raises(UserError, match=r"mydata/validation: the dataset could not be loaded"):
        files.load_hub_dataset(str(d), None, "validation", "text")
    with pytest.raises(UserError, match=r"no column 'sentence'; the dataset has columns \['text', 'label'\]"):
        files.load_hub_dataset(str(d), None, "train", "sentence")
    # a ClassLabel feature (declared in the folder's README card) gives the class names
    c = tmp_path / "classlabel"
    c.mkdir()
    write(c / "train.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n')
    write(c / "README.md", "---\ndataset_info:\n  features:\n  - name: text\n    dtype: string\n"
          "  - name: label\n    dtype:\n      class_label:\n        names:\n          '0': neg\n"
          "          '1': pos\n---\n")
    assert isinstance(datasets.load_dataset(str(c), split="train").features["label"], datasets.ClassLabel)
    ex = files.load_hub_dataset(str(c), None, "train", "text")
    assert ex.label_names == ("neg", "pos") and ex.labels.tolist() == [1, 0]


def test_glue_tsv_files_read_as_the_glue_reader_does(glue):
    from jaxpeft.tasks import glue as glue_tasks

    for task, cols, label in [("rte", ["sentence1", "sentence2"], "label"),
                              ("mrpc", ["#1 String", "#2 String"], "Quality"),
                              ("stsb", ["sentence1", "sentence2"], "score")]:
        t = glue_tasks.get_task(task)
        ref = glue_tasks.load_split(t, "dev", glue)
        ex = files.read_examples(glue / t.folder / "dev.tsv", cols, label, quotes=False)
        assert ex.texts == ref.texts
        assert ex.task_type == ("regression" if t.is_regression else "classification")
        if t.is_regression:
            np.testing.assert_array_equal(ex.labels, ref.labels)
        else:   # GLUE's own class order, and ours (sorted), agree on these tasks
            assert ex.label_names == t.file_labels and ex.labels.tolist() == ref.labels.tolist()
    with pytest.raises(UserError, match=r"MRPC/dev\.tsv:365: row has 4 fields, the header has 5 "
                                        r"\(quotes inside the text\? read it with quotes=False\)"):
        files.read_examples(glue / "MRPC" / "dev.tsv", ["#1 String", "#2 String"], "Quality")


def test_duplicate_header_names(tmp_path):
    p = write(tmp_path / "d.csv", "text,label,text\na,1,b\n")
    with pytest.raises(UserError, match=r"d\.csv:1: the header names \['text'\] more than once"):
        files.read_examples(p, "text")
