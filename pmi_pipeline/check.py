"""Integrity check of an embedding store: what a reader may trust, and what is wrong where it may not.

Checks the root metadata and ``latest``, then, for every version, that its arrays are readable and agree with each
other (shapes, vocabulary, finite values), that their contents still match the checksums recorded when it was
published, and that its accumulated counts are consistent (pairs once each in the upper triangle, in range, no
pair more frequent than its labels, the manifest adding up to ``n_examples``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.storage import LocalStore

from pmi_pipeline.errors import StoreError
from pmi_pipeline.store import EmbeddingStore, array_checksum


@dataclass(frozen=True)
class Problem:
    where: str  # "store", a version name, or "version/array"
    message: str
    severity: str = "error"  # "error": do not trust it; "warning": harmless but worth knowing

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.severity}: {self.where}: {self.message}"


def check_store(path: str | Path, versions: list[str] | None = None) -> list[Problem]:
    """All problems found in the store at ``path`` (empty: the store is sound). Reads every array once."""
    store = EmbeddingStore(path)
    try:
        latest = store.latest
        if not store.exists():
            return [Problem("store", f"no embedding store at {store.path}")]
    except StoreError as exc:
        return [Problem("store", str(exc))]
    problems: list[Problem] = []
    names = store.versions()
    if latest is not None and latest not in names:
        problems.append(Problem("store", f"latest names {latest!r}, which is not a complete version"))
    unpublished = store.unpublished()
    if unpublished:
        problems.append(
            Problem(
                "store",
                f"version(s) written but never made latest, by a writer killed while publishing (removed by the "
                f"next publish): {', '.join(unpublished)}",
                "warning",
            )
        )
    leftovers = sorted(p.name for p in (store.path / "versions").glob(".tmp-*"))
    if leftovers:
        problems.append(
            Problem("store", f"unfinished writes (removed by the next publish): {', '.join(leftovers)}", "warning")
        )
    for name in versions or names:
        if name not in names:
            problems.append(Problem(name, "no such version"))
            continue
        problems.extend(_check_version(store.path / "versions" / name, name))
    return problems


def _read(group: zarr.Group, name: str, where: str, problems: list[Problem]) -> np.ndarray | None:
    try:
        return np.asarray(group[name][...])
    except Exception as exc:  # any failure to decode a chunk is what this check exists to report
        problems.append(Problem(f"{where}/{name}", f"unreadable ({type(exc).__name__}: {exc})"))
        return None


def _check_version(path: Path, name: str) -> list[Problem]:
    problems: list[Problem] = []
    try:
        group = zarr.open_group(LocalStore(path, read_only=True), mode="r")
        attrs = dict(group.attrs)
        counts = group["counts"]
    except Exception as exc:
        return [Problem(name, f"unreadable version metadata ({type(exc).__name__}: {exc})")]
    arrays = {n: _read(group, n, name, problems) for n in ("embedding", "labels", "label_counts", "eigenvalues")}
    count_arrays = {
        n: _read(counts, n, f"{name}/counts", problems)
        for n in ("labels", "label_counts", "pair_row", "pair_col", "pair_count")
    }
    id_arrays = (
        {n: _read(group["example_ids"], n, f"{name}/example_ids", problems) for n in ("hash", "shard")}
        if "example_ids" in group
        else {}
    )
    checksums = attrs.get("checksums")
    if not checksums:
        problems.append(Problem(name, "no checksums recorded (written by an older pmi-pipeline)", "warning"))
    else:
        for key, data in [
            *arrays.items(),
            *((f"counts/{k}", v) for k, v in count_arrays.items()),
            *((f"example_ids/{k}", v) for k, v in id_arrays.items()),
        ]:
            if data is not None and checksums.get(key) != array_checksum(data):
                problems.append(Problem(f"{name}/{key}", "contents do not match the checksum recorded at publish"))
    if any(v is None for v in [*arrays.values(), *count_arrays.values()]):
        return problems

    emb, labels, label_counts, eig = (arrays[k] for k in ("embedding", "labels", "label_counts", "eigenvalues"))
    m = labels.shape[0]
    if emb.ndim != 2 or emb.shape[0] != m:
        problems.append(Problem(f"{name}/embedding", f"shape {emb.shape} does not match {m} labels"))
    elif eig.shape != (emb.shape[1],):
        problems.append(Problem(f"{name}/eigenvalues", f"{eig.shape} for {emb.shape[1]} dimensions"))
    if label_counts.shape != (m,):
        problems.append(Problem(f"{name}/label_counts", f"shape {label_counts.shape} for {m} labels"))
    if not np.all(np.isfinite(emb)) or not np.all(np.isfinite(eig)):
        problems.append(Problem(f"{name}/embedding", "non-finite values"))
    if len(set(labels.tolist())) != m:
        problems.append(Problem(f"{name}/labels", "duplicate labels"))

    c_labels, c_counts = count_arrays["labels"], count_arrays["label_counts"]
    rows, cols, pairs = count_arrays["pair_row"], count_arrays["pair_col"], count_arrays["pair_count"]
    where = f"{name}/counts"
    big_m = c_labels.shape[0]
    if c_counts.shape != (big_m,) or not (rows.shape == cols.shape == pairs.shape):
        problems.append(Problem(where, "array lengths disagree"))
        return problems
    if rows.size and (rows.min() < 0 or cols.max() >= big_m or np.any(rows >= cols)):
        problems.append(Problem(where, "pairs must satisfy 0 <= row < col < number of labels"))
    elif rows.size:
        if np.any(pairs < 1):
            problems.append(Problem(where, "pair counts must be positive"))
        if np.any(pairs > np.minimum(c_counts[rows], c_counts[cols])):
            problems.append(Problem(where, "a pair is counted more often than one of its labels"))
        keys = rows.astype(np.int64) * big_m + cols
        if np.unique(keys).size != keys.size:
            problems.append(Problem(where, "a pair is stored twice"))
    index = {label: i for i, label in enumerate(c_labels.tolist())}
    missing = [label for label in labels.tolist() if label not in index]
    if missing:
        problems.append(Problem(name, f"{len(missing)} embedded labels are not in the counts, e.g. {missing[0]!r}"))
    elif not np.array_equal(c_counts[[index[label] for label in labels.tolist()]], label_counts):
        problems.append(Problem(f"{name}/label_counts", "differ from the accumulated counts"))
    counts_attrs = dict(counts.attrs)
    manifest = counts_attrs.get("manifest", {})
    n_examples = counts_attrs.get("n_examples")
    if sum(int(v.get("n_examples", 0)) for v in manifest.values()) != n_examples:
        problems.append(Problem(where, f"manifest examples do not add up to n_examples={n_examples}"))
    if attrs.get("n_examples") != n_examples:
        problems.append(Problem(name, f"n_examples {attrs.get('n_examples')} differs from the counts' {n_examples}"))
    if "shard_hashes" in attrs and sorted(attrs["shard_hashes"]) != sorted(manifest):
        problems.append(Problem(name, "shard_hashes differ from the counts' manifest"))
    problems.extend(_check_example_ids(group, id_arrays, manifest, n_examples, name))
    return problems


def _check_example_ids(
    group: zarr.Group, arrays: dict[str, np.ndarray | None], manifest: dict, n_examples: int | None, name: str
) -> list[Problem]:
    """The example-id index: one distinct fingerprint per counted example, each owned by a counted shard."""
    where = f"{name}/example_ids"
    if not arrays:
        return [Problem(where, "no example-id index (an older pmi-pipeline): repeats cannot be detected", "warning")]
    hashes, shard = arrays["hash"], arrays["shard"]
    if hashes is None or shard is None:
        return []
    shards = list(group["example_ids"].attrs.get("shards", []))
    problems = []
    if hashes.shape != shard.shape or hashes.size != n_examples:
        problems.append(Problem(where, f"{hashes.size} fingerprints for {n_examples} examples"))
    elif hashes.size and np.any(hashes[1:] <= hashes[:-1]):
        problems.append(Problem(where, "fingerprints are not strictly increasing (an example counted twice?)"))
    if shard.size and (shard.min() < 0 or shard.max() >= len(shards)):
        problems.append(Problem(where, "a fingerprint names a shard that is not listed"))
    if sorted(shards) != sorted(manifest):
        problems.append(Problem(where, "the indexed shards differ from the counts' manifest"))
    return problems
