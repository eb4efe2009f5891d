"""Fixtures shared by the whole test suite.

Sample data: ``data/`` holds real datasets as import directories, built by ``scripts/make_sample_data.py`` and
kept in the repository, so every test that needs real data runs without network or the shared drive:

- ``data_dir``: the repository's ``data/``;
- ``bibtex_dir``, ``delicious_dir``: import directories (``dataset.json``, ``labels.txt``,
  ``annotations/{train,test}/``, ``features/{train,test}/``);
- ``eurlex_dir``: EUR-Lex EUROVOC label sets only, ``annotations/part-0000{0..3}.parquet`` (no split,
  no features);
- ``shared_data_dir``: the original source files (``../shared/data``, or ``$PMI_SHARED_DATA``); tests that use
  it are skipped where it is absent.

Add fixtures below in their own section.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / "data"
SHARED_DATA_DIR = Path(os.environ.get("PMI_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


# --- sample data (data/) ------------------------------------------------------------------------------------


def _sample(name: str) -> Path:
    path = DATA_DIR / name
    if not path.is_dir():
        pytest.fail(f"{path} is missing: run `python scripts/make_sample_data.py --shared ../shared/data`")
    return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The repository's ``data/`` directory of sample datasets."""
    return DATA_DIR


@pytest.fixture(scope="session")
def bibtex_dir() -> Path:
    """Mulan bibtex as an import directory: 4880/2515 examples, 159 labels, 1836 binary features."""
    return _sample("bibtex")


@pytest.fixture(scope="session")
def delicious_dir() -> Path:
    """Mulan delicious as an import directory: 12920/3185 examples, 983 labels, 500 binary features."""
    return _sample("delicious")


@pytest.fixture(scope="session")
def eurlex_dir() -> Path:
    """EUR-Lex EUROVOC label sets: 19577 records, 3976 labels, in 4 list-form annotation shards."""
    return _sample("eurlex")


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The shared copies of the source datasets; skips the test where they are not mounted."""
    if not SHARED_DATA_DIR.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA_DIR} (set PMI_SHARED_DATA)")
    return SHARED_DATA_DIR


# --- embedding core: references and Dask clusters ------------------------------------------------------------


def reference_counts(shard_paths):
    """Label counts, dense pair counts and n_examples computed the seed blog's way, independently of the package.

    Reads shards with pyarrow directly, builds one binary example x label matrix ``Y`` in memory and takes
    ``Y.T @ Y``. Returns ``(labels, label_counts, pair_counts (m x m, zero diagonal), n_examples)``.
    """
    import numpy as np
    import pyarrow.parquet as pq
    import scipy.sparse as sp

    rows = {}
    for path in shard_paths:
        table = pq.read_table(path).to_pydict()
        column = "labels" if "labels" in table else "label"
        for i, example in enumerate(table["example_id"]):
            conf = table.get("confidence", [1.0] * len(table["example_id"]))[i]
            if conf == 0:
                continue
            value = table[column][i]
            rows.setdefault((str(path), example), set()).update(value if column == "labels" else [value])
    labels = sorted({label for s in rows.values() for label in s})
    index = {label: j for j, label in enumerate(labels)}
    r, c = [], []
    for i, s in enumerate(rows.values()):
        for label in s:
            r.append(i)
            c.append(index[label])
    y = sp.csr_matrix((np.ones(len(r), np.int64), (r, c)), shape=(len(rows), len(labels)))
    gram = (y.T @ y).toarray()
    label_counts = np.diag(gram).copy()
    np.fill_diagonal(gram, 0)
    return labels, label_counts, gram, len(rows)


@pytest.fixture(scope="session")
def dask_clients():
    """Real LocalClusters with 1 and 2 worker processes, started once for the session."""
    from pmi_pipeline.dask_cluster import dask_client

    with dask_client(n_workers=1) as one, dask_client(n_workers=2) as two:
        _SESSION_CLIENTS.update({1: one, 2: two})
        try:
            yield {1: one, 2: two}
        finally:
            _SESSION_CLIENTS.clear()


# --- a test that hangs -------------------------------------------------------------------------------------------

#: The session's Dask clients, whose state is printed when a test nears its timeout (pyproject's ``timeout``).
_SESSION_CLIENTS: dict = {}
_HANG_REPORT_MARGIN_S = 20


def _report_dask_state() -> None:
    """What the session's clusters are doing: the tasks each worker is processing, and the stacks of the ones
    running. pytest-timeout prints this process's threads; a task stuck in a worker process shows only here."""
    for n, client in list(_SESSION_CLIENTS.items()):
        try:
            processing = {w: [str(k) for k in keys] for w, keys in client.processing().items()}
            print(f"--- {n}-worker cluster, tasks processing: {processing}", file=sys.stderr)
            for worker, stacks in client.call_stack().items():
                for key, frames in stacks.items():
                    print(f"--- {worker} is running {key}:\n{''.join(frames)}", file=sys.stderr)
        except Exception as exc:  # a report, never a second failure
            print(f"--- {n}-worker cluster: no state ({exc!r})", file=sys.stderr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    timeout = float(item.config.getini("timeout") or 0)
    timer = None
    if timeout > _HANG_REPORT_MARGIN_S and _SESSION_CLIENTS:
        timer = threading.Timer(timeout - _HANG_REPORT_MARGIN_S, _report_dask_state)
        timer.daemon = True
        timer.start()
    try:
        yield
    finally:
        if timer is not None:
            timer.cancel()
