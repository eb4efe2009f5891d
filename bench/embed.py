"""Benchmark: counting and factorization throughput and peak memory, against the seed blog's in-memory way.

For each corpus size (annotations), a synthetic corpus with realistic structure (:mod:`pmi_pipeline.synth`:
Zipf label frequencies, latent label groups) is written under a temporary directory, then every measured phase
runs in its own fresh Python process. The parent samples the resident memory of that process *and all its
children* (the Dask scheduler and worker processes) every 50 ms and reports the peak of the sum, and the CPU
seconds of the whole process tree; the child times its own work (imports and cluster start excluded, and
reported apart).

Phases (``--phases``):

================  ============================================================================================
``count``         ours: ``count_shards(discover_shards([corpus]), client)`` on a ``dask_client`` LocalCluster
``count-serial``  ours without Dask (``client=None``): one process, shard after shard
``inmem-count``   seed blog: all shards into one CSR ``Y`` (n x m) with pyarrow, ``Y.T @ Y``, then its PMI
``pmi``           ours: ``pmi_matrix(counts, PMIParams())``; the matrix is saved for the factorization phases
``factorize``     ours: ``factorize(A, FactorizeParams(dim=k, n_oversamples=p, n_power_iter=q))``, threads
``factorize-dask``  the same on the LocalCluster
``factorize-svd``  ours with ``method="svd"`` (top-k by magnitude, what an SVD computes), threads
``rsvd``          ``sklearn.utils.extmath.randomized_svd(A, k, n_oversamples=p, n_iter=q)``
``svds``          seed blog: ``scipy.sparse.linalg.svds(A, k)`` (ARPACK)
``eigsh``         reference: ``scipy.sparse.linalg.eigsh(A, k, which="LA")``, the exact top-k eigenvalues
``embed``         ours end to end: ``embed([corpus], store, EmbedParams(...), client)``
================  ============================================================================================

All factorizations run on the same PMI matrix (ours, default parameters) with equal k, oversampling and
iterations. Eigenvalue accuracy: the top-k algebraic eigenvalues of ``eig`` methods (for ``rsvd`` and
``svds``, the signed Rayleigh quotients ``u_i^T A u_i`` of their singular vectors) against ``eigsh``, and
singular values against ``svds``.

Usage::

    python bench/embed.py run --sizes 1e6 1e7 --labels 20000

writes ``bench/results/embed-<timestamp>.json``, prints a table with ratios and refreshes the table in
``docs/performance.md``. ``python bench/embed.py _phase NAME SPEC RESULT`` is the internal per-phase entry.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from common import TreeMonitor, host_speed, sort_dispatch

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"
DOCS_FILE = ROOT / "docs" / "performance.md"
DOCS_START = "<!-- bench/embed.py: start -->"
DOCS_END = "<!-- bench/embed.py: end -->"

COUNT_PHASES = ("count", "count-serial", "inmem-count")
FACTOR_PHASES = (
    "factorize",
    "rsvd",
    "factorize-blas1",
    "rsvd-blas1",
    "factorize-dask",
    "factorize-svd",
    "svds",
    "eigsh",
)
# BLAS pinned to one thread, as Dask's nanny does for its workers: on a small shared machine, multi-threaded
# OpenBLAS under a threaded scheduler (or other people's jobs) oversubscribes the cores and spins.
BLAS1_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
PHASE_ENV = {"factorize-blas1": BLAS1_ENV, "rsvd-blas1": BLAS1_ENV}
ALL_PHASES = ("synth", *COUNT_PHASES, "pmi", *FACTOR_PHASES, "embed")
DEFAULT_PHASES = ("synth", *COUNT_PHASES, "pmi", *FACTOR_PHASES, "embed")
# Phases run once even with --repeat: the corpus, and the slow exact references.
ONCE_PHASES = ("synth", "svds", "eigsh")


# ------------------------------------------------------------------------------------------------------------
# Measuring a phase in a fresh process: wall time, peak RSS of the process tree, CPU seconds of the tree
# ------------------------------------------------------------------------------------------------------------


def run_phase(name: str, spec: dict[str, Any], work: Path, timeout: float) -> dict[str, Any]:
    """Run ``_phase name`` in a fresh interpreter, monitored; return its own report plus the measurements."""
    spec_path = work / f"{name}.spec.json"
    result_path = work / f"{name}.result.json"
    log_path = work / f"{name}.log"
    spec_path.write_text(json.dumps(spec))
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "_phase", name, str(spec_path), str(result_path)]
    start = time.perf_counter()
    with open(log_path, "w") as log_file:
        # As the pmi-pipeline command runs (sort_dispatch.use_fast_sort): on AMD Zen 4, numpy's AVX2 sort, in every
        # phase, the in-memory baseline's too (it does not sort: 47.9 s without, 47.2 s with, eighteenth pass).
        env = {**os.environ, **sort_dispatch().sort_environ(), **PHASE_ENV.get(name, {})}
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        with TreeMonitor(proc.pid) as monitor:
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_tree(proc.pid)
                rc = proc.wait()
                rc = "timeout"
    wall = time.perf_counter() - start
    report: dict[str, Any] = {"phase": name, "returncode": rc, "process_wall_s": wall}
    if rc == 0 and result_path.exists():
        report.update(json.loads(result_path.read_text()))
    else:
        report["error"] = log_path.read_text()[-3000:]
    m = monitor.result
    report.update(
        peak_rss_bytes=m.peak_rss,
        peak_single_process_rss_bytes=m.peak_single_rss,
        max_processes=m.max_processes,
        tree_cpu_s=m.cpu_s,
        rss_samples=m.samples,
    )
    return report


def _kill_tree(pid: int) -> None:
    """End the phase process we started and its descendants (by pid, children first)."""
    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.Error:
        return
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(procs, timeout=10)


# ------------------------------------------------------------------------------------------------------------
# The phases (run in the child process)
# ------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _client(spec: dict[str, Any]):
    """A client on the project's ``dask_client`` LocalCluster; yields (client, cores, start seconds)."""
    t0 = time.perf_counter()
    try:
        from pmi_pipeline.dask_cluster import dask_client
    except ImportError:  # only while the module is being written: say so in the results
        dask_client = _fallback_client
    with dask_client(n_workers=spec["workers"]) as client:
        client.wait_for_workers(spec["workers"])
        cores = sum(client.nthreads().values())
        yield client, cores, time.perf_counter() - t0


@contextlib.contextmanager
def _fallback_client(n_workers: int):
    from distributed import Client, LocalCluster

    print("pmi_pipeline.dask_cluster missing: using a plain LocalCluster", file=sys.stderr)
    with LocalCluster(n_workers=n_workers, threads_per_worker=1, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            yield client


def _count_stats(label_counts: np.ndarray, upper: Any, n_examples: int) -> dict[str, Any]:
    """Fingerprint of counts, to check that ours and the in-memory baseline agree."""
    return {
        "n_examples": int(n_examples),
        "n_labels": int(np.count_nonzero(label_counts)),
        "n_annotations_counted": int(np.asarray(label_counts).sum()),
        "n_pairs": int(upper.nnz),
        "pair_total": int(upper.sum()),
    }


def phase_synth(spec: dict[str, Any]) -> dict[str, Any]:
    from pmi_pipeline.synth import SynthConfig, write_corpus

    config = SynthConfig.from_dict(spec["synth"])
    t0 = time.perf_counter()
    summary = write_corpus(spec["corpus"], config, progress=False, workers=spec.get("synth_workers", 1))
    return {
        "time_s": time.perf_counter() - t0,
        "cores": spec.get("synth_workers", 1),
        "n_examples": summary.n_examples,
        "n_annotations": summary.n_annotations,
        "n_shards": len(summary.paths),
        "n_labels_used": summary.n_labels_used,
        "top_1pct_label_share": summary.top_share(0.01),
        "corpus_bytes": sum(p.stat().st_size for p in summary.paths),
    }


def _our_count(spec: dict[str, Any], client: Any) -> tuple[Any, float, int]:
    from pmi_pipeline.cooccurrence import count_shards
    from pmi_pipeline.shards import discover_shards

    t0 = time.perf_counter()
    paths = discover_shards([spec["corpus"]])
    result = count_shards(paths, client)
    elapsed = time.perf_counter() - t0
    counts = getattr(result, "counts", result)
    rejected = len(getattr(result, "rejected", []))
    return counts, elapsed, rejected


def phase_count(spec: dict[str, Any]) -> dict[str, Any]:
    with _client(spec) as (client, cores, start_s):
        counts, elapsed, rejected = _our_count(spec, client)
    counts.save(Path(spec["work"]) / "counts.npz")
    return {
        "time_s": elapsed,
        "cluster_start_s": start_s,
        "cores": cores,
        "rejected": rejected,
        **_count_stats(counts.label_counts, counts.pairs, counts.n_examples),
    }


def phase_count_serial(spec: dict[str, Any]) -> dict[str, Any]:
    counts, elapsed, rejected = _our_count(spec, None)
    return {
        "time_s": elapsed,
        "cores": 1,
        "rejected": rejected,
        **_count_stats(counts.label_counts, counts.pairs, counts.n_examples),
    }


def phase_inmem_count(spec: dict[str, Any]) -> dict[str, Any]:
    """The seed blog's approach on the whole corpus at once, made as fast as plain pyarrow + scipy allow."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import scipy.sparse as sp

    from pmi_pipeline.shards import discover_shards

    t0 = time.perf_counter()
    paths = discover_shards([spec["corpus"]])
    table = pa.concat_tables([pq.read_table(p, columns=["labels"]) for p in paths])
    column = table.column("labels").combine_chunks()
    encoded = pc.dictionary_encode(pc.list_flatten(column))
    indices = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int32)
    indptr = np.asarray(column.offsets.to_numpy(), dtype=np.int64)
    indptr -= indptr[0]
    n, m = len(column), len(encoded.dictionary)
    del table, column, encoded
    y = sp.csr_matrix((np.ones(indices.size, dtype=np.int32), indices, indptr), shape=(n, m))
    t_read = time.perf_counter() - t0

    t1 = time.perf_counter()
    pp = y.T.dot(y)  # the seed: PP = M.T.dot(M)
    t_gram = time.perf_counter() - t1

    # Not timed: a fingerprint of the counts, to check them against ours.
    label_counts = np.asarray(pp.diagonal(), dtype=np.int64)
    upper = sp.triu(pp, k=1)
    stats = _count_stats(label_counts, upper, n)
    del upper

    t2 = time.perf_counter()
    # The seed's PMI, verbatim apart from the names: PP / n, diagonal out, log(p_ij / (p_i p_j)) on observed
    # pairs.
    pp = pp / n
    tp = pp.diagonal()
    pp.setdiag(0)
    pp.eliminate_zeros()
    i, j = pp.nonzero()
    pp.data = np.log(pp.data / (tp[i] * tp[j]))
    t_pmi = time.perf_counter() - t2
    return {
        "time_s": t_read + t_gram,
        "read_build_s": t_read,
        "gram_s": t_gram,
        "pmi_s": t_pmi,
        "cores": 1,
        **stats,
        "pmi_nnz": int(pp.nnz),
    }


def phase_pmi(spec: dict[str, Any]) -> dict[str, Any]:
    import scipy.sparse as sp

    from pmi_pipeline.cooccurrence import Counts
    from pmi_pipeline.pmi import PMIParams, pmi_matrix

    counts = Counts.load(Path(spec["work"]) / "counts.npz")
    t0 = time.perf_counter()
    a, kept = pmi_matrix(counts, PMIParams())
    elapsed = time.perf_counter() - t0
    sp.save_npz(Path(spec["work"]) / "pmi.npz", a.tocsr(), compressed=False)
    return {"time_s": elapsed, "cores": 1, "m": int(a.shape[0]), "nnz": int(a.nnz), "kept": len(kept)}


def _load_pmi(spec: dict[str, Any]):
    import scipy.sparse as sp

    return sp.load_npz(Path(spec["work"]) / "pmi.npz").tocsr()


def _save_values(spec: dict[str, Any], name: str, **arrays: np.ndarray) -> None:
    np.savez(Path(spec["work"]) / f"{name}.values.npz", **arrays)


def _our_factorize(spec: dict[str, Any], name: str, method: str, client: Any) -> dict[str, Any]:
    from pmi_pipeline.factorize import FactorizeParams, factorize

    a = _load_pmi(spec)
    params = FactorizeParams(
        method=method,
        dim=spec["dim"],
        n_oversamples=spec["oversamples"],
        n_power_iter=spec["power_iter"],
        spectral_shift=_pipeline_shift(),
        seed=0,
    )
    t0 = time.perf_counter()
    fac = factorize(a, params, client=client)
    elapsed = time.perf_counter() - t0
    ritz = np.asarray(fac.ritz_values, dtype=np.float64)
    if method == "eig":
        _save_values(spec, name, algebraic=ritz)
    else:
        # Ritz values ranked by magnitude: |value| are singular values; the signed ones are eigenvalues too.
        _save_values(spec, name, singular=np.abs(ritz), algebraic=np.sort(ritz)[::-1])
    return {
        "time_s": elapsed,
        "n_positive": int(fac.n_positive),
        "shift": float(fac.shift),
        "params": params.to_dict(),
    }


def _pipeline_shift() -> str | float:
    """The spectral shift ``embed`` uses by default, so the bench measures what the pipeline runs."""
    try:
        from pmi_pipeline.embed import EmbedParams
    except ImportError:
        return "auto"
    return EmbedParams().spectral_shift


def _blas_cores() -> int:
    """Cores a BLAS-bound single process can use: 1 when BLAS is pinned to one thread."""
    pinned = os.environ.get("OPENBLAS_NUM_THREADS") == "1" or os.environ.get("OMP_NUM_THREADS") == "1"
    return 1 if pinned else (os.cpu_count() or 1)


def phase_factorize(spec: dict[str, Any]) -> dict[str, Any]:
    # The threaded scheduler runs os.cpu_count() tasks at once, whatever the BLAS threads.
    out = _our_factorize(spec, spec["_phase"], "eig", None)
    return {**out, "cores": os.cpu_count(), "scheduler": "threads"}


def phase_factorize_dask(spec: dict[str, Any]) -> dict[str, Any]:
    with _client(spec) as (client, cores, start_s):
        out = _our_factorize(spec, spec["_phase"], "eig", client)
    return {**out, "cores": cores, "cluster_start_s": start_s, "scheduler": "distributed"}


def phase_factorize_svd(spec: dict[str, Any]) -> dict[str, Any]:
    out = _our_factorize(spec, spec["_phase"], "svd", None)
    return {**out, "cores": os.cpu_count(), "scheduler": "threads"}


def phase_rsvd(spec: dict[str, Any]) -> dict[str, Any]:
    from sklearn.utils.extmath import randomized_svd

    a = _load_pmi(spec)
    t0 = time.perf_counter()
    u, s, _vt = randomized_svd(
        a, spec["dim"], n_oversamples=spec["oversamples"], n_iter=spec["power_iter"], random_state=0
    )
    elapsed = time.perf_counter() - t0
    # For a symmetric matrix the singular vectors are eigenvectors; the Rayleigh quotient restores the sign.
    rayleigh = np.einsum("ij,ij->j", u, a @ u)
    _save_values(spec, spec["_phase"], singular=s, algebraic=np.sort(rayleigh)[::-1])
    return {"time_s": elapsed, "cores": _blas_cores(), "n_negative": int((rayleigh < 0).sum())}


def phase_svds(spec: dict[str, Any]) -> dict[str, Any]:
    from scipy.sparse.linalg import svds

    a = _load_pmi(spec)
    t0 = time.perf_counter()
    u, s, _vt = svds(a, k=spec["dim"], random_state=0)
    elapsed = time.perf_counter() - t0
    order = np.argsort(-s)
    rayleigh = np.einsum("ij,ij->j", u[:, order], a @ u[:, order])
    _save_values(spec, "svds", singular=s[order], algebraic=np.sort(rayleigh)[::-1])
    return {"time_s": elapsed, "cores": _blas_cores(), "n_negative": int((rayleigh < 0).sum())}


def phase_eigsh(spec: dict[str, Any]) -> dict[str, Any]:
    from scipy.sparse.linalg import eigsh

    a = _load_pmi(spec)
    t0 = time.perf_counter()
    values = eigsh(a, k=spec["dim"], which="LA", return_eigenvectors=False, v0=np.ones(a.shape[0]))
    elapsed = time.perf_counter() - t0
    _save_values(spec, "eigsh", algebraic=np.sort(values)[::-1])
    return {"time_s": elapsed, "cores": _blas_cores()}


def phase_embed(spec: dict[str, Any]) -> dict[str, Any]:
    from pmi_pipeline.embed import EmbedParams, embed

    store = Path(spec["work"]) / "store"
    shutil.rmtree(store, ignore_errors=True)
    params = _embed_params(EmbedParams, spec)
    with _client(spec) as (client, cores, start_s):
        t0 = time.perf_counter()
        result = embed([spec["corpus"]], store, params, client=client)
        elapsed = time.perf_counter() - t0
    shutil.rmtree(store, ignore_errors=True)
    return {
        "time_s": elapsed,
        "cluster_start_s": start_s,
        "cores": cores,
        "version": str(getattr(result, "version", "")),
        "stage_timings": dict(getattr(result, "timings", {}) or {}),
        "dim": getattr(result, "dim", None),
    }


def _embed_params(cls: type, spec: dict[str, Any]) -> Any:
    """EmbedParams with the bench's k, oversampling and iterations, whichever way the class spells them."""
    import dataclasses

    wanted = {"dim": spec["dim"], "n_oversamples": spec["oversamples"], "n_power_iter": spec["power_iter"]}
    if dataclasses.is_dataclass(cls):
        names = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in wanted.items() if k in names}
        if "factorize" in names and not kwargs:
            from pmi_pipeline.factorize import FactorizeParams

            return cls(factorize=FactorizeParams(**wanted, seed=0))
        return cls(**kwargs)
    return cls()


PHASES = {
    "synth": phase_synth,
    "count": phase_count,
    "count-serial": phase_count_serial,
    "inmem-count": phase_inmem_count,
    "pmi": phase_pmi,
    "factorize": phase_factorize,
    "factorize-dask": phase_factorize_dask,
    "factorize-svd": phase_factorize_svd,
    "rsvd": phase_rsvd,
    "factorize-blas1": phase_factorize,
    "rsvd-blas1": phase_rsvd,
    "svds": phase_svds,
    "eigsh": phase_eigsh,
    "embed": phase_embed,
}


def child_main(name: str, spec_path: str, result_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    import logging

    logging.basicConfig(level=logging.WARNING)
    spec["_phase"] = name
    result = PHASES[name](spec)
    result["blas_threads"] = _blas_threads()
    Path(result_path).write_text(json.dumps(result, default=_jsonable))
    return 0


def _blas_threads() -> list[int]:
    """Threads of each BLAS library loaded in this process (numpy/scipy's OpenBLAS, usually one)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    return [int(info["num_threads"]) for info in threadpool_info() if info.get("user_api") == "blas"]


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


# ------------------------------------------------------------------------------------------------------------
# The driver: sizes x phases, ratios, accuracy, JSON, table, docs
# ------------------------------------------------------------------------------------------------------------


def _eigen_errors(work: Path, name: str, dim: int) -> dict[str, Any]:
    """Relative errors of a method's top-k values against the exact references (eigsh LA, svds)."""
    out: dict[str, Any] = {}
    mine = work / f"{name}.values.npz"
    if not mine.exists():
        return out
    with np.load(mine) as z:
        values = {key: z[key] for key in z.files}
    for key, ref_name in (("algebraic", "eigsh"), ("singular", "svds")):
        ref_path = work / f"{ref_name}.values.npz"
        if key not in values or not ref_path.exists() or name == ref_name:
            continue
        with np.load(ref_path) as z:
            if key not in z.files:
                continue
            ref = z[key][:dim]
        est = values[key][: ref.size]
        if est.size < ref.size:
            continue
        rel = np.abs(est - ref) / np.maximum(np.abs(ref), 1e-12)
        out[f"{key}_rel_err_max"] = float(rel.max())
        out[f"{key}_rel_err_mean"] = float(rel.mean())
        out[f"{key}_top5"] = [round(float(v), 3) for v in est[:5]]
        out[f"{key}_ref_top5"] = [round(float(v), 3) for v in ref[:5]]
    return out


def bench_size(n_annotations: int, args: argparse.Namespace, tmp_root: Path) -> dict[str, Any]:
    from pmi_pipeline.synth import SynthConfig

    work = Path(tempfile.mkdtemp(prefix=f"pmi-bench-{n_annotations:.0e}-", dir=tmp_root))
    corpus = work / "corpus"
    shard_size = args.shard_size
    synth = SynthConfig(
        n_annotations=n_annotations,
        n_labels=args.labels,
        mean_labels=args.mean_labels,
        shard_size=shard_size,
        seed=args.seed,
    )
    spec = {
        "corpus": str(corpus),
        "work": str(work),
        "synth": synth.to_dict(),
        "synth_workers": args.synth_workers,
        "workers": args.workers,
        "dim": args.dim,
        "oversamples": args.oversamples,
        "power_iter": args.power_iter,
    }
    size_report: dict[str, Any] = {
        "n_annotations_requested": n_annotations,
        "synth": synth.to_dict(),
        "phases": {},
    }
    phases = [p for p in ALL_PHASES if p in args.phases]
    if "synth" not in phases:
        phases.insert(0, "synth")  # every other phase needs the corpus
    needs_counts = {"pmi", *FACTOR_PHASES}
    if needs_counts & set(phases):
        for dep in ("count", "pmi"):
            if dep not in phases:
                phases.insert(phases.index("synth") + 1 if dep == "count" else phases.index("count") + 1, dep)
    if args.skip_eigsh_above and n_annotations > args.skip_eigsh_above and "eigsh" in phases:
        phases.remove("eigsh")
        size_report["skipped"] = ["eigsh"]
    try:
        # Repeats run in rounds (every phase once, then again) so that all methods see the same mix of load
        # from other jobs on the machine; the fastest run of each phase is reported, with all times kept.
        runs: dict[str, list[dict[str, Any]]] = {}
        for round_ in range(args.repeat):
            for name in phases:
                if round_ > 0 and (name in ONCE_PHASES or runs.get(name, [{}])[0].get("returncode") != 0):
                    continue
                tag = f"[{n_annotations:.0e}] {name}" + (f" (round {round_ + 1}/{args.repeat})" if round_ else "")
                _progress(f"{tag} ...")
                report = run_phase(name, spec, work, args.timeout)
                runs.setdefault(name, []).append(report)
                status = "ok" if report["returncode"] == 0 else f"FAILED ({report['returncode']})"
                _progress(
                    f"{tag}: {status}, {report.get('time_s', float('nan')):.2f} s, "
                    f"peak RSS {report['peak_rss_bytes'] / 2**20:.0f} MiB"
                )
                if name == "synth" and report["returncode"] != 0:
                    raise RuntimeError(f"corpus generation failed:\n{report.get('error')}")
                if name == "count" and report["returncode"] != 0:
                    break
        for name, reports in runs.items():
            size_report["phases"][name] = _best(reports)
        for name in FACTOR_PHASES:
            if name in size_report["phases"]:
                size_report["phases"][name]["accuracy"] = _eigen_errors(work, name, args.dim)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            size_report["work_dir"] = str(work)
    n_ann = size_report["phases"]["synth"].get("n_annotations", n_annotations)
    size_report["n_annotations"] = n_ann
    for report in size_report["phases"].values():
        if report.get("returncode") == 0 and report.get("time_s"):
            report["annotations_per_s"] = n_ann / report["time_s"]
            report["annotations_per_s_per_core"] = report["annotations_per_s"] / max(1, report.get("cores") or 1)
            if report.get("tree_cpu_s"):
                report["annotations_per_cpu_s"] = n_ann / report["tree_cpu_s"]
    size_report["checks"] = _checks(size_report["phases"])
    return size_report


def _best(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest successful run, with every run's time and the largest peak RSS of all runs."""
    ok = [r for r in reports if r.get("returncode") == 0 and r.get("time_s") is not None]
    if not ok:
        return reports[-1]
    best = dict(min(ok, key=lambda r: r["time_s"]))
    best["runs"] = len(reports)
    best["all_time_s"] = [r.get("time_s") for r in reports]
    best["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in ok)
    return best


# Each of our factorizations against randomized_svd under the same BLAS threading.
_FACTOR_BASELINE = {
    "factorize": "rsvd",
    "factorize-blas1": "rsvd-blas1",
    "factorize-dask": "rsvd-blas1",
    "factorize-svd": "rsvd",
}


def _checks(phases: dict[str, Any]) -> dict[str, Any]:
    checks: dict[str, Any] = {}
    ours, base = phases.get("count", {}), phases.get("inmem-count", {})
    keys = ("n_examples", "n_labels", "n_annotations_counted", "n_pairs", "pair_total")
    if ours.get("returncode") == 0 and base.get("returncode") == 0:
        checks["counts_agree_with_inmem"] = all(ours.get(k) == base.get(k) for k in keys)
        if ours.get("annotations_per_s_per_core") and base.get("annotations_per_s_per_core"):
            checks["count_per_core_ratio"] = ours["annotations_per_s_per_core"] / base["annotations_per_s_per_core"]
            checks["count_raw_ratio"] = ours["annotations_per_s"] / base["annotations_per_s"]
            if ours.get("annotations_per_cpu_s") and base.get("annotations_per_cpu_s"):
                checks["count_per_cpu_s_ratio"] = ours["annotations_per_cpu_s"] / base["annotations_per_cpu_s"]
        checks["count_rss_ratio"] = ours["peak_rss_bytes"] / base["peak_rss_bytes"]
    serial = phases.get("count-serial", {})
    if serial.get("returncode") == 0 and base.get("annotations_per_s"):
        checks["count_serial_ratio"] = serial["annotations_per_s"] / base["annotations_per_s"]
    for name, base_name in _FACTOR_BASELINE.items():
        mine, rsvd = phases.get(name, {}), phases.get(base_name, {})
        if mine.get("returncode") == 0 and rsvd.get("returncode") == 0:
            checks[f"{name}_speedup_vs_rsvd"] = rsvd["time_s"] / mine["time_s"]
    return checks


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------------------------

PHASE_LABELS = {
    "synth": "corpus generation (synth)",
    "count": "count, ours (Dask LocalCluster)",
    "count-serial": "count, ours (no Dask, 1 process)",
    "inmem-count": "count, in-memory seed (`Y.T @ Y`)",
    "pmi": "PMI, ours",
    "factorize": "factorize, ours eig (threads)",
    "factorize-blas1": "factorize, ours eig (threads, BLAS 1 thread)",
    "rsvd-blas1": "factorize, sklearn `randomized_svd` (BLAS 1 thread)",
    "factorize-dask": "factorize, ours eig (Dask LocalCluster, BLAS 1 thread)",
    "factorize-svd": "factorize, ours svd (threads)",
    "rsvd": "factorize, sklearn `randomized_svd`",
    "svds": "factorize, seed `svds` (ARPACK)",
    "eigsh": "reference `eigsh(which='LA')`",
    "embed": "end to end `embed()` (Dask)",
}


def _size(size: dict[str, Any]) -> str:
    """The requested corpus size as a power of ten when it is one (10^7), else as a number."""
    n = int(size.get("n_annotations_requested", size["n_annotations"]))
    exp = round(math.log10(n)) if n > 0 else 0
    return f"10^{exp}" if 10**exp == n else f"{n:.3g}"


def _fmt(value: Any, spec: str = ".3g") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def _ratio_column(name: str, report: dict[str, Any], phases: dict[str, Any]) -> str:
    """Counting: per-core throughput vs the in-memory baseline; factorization: speed vs randomized_svd."""
    if name in COUNT_PHASES:
        base = phases.get("inmem-count", {}).get("annotations_per_s_per_core")
        mine = report.get("annotations_per_s_per_core")
        return f"{mine / base:.2f}x per core" if base and mine else "-"
    if name in FACTOR_PHASES:
        base_name = _FACTOR_BASELINE.get(name, "rsvd-blas1" if name in PHASE_ENV else "rsvd")
        base = phases.get(base_name, {}).get("time_s")
        mine = report.get("time_s")
        return f"{base / mine:.2f}x speed" if base and mine else "-"
    return ""


def _accuracy_column(report: dict[str, Any]) -> str:
    acc = report.get("accuracy") or {}
    parts = []
    if "algebraic_rel_err_max" in acc:
        parts.append(f"LA {acc['algebraic_rel_err_max']:.1e}")
    if "singular_rel_err_max" in acc:
        parts.append(f"SV {acc['singular_rel_err_max']:.1e}")
    return ", ".join(parts) or "-"


def markdown_table(results: dict[str, Any], show_run: bool = False) -> str:
    """The results table; ``show_run`` adds the run each row comes from (for tables merged from several runs)."""
    lines = [
        "| size | phase | seconds | annotations/s | cores | annotations/s/core | CPU s (tree) "
        "| peak RSS MiB (tree) | ratio | max rel. eigenvalue error |" + (" run |" if show_run else ""),
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|" + ("---:|" if show_run else ""),
    ]
    for size in results["sizes"]:
        phases = size["phases"]
        for name, report in phases.items():
            run = f" {report.get('run', '')} |" if show_run else ""
            if report.get("returncode") != 0:
                lines.append(
                    f"| {_size(size)} | {PHASE_LABELS.get(name, name)} | failed "
                    f"({report.get('returncode')}) | | | | | {report['peak_rss_bytes'] / 2**20:.0f} | | |{run}"
                )
                continue
            lines.append(
                "| {n} | {label} | {t} | {aps} | {cores} | {apc} | {cpu} | {rss} | {ratio} | {acc} |{run}".format(
                    n=_size(size),
                    label=PHASE_LABELS.get(name, name),
                    t=_fmt(report.get("time_s")),
                    aps=_fmt(report.get("annotations_per_s")),
                    cores=report.get("cores", "-"),
                    apc=_fmt(report.get("annotations_per_s_per_core")),
                    cpu=_fmt(report.get("tree_cpu_s")),
                    rss=_fmt(report["peak_rss_bytes"] / 2**20, ".0f"),
                    ratio=_ratio_column(name, report, phases),
                    acc=_accuracy_column(report),
                    run=run,
                )
            )
    return "\n".join(lines)


def goals(results: dict[str, Any]) -> list[str]:
    """The issue's goals, judged on this run's numbers."""
    out = []
    sizes = {s["n_annotations_requested"]: s for s in results["sizes"]}
    for size in results["sizes"]:
        c = size["checks"]
        if "count_per_core_ratio" in c:
            ok = c["count_per_core_ratio"] >= 2
            out.append(
                f"- Counting >= 2x the in-memory baseline's annotations/s per core at "
                f"{_size(size)}: "
                f"{'met' if ok else 'NOT met'} ({c['count_per_core_ratio']:.2f}x per nominal core; raw "
                f"{c['count_raw_ratio']:.2f}x; per CPU-second of the process tree "
                f"{c.get('count_per_cpu_s_ratio', float('nan')):.2f}x)."
            )
        if "counts_agree_with_inmem" in c:
            out.append(
                f"- Counts identical to the in-memory baseline at {_size(size)} (examples, "
                "labels, annotations, distinct pairs, pair total): "
                f"{'yes' if c['counts_agree_with_inmem'] else 'NO'}."
            )
        for name, setting in (
            ("factorize", "library-default BLAS threads"),
            ("factorize-blas1", "BLAS pinned to 1 thread for both"),
            ("factorize-dask", "Dask LocalCluster vs randomized_svd with BLAS pinned to 1 thread"),
        ):
            ratio = c.get(f"{name}_speedup_vs_rsvd")
            if ratio is None:
                continue
            out.append(
                f"- Factorization no slower than `randomized_svd` at {_size(size)} (equal k, "
                f"oversampling, iterations; {setting}): {'met' if ratio >= 1 else 'NOT met'} "
                f"({ratio:.2f}x its speed)."
            )
    ordered = sorted(sizes)
    spans = list(itertools.pairwise(ordered))
    if len(ordered) > 2:  # and the whole span, which the goal is about (from 10^6 to 10^8 annotations)
        spans.append((ordered[0], ordered[-1]))
    for lo, hi in spans:
        small, large = sizes[lo], sizes[hi]
        for name in ("count", "count-serial", "inmem-count", "factorize-blas1", "embed"):
            a, b = small["phases"].get(name), large["phases"].get(name)
            if not (a and b and a.get("returncode") == 0 and b.get("returncode") == 0):
                continue
            growth = b["peak_rss_bytes"] / a["peak_rss_bytes"] - 1
            judged = name == "count" and (lo, hi) == (10**6, 10**8)
            verdict = ("met" if abs(growth) <= 0.2 else "NOT met") if judged else "for reference"
            out.append(
                f"- Peak RSS from {_size(small)} to {_size(large)} annotations, {PHASE_LABELS[name]}: "
                f"{growth:+.0%} "
                f"({a['peak_rss_bytes'] / 2**20:.0f} -> {b['peak_rss_bytes'] / 2**20:.0f} MiB): {verdict}"
                + (" (goal: within 20%)." if judged else ".")
            )
    return out


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    import pmi_pipeline

    vm = psutil.virtual_memory()
    info = {
        "hostname": platform.node(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "memory_gib": round(vm.total / 2**30, 1),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "pmi_pipeline": pmi_pipeline.__version__,
        "host_speed": host_speed(),  # ratios between our phases and the baseline's move with it (see common.py)
        "numpy_environ": sort_dispatch().sort_environ(),  # the phases'; host_speed sorts with numpy's default
    }
    for mod in ("numpy", "scipy", "pyarrow", "dask", "distributed", "sklearn"):
        with contextlib.suppress(ImportError):
            info[mod] = __import__(mod).__version__
    return info


def _host_line(speed: dict[str, float]) -> str:
    """``common.host_speed``'s figures in words (the ratios to the baseline move with them)."""
    return (
        f"empty Python loop {speed['python_loop_ns']} ns/iteration, np.sort {speed['sort_ns']} ns/element, "
        f"fresh memory {speed['fault_ns_per_byte']} ns/byte"
    )


def corpus_table(sizes: list[dict[str, Any]]) -> str:
    """What each corpus held: examples, shards, distinct pairs (what our counts' memory grows with)."""
    lines = [
        "| size | annotations | examples | shards | corpus MB (zstd) | labels seen | distinct pairs | PMI nnz |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size in sizes:
        ph = size["phases"]
        synth, count, pmi = ph.get("synth", {}), ph.get("count") or ph.get("inmem-count") or {}, ph.get("pmi", {})
        lines.append(
            f"| {_size(size)} | {size['n_annotations']:,} | {synth.get('n_examples', '-'):,} "
            f"| {synth.get('n_shards', '-')} "
            f"| {_fmt(synth.get('corpus_bytes', float('nan')) / 1e6, '.0f')} | {count.get('n_labels', '-')} "
            f"| {_fmt(count.get('n_pairs'), ',')} | {_fmt(pmi.get('nnz'), ',')} |"
        )
    return "\n".join(lines)


def _display_command(command: str, notes: list[str]) -> str:
    """The command as a reader would type it: arguments with spaces in double quotes where that is safe."""
    for note in notes:  # results written before commands were shell-quoted
        if f"--note {shlex.quote(note)}" not in command:
            command = command.replace(f"--note {note}", f"--note {shlex.quote(note)}")
    try:
        tokens = shlex.split(command)
    except ValueError:
        return command
    return " ".join(_quote(t) if not t or set(t) & set(" \t'\"$`\\!*?;&|<>()") else t for t in tokens)


def _quote(text: str) -> str:
    """Shell-quote for display: double quotes when that is safe (they read better around apostrophes)."""
    return f'"{text}"' if not set(text) & set('"$`\\!') else shlex.quote(text)


def _rel(path: Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def merge_runs(runs: list[tuple[dict[str, Any], Path]]) -> list[dict[str, Any]]:
    """One entry per corpus size over several runs; a phase measured again in a later run replaces the earlier
    measurement (each phase keeps the number of the run it comes from), and the checks are recomputed."""
    merged: dict[int, dict[str, Any]] = {}
    for number, (results, _) in enumerate(runs, 1):
        for size in results["sizes"]:
            key = int(size["n_annotations_requested"])
            target = merged.setdefault(
                key,
                {"n_annotations_requested": key, "n_annotations": size["n_annotations"], "phases": {}},
            )
            target["synth"] = size.get("synth")
            for name, report in size["phases"].items():
                target["phases"][name] = {**report, "run": number}
    for size in merged.values():
        size["checks"] = _checks(size["phases"])
    return [merged[key] for key in sorted(merged)]


def write_docs(runs: list[tuple[dict[str, Any], Path]], assembled_by: str | None = None) -> None:
    """Replace the marked block of docs/performance.md with the table of one or more runs."""
    sizes = merge_runs(runs)
    combined = {"sizes": sizes}
    first = runs[0][0]
    m, a = first["machine"], first["args"]
    run_lines = []
    for number, (results, json_path) in enumerate(runs, 1):
        rm = results["machine"]
        command = _display_command(results["command"], results["args"].get("note") or [])
        run_lines.append(
            f"{number}. {results['date']}: `{command}` (load average {rm['load_average_at_start']} at the "
            f"start, {results['load_average_at_end']} at the end; {results['total_s'] / 60:.0f} min; each "
            f"measured phase run {results['args'].get('repeat', 1)}x in interleaved rounds, the fastest "
            f"shown; raw results `{_rel(json_path)}`)"
            + (f"; host speed {_host_line(rm['host_speed'])}" if "host_speed" in rm else "")
        )
    notes = [note for results, _ in runs for note in results.get("notes", [])]
    block = "\n".join(
        [
            DOCS_START,
            f"Machine: {m['cpu_count']} cores, {m['memory_gib']:.0f} GiB, a VM shared with other engineers' "
            "jobs during the runs (see the load averages: above 2 means the cores were oversubscribed, so "
            f"times are noisy and, if anything, pessimistic). Python {m['python']}, numpy {m.get('numpy')}, "
            f"scipy {m.get('scipy')}, pyarrow {m.get('pyarrow')}, dask {m.get('dask')}, scikit-learn "
            f"{m.get('sklearn')}.",
            "",
            "Runs:",
            "",
            *run_lines,
            *(["", f"Table assembled from them with `{assembled_by}`."] if assembled_by else []),
            "",
            f"Corpus: `pmi_pipeline.synth` ({a['labels']} labels, {a['mean_labels']} labels per example, "
            f"Zipf exponent 1, one latent group per 20 labels, {a['shard_size']} examples per shard). "
            f"Factorization: k = {a['dim']}, oversampling {a['oversamples']}, {a['power_iter']} power "
            "iterations for ours and `randomized_svd` alike, all on our PMI matrix (default `PMIParams`; "
            "ours with `EmbedParams`' default spectral shift). Dask: "
            f"`dask_client(n_workers={a['workers']})` (one single-threaded worker process per core).",
            "",
            markdown_table(combined, show_run=len(runs) > 1),
            "",
            corpus_table(sizes),
            "",
            "Columns: *seconds* is the phase's own work (imports and Dask cluster start excluded); *cores* is"
            " the nominal parallelism (Dask worker threads; 1 for the single-process baselines, whose pyarrow"
            " reading may still use a second thread; for single-process factorizations, the BLAS threads); "
            "*CPU s* and *peak RSS* cover the phase's process and all its children (Dask scheduler, nanny and "
            "worker processes), sampled every 50 ms, and include interpreter and cluster start. *ratio* is, for"
            " counting, annotations/s per core relative to the in-memory baseline, and for factorization, "
            "speed relative to `randomized_svd` under the same BLAS threading. *max rel. eigenvalue error*: "
            "LA = top-k algebraic eigenvalues against `eigsh(which='LA')` (for SVD methods, the signed "
            "Rayleigh quotients of their vectors, sorted); SV = singular values against `svds`. "
            "*BLAS 1 thread*: OpenBLAS pinned to one thread (as Dask's nanny does for its workers).",
            "",
            "Goals (from the issue), judged on these numbers:",
            "",
            *goals(combined),
            *(["", *notes] if notes else []),
            DOCS_END,
        ]
    )
    text = DOCS_FILE.read_text() if DOCS_FILE.exists() else ""
    if DOCS_START in text and DOCS_END in text:
        head, rest = text.split(DOCS_START, 1)
        _, tail = rest.split(DOCS_END, 1)
        text = head + block + tail
    else:
        if not text:
            text = (
                "# Performance\n\nThroughput and peak memory of the pipeline's out-of-core stages, against "
                "the in-memory scipy approach of the seed blog, measured in the same run.\n"
            )
        text = text.rstrip("\n") + "\n\n## Counting and factorization (`bench/embed.py`)\n\n" + block + "\n"
    DOCS_FILE.parent.mkdir(parents=True, exist_ok=True)
    DOCS_FILE.write_text(text)


def main_report(args: argparse.Namespace) -> int:
    """Rebuild the table (and docs) from saved results, e.g. a 10^6 + 10^7 run and a separate 10^8 run."""
    runs = [(json.loads(Path(path).read_text()), Path(path)) for path in args.results]
    sizes = merge_runs(runs)
    print(markdown_table({"sizes": sizes}, show_run=len(runs) > 1))
    print()
    print(corpus_table(sizes))
    print()
    print("\n".join(goals({"sizes": sizes})))
    if not args.no_docs:
        write_docs(runs, assembled_by=" ".join(["python bench/embed.py report", *map(_rel, args.results)]))
        print(f"table written to {DOCS_FILE}")
    return 0


def main_run(args: argparse.Namespace) -> int:
    tmp_root = Path(args.tmp)
    tmp_root.mkdir(parents=True, exist_ok=True)
    started = time.time()
    results: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join(["python", "bench/embed.py", *args.argv]),
        "machine": machine_info(args),
        "args": {k: v for k, v in vars(args).items() if k not in ("func", "argv")},
        "sizes": [],
        "notes": list(args.note or []),
    }
    print(f"host speed: {_host_line(results['machine']['host_speed'])}", flush=True)
    for n in args.sizes:
        results["sizes"].append(bench_size(n, args, tmp_root))
    results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["total_s"] = time.time() - started
    table = markdown_table(results)
    goal_lines = goals(results)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path = Path(args.results_dir) / f"embed-{stamp}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    results["goals"] = goal_lines
    json_path.write_text(json.dumps(results, indent=2, default=_jsonable) + "\n")
    print(table)
    print()
    print("\n".join(goal_lines))
    print(f"\nresults: {json_path}  (total {results['total_s']:.0f} s)")
    if not args.no_docs:
        write_docs([(results, json_path)])
        print(f"table written to {DOCS_FILE}")
    return 0


def _count_arg(text: str) -> int:
    value = float(text)
    if value != int(value) or value < 1:
        raise argparse.ArgumentTypeError(f"not a positive whole number: {text!r}")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench/embed.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawTextHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the benchmark")
    run.add_argument("--sizes", type=_count_arg, nargs="+", default=[10**6, 10**7], help="annotations per corpus")
    run.add_argument("--labels", type=_count_arg, default=20_000, help="labels (default 20000)")
    run.add_argument("--mean-labels", type=float, default=5.0, help="labels per example (default 5)")
    run.add_argument(
        "--shard-size",
        type=_count_arg,
        default=50_000,
        help="examples per shard, the same at every size so that per-shard memory is too (default 50000)",
    )
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--workers", type=_count_arg, default=2, help="Dask workers (default 2)")
    run.add_argument("--synth-workers", type=_count_arg, default=1, help="processes writing the corpus")
    run.add_argument("--dim", type=_count_arg, default=64, help="k (default 64)")
    run.add_argument("--oversamples", type=int, default=64, help="oversampling p (default 64)")
    run.add_argument("--power-iter", type=int, default=4, help="power iterations q (default 4)")
    run.add_argument(
        "--phases",
        nargs="+",
        choices=ALL_PHASES,
        default=list(DEFAULT_PHASES),
        help="phases to run (default all)",
    )
    run.add_argument(
        "--skip-eigsh-above",
        type=_count_arg,
        default=None,
        help="skip the eigsh reference above this many annotations",
    )
    run.add_argument(
        "--repeat",
        type=_count_arg,
        default=1,
        help="runs of each measured phase, in rounds; the fastest is reported (svds, eigsh run once)",
    )
    run.add_argument("--timeout", type=float, default=1800, help="seconds per phase before it is killed")
    run.add_argument("--tmp", default="/tmp", help="where corpora are written (deleted afterwards)")
    run.add_argument("--keep", action="store_true", help="keep the corpora and intermediate files")
    run.add_argument("--results-dir", default=str(RESULTS_DIR))
    run.add_argument("--no-docs", action="store_true", help="do not touch docs/performance.md")
    run.add_argument("--note", action="append", help="a line added under the table (repeatable)")
    report = sub.add_parser("report", help="table and docs from saved results (several runs combined)")
    report.add_argument(
        "results", nargs="+", help="bench/results/embed-*.json files, oldest first: later runs replace phases"
    )
    report.add_argument("--no-docs", action="store_true", help="only print")
    phase = sub.add_parser("_phase", help=argparse.SUPPRESS)
    phase.add_argument("name", choices=sorted(PHASES))
    phase.add_argument("spec")
    phase.add_argument("result")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command == "_phase":
        return child_main(args.name, args.spec, args.result)
    if args.command == "report":
        return main_report(args)
    args.argv = argv
    return main_run(args)


if __name__ == "__main__":
    sys.exit(main())
