"""Importers: tiny hand-written XC and ARFF files parsed to known matrices, bad input reported by file and
line, the import directory's layout, the CLI, and the shipped sample data against the published statistics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pmi_pipeline.cli import main
from pmi_pipeline.errors import PipelineError, ShardError
from pmi_pipeline.features import load_split, read_label_names
from pmi_pipeline.importers import (
    import_arff,
    import_xc,
    meka_label_count,
    parse_arff,
    parse_xc,
    read_mulan_xml,
)


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- Extreme Classification Repository format ---------------------------------------------------------------

XC_TEXT = """4 5 3
0,2 0:1 3:0.5
 1:2
1
2,2,0 4:-1.5 0:3
"""
XC_Y = np.array([[1, 0, 1], [0, 0, 0], [0, 1, 0], [1, 0, 1]])
XC_X = np.array([[1, 0, 0, 0.5, 0], [0, 2, 0, 0, 0], [0, 0, 0, 0, 0], [3, 0, 0, 0, -1.5]])


def test_parse_xc(tmp_path: Path) -> None:
    src = parse_xc(_write(tmp_path / "toy.txt", XC_TEXT))
    np.testing.assert_array_equal(src.Y.toarray(), XC_Y)
    np.testing.assert_array_equal(src.X.toarray(), XC_X.astype(np.float32))
    assert src.X.dtype == np.float32
    assert src.label_names == ["0", "1", "2"]
    np.testing.assert_array_equal(src.lines, [2, 3, 4, 5])
    assert src.format == "xc"


def test_parse_xc_label_names_and_crlf(tmp_path: Path) -> None:
    names = _write(tmp_path / "names.txt", "alpha\nbeta gamma\ndelta\\'x\n")
    src = parse_xc(_write(tmp_path / "toy.txt", XC_TEXT.replace("\n", "\r\n")), label_names=names)
    assert src.label_names == ["alpha", "beta gamma", "delta\\'x"]
    np.testing.assert_array_equal(src.Y.toarray(), XC_Y)
    with pytest.raises(ShardError, match="2 label names for 3 labels"):
        parse_xc(tmp_path / "toy.txt", label_names=_write(tmp_path / "two.txt", "a\nb\n"))


def test_parse_headerless_libsvm(tmp_path: Path) -> None:
    # yeast's layout: no header, labels 0-based, features 1-based
    src = parse_xc(_write(tmp_path / "y.txt", "0,1 1:0.5 3:2\n2 2:1\n"))
    assert src.format == "libsvm"
    np.testing.assert_array_equal(src.X.toarray(), [[0.5, 0, 2], [0, 1, 0]])
    np.testing.assert_array_equal(src.Y.toarray(), [[1, 1, 0], [0, 0, 1]])
    # a header-less file that uses feature 0 is read as 0-based
    src = parse_xc(_write(tmp_path / "z.txt", "0 0:1 2:2\n"))
    np.testing.assert_array_equal(src.X.toarray(), [[1, 0, 2]])


@pytest.mark.parametrize(
    ("text", "line", "match"),
    [
        ("3 4 2\n0 1:1\n1 2:\n0 3:1\n", 3, "not index:value"),  # truncated line
        ("3 4 2\n0 1:1\n1 2:1 3\n0 3:1\n", 3, "not index:value"),  # truncated inside a token pair
        ("3 4 2\n0 1:1\n1 2:1\n", 3, "header says 3 examples"),  # truncated file
        ("3 4 2\n0 1:1\n1,2 2:1\n0 3:1\n", 3, "label index 2 out of range"),
        ("3 4 2\n0 1:1\n1 2:1\n0 4:1\n", 4, "feature index 4 out of range"),
        ("3 4 2\n0 1:1\n1,,0 2:1\n0 3:1\n", 3, "bad label index"),
        ("3 4 2\n0 1:1\n1 2:x\n0 3:1\n", 3, "bad feature value"),
        ("3 4 2\n0 1:1:1\n1 2:1\n0 3:1\n", 2, "bad feature value '1:1'"),
        ("3 4 2\n0 1:1 1:2\n1 2:1\n0 3:1\n", 2, "feature index 1 repeated"),
    ],
)
def test_xc_errors_name_file_and_line(tmp_path: Path, text: str, line: int, match: str) -> None:
    path = _write(tmp_path / "bad.txt", text)
    with pytest.raises(ShardError, match=match) as info:
        parse_xc(path)
    assert info.value.path == str(path)
    assert info.value.row == line
    assert str(info.value).startswith(f"{path}:{line}: ")


# --- ARFF ---------------------------------------------------------------------------------------------------

ARFF_TEXT = """% a comment
@RELATION toy

@attribute f0 numeric
@attribute 'f 1' {0,1}
@attribute lab_a {0,1}
@attribute f2 REAL
@attribute lab_b {0,1}

@data
{0 1.5,3 -2,2 1}
0,1,0,0,1
{}
% a comment between rows
{1 1,4 1}
"""
ARFF_XML = """<?xml version="1.0" encoding="utf-8"?>
<labels xmlns="http://mulan.sourceforge.net/labels">
<label name="lab_b"></label>
<label name="lab_a"></label>
</labels>
"""
# labels in the XML's order (lab_b, lab_a); features f0, 'f 1', f2
ARFF_Y = np.array([[0, 1], [1, 0], [0, 0], [1, 0]])
ARFF_X = np.array([[1.5, 0, -2], [0, 1, 0], [0, 0, 0], [0, 1, 0]])


def test_parse_arff_mulan(tmp_path: Path) -> None:
    xml = _write(tmp_path / "toy.xml", ARFF_XML)
    assert read_mulan_xml(xml) == ["lab_b", "lab_a"]
    src = parse_arff(_write(tmp_path / "toy.arff", ARFF_TEXT), xml=xml)
    assert src.label_names == ["lab_b", "lab_a"]
    assert src.feature_names == ["f0", "f 1", "f2"]
    np.testing.assert_array_equal(src.Y.toarray(), ARFF_Y)
    np.testing.assert_array_equal(src.X.toarray(), ARFF_X.astype(np.float32))
    np.testing.assert_array_equal(src.lines, [11, 12, 13, 15])


def test_parse_arff_meka(tmp_path: Path) -> None:
    first = ARFF_TEXT.replace("@RELATION toy", "@relation 'toy: -C 2 -split 50'")
    src = parse_arff(_write(tmp_path / "first.arff", first))
    assert src.label_names == ["f0", "f 1"]  # the first two attributes
    np.testing.assert_array_equal(src.Y.toarray(), [[1, 0], [0, 1], [0, 0], [0, 1]])
    np.testing.assert_array_equal(src.X.toarray(), [[1, -2, 0], [0, 0, 1], [0, 0, 0], [0, 0, 1]])
    last = ARFF_TEXT.replace("@RELATION toy", "@relation 'toy: -C -2'")
    src = parse_arff(_write(tmp_path / "last.arff", last))
    assert src.label_names == ["f2", "lab_b"]
    np.testing.assert_array_equal(src.Y.toarray(), [[1, 0], [0, 1], [0, 0], [0, 1]])
    assert meka_label_count("IMDB: -C 28") == 28
    assert meka_label_count("bibsonomy_bibtex") is None
    with pytest.raises(PipelineError, match="which attributes are labels"):
        parse_arff(_write(tmp_path / "none.arff", ARFF_TEXT))


def test_xc_and_arff_readers_agree(tmp_path: Path) -> None:
    """The same data in both formats parses to the same matrices."""
    xml = _write(tmp_path / "toy.xml", ARFF_XML)
    arff = parse_arff(_write(tmp_path / "toy.arff", ARFF_TEXT), xml=xml)
    lines = ["4 3 2"]
    for i in range(4):
        labels = ",".join(str(j) for j in np.flatnonzero(ARFF_Y[i]))
        feats = " ".join(f"{j}:{ARFF_X[i, j]:g}" for j in np.flatnonzero(ARFF_X[i]))
        lines.append(f"{labels} {feats}".rstrip())
    xc = parse_xc(_write(tmp_path / "toy.txt", "\n".join(lines) + "\n"), label_names=["lab_b", "lab_a"])
    assert (xc.Y != arff.Y).nnz == 0
    assert (xc.X != arff.X).nnz == 0


@pytest.mark.parametrize(
    ("row", "match"),
    [
        ("{0 1,2}", "malformed sparse row"),
        ("{0 1,2 1", "does not end with"),
        ("{0 1,9 1}", "attribute index 9 out of range"),
        ("{0 1,0 2}", "attribute index 0 repeated"),
        ("{0 x,2 1}", "bad value"),
        ("1,0,1", "dense row has 3 values"),
        ("1,?,1,0,0", "missing values"),
        ("1,0,1,0,yes", "bad value"),
    ],
)
def test_arff_errors_name_file_and_line(tmp_path: Path, row: str, match: str) -> None:
    xml = _write(tmp_path / "toy.xml", ARFF_XML)
    path = _write(tmp_path / "bad.arff", ARFF_TEXT + row + "\n{1 1}\n")
    with pytest.raises(ShardError, match=match) as info:
        parse_arff(path, xml=xml)
    assert info.value.path == str(path)
    assert info.value.row == 16
    assert str(info.value).startswith(f"{path}:16")


def test_arff_header_errors(tmp_path: Path) -> None:
    xml = _write(tmp_path / "toy.xml", ARFF_XML.replace("lab_a", "lab_z"))
    with pytest.raises(ShardError, match="'lab_z' is not an attribute"):
        parse_arff(_write(tmp_path / "toy.arff", ARFF_TEXT), xml=xml)
    text = ARFF_TEXT.replace("@attribute f2 REAL", "@attribute f2 string")
    with pytest.raises(ShardError, match="unsupported attribute type") as info:
        parse_arff(_write(tmp_path / "s.arff", text), xml=tmp_path / "toy.xml")
    assert info.value.row == 7


def test_arff_nominal_values_that_are_not_numbers(tmp_path: Path) -> None:
    text = "@relation 'r: -C 1'\n@attribute y {no,yes}\n@attribute c {red,green,blue}\n@data\nyes,blue\nno,red\n"
    src = parse_arff(_write(tmp_path / "n.arff", text))
    np.testing.assert_array_equal(src.Y.toarray(), [[1], [0]])
    np.testing.assert_array_equal(src.X.toarray(), [[2], [0]])  # Weka's internal value: the index


# --- import directories -------------------------------------------------------------------------------------


def _read_annotations(path: Path) -> dict[int, list[str]]:
    table = pq.read_table(path)
    return dict(zip(table.column("example_id").to_pylist(), table.column("labels").to_pylist(), strict=True))


def test_import_xc_writes_the_import_directory(tmp_path: Path) -> None:
    train = _write(tmp_path / "toy_train.txt", XC_TEXT)
    test = _write(tmp_path / "toy_test.txt", "2 5 3\n1 2:1\n 0:4\n")
    names = _write(tmp_path / "names.txt", "a\nb\nc\n")
    out = tmp_path / "out"
    info = import_xc(train, test, out, label_names=names)

    assert sorted(p.name for p in out.iterdir()) == ["annotations", "dataset.json", "features", "labels.txt"]
    assert json.loads((out / "dataset.json").read_text()) == info
    assert info["name"] == "toy"
    assert (info["format"], info["n_features"], info["n_labels"]) == ("xc", 5, 3)
    assert info["splits"] == {
        "train": {"n_examples": 4, "n_annotations": 5, "n_without_labels": 1},
        "test": {"n_examples": 2, "n_annotations": 1, "n_without_labels": 1},
    }
    assert info["source"]["split"] == {"method": "given"}
    assert read_label_names(out) == ["a", "b", "c"]

    # annotations: list form, examples without labels omitted, ids train first then test
    ann = out / "annotations"
    assert _read_annotations(ann / "train" / "part-00000.parquet") == {0: ["a", "c"], 2: ["b"], 3: ["a", "c"]}
    assert _read_annotations(ann / "test" / "part-00000.parquet") == {4: ["b"]}
    schema = pq.read_schema(ann / "train" / "part-00000.parquet")
    assert str(schema.field("example_id").type) == "int64"
    assert str(schema.field("labels").type) == "list<element: string>"

    train_split = load_split(out, "train")
    np.testing.assert_array_equal(train_split.example_ids, [0, 1, 2, 3])
    np.testing.assert_array_equal(train_split.X.toarray(), XC_X.astype(np.float32))
    assert train_split.labels == [["a", "c"], [], ["b"], ["a", "c"]]
    test_split = load_split(out, "test")
    np.testing.assert_array_equal(test_split.example_ids, [4, 5])
    assert test_split.labels == [["b"], []]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_random_split_is_seeded_and_complete(tmp_path: Path) -> None:
    n = 50
    # example i has label i % 3 and the single feature value i + 1: rows can be traced after the split
    lines = [f"{n} 1 3"] + [f"{i % 3} 0:{i + 1}" for i in range(n)]
    train = _write(tmp_path / "all.txt", "\n".join(lines) + "\n")
    a = import_xc(train, None, tmp_path / "a", test_fraction=0.3, seed=7)
    import_xc(train, None, tmp_path / "b", test_fraction=0.3, seed=7)
    import_xc(train, None, tmp_path / "c", test_fraction=0.3, seed=8)
    assert a["splits"]["train"]["n_examples"] == 35
    assert a["splits"]["test"]["n_examples"] == 15
    assert a["source"]["split"] == {"method": "random", "test_fraction": 0.3, "seed": 7}

    def rows(out: Path, split: str) -> list[int]:
        s = load_split(out, split)
        original = (s.X.toarray()[:, 0] - 1).astype(int).tolist()
        assert s.labels == [[str(i % 3)] for i in original]  # labels travel with their features
        return original

    test_a = rows(tmp_path / "a", "test")
    assert test_a == sorted(test_a)  # file order kept within a split
    assert sorted(rows(tmp_path / "a", "train") + test_a) == list(range(n))
    assert test_a == rows(tmp_path / "b", "test")
    assert test_a != rows(tmp_path / "c", "test")


def test_existing_out_is_refused_without_force(tmp_path: Path) -> None:
    train = _write(tmp_path / "toy.txt", XC_TEXT)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(PipelineError, match="not empty"):
        import_xc(train, None, out)
    assert (out / "keep.txt").read_text() == "precious"
    import_xc(train, None, out, force=True)
    assert not (out / "keep.txt").exists()
    assert (out / "dataset.json").exists()
    # an empty directory may be written into
    (tmp_path / "empty").mkdir()
    import_xc(train, None, tmp_path / "empty")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_failed_import_leaves_out_untouched(tmp_path: Path) -> None:
    out = tmp_path / "out"
    import_xc(_write(tmp_path / "toy.txt", XC_TEXT), None, out)
    before = (out / "dataset.json").read_text()
    bad = _write(tmp_path / "bad.txt", "2 5 3\n0 1:1\n7 2:1\n")
    with pytest.raises(ShardError):
        import_xc(bad, None, out, force=True)
    assert (out / "dataset.json").read_text() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_duplicate_label_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="used twice"):
        import_xc(_write(tmp_path / "toy.txt", XC_TEXT), None, tmp_path / "out", label_names=["a", "b", "a"])


def test_import_arff(tmp_path: Path) -> None:
    xml = _write(tmp_path / "toy.xml", ARFF_XML)
    train = _write(tmp_path / "toy-train.arff", ARFF_TEXT)
    test = _write(tmp_path / "toy-test.arff", ARFF_TEXT.split("@data")[0] + "@data\n{2 1,4 1}\n")
    info = import_arff(train, test, tmp_path / "out", xml=xml)
    assert info["name"] == "toy"
    assert info["splits"]["test"] == {"n_examples": 1, "n_annotations": 2, "n_without_labels": 0}
    assert load_split(tmp_path / "out", "test").labels == [["lab_b", "lab_a"]]
    other = _write(tmp_path / "other.arff", ARFF_TEXT.replace("f2 REAL", "f3 REAL"))
    with pytest.raises(ShardError, match="attributes differ"):
        import_arff(train, other, tmp_path / "out2", xml=xml)


# --- the command line ---------------------------------------------------------------------------------------


def test_cli_import_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train = _write(tmp_path / "toy.txt", XC_TEXT)
    out = tmp_path / "out"
    assert main(["import", "xc", str(train), "--out", str(out), "--name", "toy", "--test-fraction", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert "imported toy (xc)" in printed
    assert "3 labels, 5 features" in printed
    assert load_split(out, "train").X.shape == (2, 5)

    # refused without --force: exit code 2 and a one-line message
    assert main(["import", "xc", str(train), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err

    assert main(["import", "xc", str(train), "--out", str(out), "--force", "--json", "--seed", "3"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads((out / "dataset.json").read_text())

    xml = _write(tmp_path / "toy.xml", ARFF_XML)
    arff = _write(tmp_path / "toy.arff", ARFF_TEXT)
    assert main(["import", "arff", str(arff), str(arff), "--xml", str(xml), "--out", str(tmp_path / "a")]) == 0
    assert "2 labels, 3 features" in capsys.readouterr().out

    bad = _write(tmp_path / "bad.txt", "1 2 2\n0 5:1\n")
    assert main(["import", "xc", str(bad), str(bad), "--out", str(tmp_path / "b")]) == 2
    assert f"{bad}:2: feature index 5 out of range" in capsys.readouterr().err


def test_cli_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["import", "--help"])
    assert info.value.code == 0
    assert "pmi-pipeline import arff bibtex-train.arff" in capsys.readouterr().out


# --- the shipped sample data (data/) ------------------------------------------------------------------------


def _stats(root: Path) -> dict[str, float]:
    """Statistics computed from the shards themselves with pyarrow, independently of dataset.json."""
    ids = {
        s: pq.read_table(root / "features" / s / "part-00000.parquet").column("example_id") for s in ("train", "test")
    }
    ann = {s: pq.read_table(root / "annotations" / s / "part-00000.parquet") for s in ("train", "test")}
    n = {s: len(ids[s]) for s in ids}
    n_ann = sum(sum(len(x) for x in t.column("labels").to_pylist()) for t in ann.values())
    annotated = sum(len(set(t.column("example_id").to_pylist())) for t in ann.values())
    labels_used = {x for t in ann.values() for row in t.column("labels").to_pylist() for x in row}
    return {
        "n_train": n["train"],
        "n_test": n["test"],
        "cardinality": n_ann / (n["train"] + n["test"]),
        "without_labels": n["train"] + n["test"] - annotated,
        "labels_used": len(labels_used),
        "n_features": int(pq.read_schema(root / "features" / "train" / "part-00000.parquet").metadata[b"n_features"]),
    }


def test_sample_bibtex_matches_published_statistics(bibtex_dir: Path) -> None:
    stats = _stats(bibtex_dir)
    assert (stats["n_train"], stats["n_test"], stats["n_features"]) == (4880, 2515, 1836)
    assert round(stats["cardinality"], 3) == 2.402
    assert stats["without_labels"] == 0
    assert len(read_label_names(bibtex_dir)) == 159
    assert stats["labels_used"] == 159
    info = json.loads((bibtex_dir / "dataset.json").read_text())
    assert (info["n_labels"], info["n_features"]) == (159, 1836)


def test_sample_delicious_matches_published_statistics(delicious_dir: Path) -> None:
    stats = _stats(delicious_dir)
    assert (stats["n_train"], stats["n_test"], stats["n_features"]) == (12920, 3185, 500)
    assert round(stats["cardinality"], 2) == 19.02
    assert stats["without_labels"] == 14
    names = read_label_names(delicious_dir)
    assert len(names) == 983 == len(set(names))
    assert "TAG_m\\'usica" in names  # the ARFF spelling, as in delicious.xml
    info = json.loads((delicious_dir / "dataset.json").read_text())
    assert info["splits"]["train"]["n_without_labels"] == 10
    assert info["splits"]["test"]["n_without_labels"] == 4


def test_sample_eurlex_label_sets(eurlex_dir: Path) -> None:
    shards = sorted((eurlex_dir / "annotations").glob("*.parquet"))
    assert [p.name for p in shards] == [f"part-0000{k}.parquet" for k in range(4)]
    tables = [pq.read_table(p) for p in shards]
    ids = np.concatenate([t.column("example_id").to_numpy() for t in tables])
    np.testing.assert_array_equal(ids, np.arange(19577))
    rows = [row for t in tables for row in t.column("labels").to_pylist()]
    assert all(rows) and all(len(r) == len(set(r)) for r in rows)
    assert len({x for r in rows for x in r}) == 3976
    assert round(sum(map(len, rows)) / len(rows), 3) == 5.317


def test_sample_bibtex_equals_the_shared_xc_file(bibtex_dir: Path, shared_data_dir: Path) -> None:
    """data/bibtex (made from the ARFF) against the derived XC text, read by a plain Python parser."""
    xc = shared_data_dir / "bibtex" / "xc"
    names = (xc / "label_names.txt").read_text(encoding="utf-8").split("\n")[:-1]
    assert read_label_names(bibtex_dir) == names
    for split in ("train", "test"):
        lines = (xc / f"bibtex_{split}.txt").read_text(encoding="utf-8").split("\n")[1:-1]
        got = load_split(bibtex_dir, split)
        assert len(lines) == len(got.labels)
        for i, line in enumerate(lines):
            lab, _, feat = line.partition(" ")
            assert got.labels[i] == [names[int(j)] for j in lab.split(",") if j]
            pairs = [tok.split(":") for tok in feat.split()]
            lo, hi = got.X.indptr[i], got.X.indptr[i + 1]
            assert got.X.indices[lo:hi].tolist() == [int(j) for j, _ in pairs]
            assert got.X.data[lo:hi].tolist() == [float(v) for _, v in pairs]
