"""The embed and neighbors commands, run through the real entry point."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

from pmi_pipeline.cli import main


def test_embed_then_neighbors(delicious_dir, tmp_path, capsys):
    store = tmp_path / "store"
    assert main(["embed", str(delicious_dir), "--store", str(store), "--dim", "32", "--no-dask", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["version"] == "v0001" and result["n_labels"] == 983 and result["dim"] == 32
    assert main(["neighbors", "--store", str(store), "TAG_cooking", "-n", "5", "--json"]) == 0
    neighbours = json.loads(capsys.readouterr().out)["neighbors"]["TAG_cooking"]
    names = [n["label"] for n in neighbours]
    assert {"TAG_recipes", "TAG_food"} <= set(names)  # what a person would expect of cooking
    assert all(a["cosine"] >= b["cosine"] for a, b in itertools.pairwise(neighbours))
    assert main(["neighbors", "--store", str(store), "TAG_cooking", "-n", "3"]) == 0
    out = capsys.readouterr().out
    assert "closest to: TAG_cooking" in out and "proximity" in out
    assert main(["neighbors", "--store", str(store), "cooking"]) == 2
    assert "did you mean TAG_cooking" in capsys.readouterr().err


def test_embed_again_says_nothing_new(bibtex_dir, tmp_path, capsys):
    args = ["embed", str(bibtex_dir), "--store", str(tmp_path / "s"), "--dim", "8", "--no-dask"]
    assert main(args) == 0
    assert "published v0001" in capsys.readouterr().out
    assert main(args) == 0
    assert "nothing new" in capsys.readouterr().out


def test_errors_are_one_line_not_tracebacks(tmp_path, capsys):
    bad = tmp_path / "bad.parquet"
    bad.write_text("nope")
    assert main(["embed", str(bad), "--store", str(tmp_path / "s"), "--no-dask"]) == 2
    err = capsys.readouterr().err
    assert "nothing to embed" in err and str(bad) in err and "Traceback" not in err
    assert main(["embed", str(tmp_path / "missing"), "--store", str(tmp_path / "s"), "--no-dask"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["embed", str(bad), "--store", str(tmp_path / "s"), "--smoothing", "2", "--no-dask"]) == 2
    assert "smoothing" in capsys.readouterr().err


def test_console_script_runs_on_a_local_cluster(bibtex_dir, tmp_path):
    """The installed command, as a user runs it: a real LocalCluster, progress off, output on stdout."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pmi_pipeline",
            "embed",
            str(bibtex_dir),
            "--store",
            str(tmp_path / "s"),
            "--dim",
            "8",
            "--workers",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "published v0001" in proc.stdout and "159 labels embedded" in proc.stdout
    assert "INFO" not in proc.stderr  # Dask's logs stay quiet without -vv


def test_help_for_every_command():
    proc = subprocess.run([sys.executable, "-m", "pmi_pipeline", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for command in ("import", "embed", "neighbors"):
        assert command in proc.stdout
        sub = subprocess.run([sys.executable, "-m", "pmi_pipeline", command, "--help"], capture_output=True, text=True)
        assert sub.returncode == 0 and "usage: pmi-pipeline " + command in sub.stdout
