"""The embedding stages composed: new shards -> counts -> PMI -> factorization -> aligned, published version.

Only shards whose content hash is not in the latest version's manifest are counted; their counts are added to the
stored ones, so ``embed`` on a growing shard directory is incremental and running it twice adds nothing. The new
factorization starts from the previous version's vectors (warm start) and is rotated onto the previous version on
the labels they share (orthogonal Procrustes), so a model trained on the previous version keeps decoding; labels
seen for the first time get their place from their co-occurrences with known labels and can be predicted at once.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import scipy.linalg

from pmi_pipeline import __version__
from pmi_pipeline.cooccurrence import Counts, count_shards, repeat_error
from pmi_pipeline.errors import PipelineError, ShardError, StoreError
from pmi_pipeline.example_ids import ExampleIndex, find_repeats
from pmi_pipeline.factorize import FactorizeParams, factorize
from pmi_pipeline.pmi import PMIParams, pmi_matrix
from pmi_pipeline.shards import discover_shards, shard_hash
from pmi_pipeline.store import EmbeddingStore, EmbeddingVersion

if TYPE_CHECKING:
    from distributed import Client

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass(frozen=True)
class EmbedParams:
    """Every parameter that shapes an embedding; saved with each version so it can be traced and reproduced."""

    pmi: Literal["pmi", "ppmi"] = "pmi"
    shift: float = 1.0
    smoothing: float = 1.0
    min_count: int = 1
    min_pair_count: int = 1
    factorization: Literal["eig", "svd"] = "eig"
    dim: int = 256  # measured: see docs/results.md (delicious P@1 +3 from k = 64 to 256; bibtex has 63 positive)
    power: float = 0.0  # measured: better than the seed's 0.5 on bibtex and on delicious at k = 256
    n_oversamples: int | None = None
    n_power_iter: int = 8
    spectral_shift: Literal["auto"] | float = "auto"  # without it small positive eigenvalues are missed
    seed: int = 0
    warm_start: bool = True
    align: bool = True

    def __post_init__(self) -> None:
        self.pmi_params()  # validate early, with the messages of the stage that owns each parameter
        self.factorize_params()

    def pmi_params(self) -> PMIParams:
        return PMIParams(
            variant=self.pmi,
            shift=self.shift,
            smoothing=self.smoothing,
            min_count=self.min_count,
            min_pair_count=self.min_pair_count,
        )

    def factorize_params(self) -> FactorizeParams:
        return FactorizeParams(
            method=self.factorization,
            dim=self.dim,
            power=self.power,
            n_oversamples=self.n_oversamples,
            n_power_iter=self.n_power_iter,
            spectral_shift=self.spectral_shift,
            seed=self.seed,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EmbedParams:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown embed parameter(s): {unknown}")
        return cls(**data)


@dataclass
class EmbedResult:
    """What an ``embed`` run did. ``version`` is None when there was nothing new to publish."""

    store: str
    version: str | None
    parent: str | None
    n_examples: int
    n_labels: int  # rows of the embedding
    n_labels_total: int  # labels counted (>= n_labels under min_count)
    dim: int
    dim_requested: int
    eigenvalues: list[float]
    n_positive_eigenvalues: int
    new_shards: list[str] = field(default_factory=list)
    skipped_shards: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    n_new_annotations: int = 0
    n_pairs: int = 0
    alignment: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def new_shards(store_path: str | Path, paths: Sequence[str | Path]) -> list[Path]:
    """Shards whose content is not yet counted in the store's latest version (duplicates by content dropped)."""
    return list(split_new(paths, EmbeddingStore(store_path).read_manifest()).new)


@dataclass
class ShardListing:
    """Listed shards sorted out against a store's manifest."""

    new: dict[Path, str] = field(default_factory=dict)  # path -> content hash, to count
    skipped: list[Path] = field(default_factory=list)  # content already counted
    changed: list[ShardError] = field(default_factory=list)  # a counted path whose content is different now


def split_new(paths: Sequence[str | Path], manifest: dict[str, Any]) -> ShardListing:
    """Which shards are new, already counted (by content), or changed since they were counted at the same path.

    A changed shard is not counted: its old content is in the counts, which cannot be taken out again, so counting
    the new content would count its unchanged examples twice. Rename it if it really is new data.
    """
    listing, seen = ShardListing(), set(manifest)
    counted_at = {_abs(entry["path"]): digest for digest, entry in manifest.items() if entry.get("path")}
    for path in map(Path, paths):
        digest = shard_hash(path)
        if digest in seen:
            listing.skipped.append(path)
        elif _abs(path) in counted_at:
            listing.changed.append(
                ShardError(
                    path,
                    f"changed after it was counted (now {digest[:19]}..., counted as "
                    f"{counted_at[_abs(path)][:19]}...): its old content is in the counts and cannot be taken out, "
                    "so the new content is not counted; write new data under a new name, or re-embed into a new store",
                )
            )
        else:
            seen.add(digest)
            listing.new[path] = digest
    return listing


def _abs(path: str | Path) -> str:
    return os.path.abspath(path)


def embed(
    shard_specs: Sequence[str | Path],
    store_path: str | Path,
    params: EmbedParams = EmbedParams(),
    client: Client | None = None,
    *,
    progress: Progress | None = None,
    wait: bool = True,
) -> EmbedResult:
    """Count the new shards among ``shard_specs`` and publish a new version of the store.

    Holds the store's writer lock throughout, so concurrent runs take turns (``wait=False``: fail at once).
    Rejected shards are listed in the result and contribute nothing; the others go on.
    """
    paths = discover_shards(shard_specs)
    if not paths:
        raise PipelineError(f"no Parquet shards found in {', '.join(map(str, shard_specs))}")
    store = EmbeddingStore(store_path)
    with store.lock(wait=wait):
        manifest = store.read_manifest()
        listing = split_new(paths, manifest)
        parent = store.latest
        if not listing.new and parent is not None and _same_params(store, parent, params):
            for error in listing.changed:
                log.error("rejected shard %s", error)
            result = _up_to_date(store, parent, listing.skipped)
            result.rejected = [str(e) for e in listing.changed]
            return result
        prev_counts = store.read_counts()
        index = store.read_example_index()
        counted = count_shards(
            list(listing.new),
            client,
            progress=(lambda d, t: progress("count", d, t)) if progress else None,
            expected_hashes=list(listing.new.values()),
            index=index,
            names={digest: str(entry.get("path")) for digest, entry in manifest.items()},
        )
        rejected = sorted([*listing.changed, *counted.rejected], key=lambda e: str(e.path))
        for error in rejected:
            log.error("rejected shard %s", error)
        if counted.counts.n_examples == 0 and prev_counts.n_examples == 0:
            detail = "; ".join(str(e) for e in rejected[:3])
            raise PipelineError(f"nothing to embed: no valid annotations in {len(paths)} shard(s). {detail}")
        if not counted.counts.manifest and parent is not None and _same_params(store, parent, params):
            result = _up_to_date(store, parent, listing.skipped)  # every new shard was rejected
            result.rejected = [str(e) for e in rejected]
            result.message = f"nothing new: {len(rejected)} shard(s) rejected, {parent} is unchanged"
            return result
        result = _publish_locked(
            store, prev_counts, counted.counts, params, client, progress=progress, index=index.add(counted.example_ids)
        )
        rejected_paths = {str(e.path) for e in rejected}
        result.new_shards = [str(p) for p in listing.new if str(p) not in rejected_paths]
        result.skipped_shards = [str(p) for p in listing.skipped]
        result.rejected = [str(e) for e in rejected]
        result.n_new_annotations = counted.counts.n_annotations
        result.timings = {"count_s": round(counted.seconds, 3), **result.timings}
        return result


def publish_counts(
    store_path: str | Path,
    parts: Sequence[tuple[Counts, np.ndarray]],
    params: EmbedParams = EmbedParams(),
    client: Client | None = None,
    *,
    progress: Progress | None = None,
    wait: bool = True,
) -> EmbedResult:
    """Add already-counted shards to the store and publish a version.

    ``parts`` are per-shard counts with their example-id fingerprints (:func:`count_shard_with_ids`, e.g. cached
    by a flow), in priority order: a shard that repeats an example id of the store or of an earlier part is
    rejected, as in :func:`embed`.
    """
    store = EmbeddingStore(store_path)
    with store.lock(wait=wait):
        manifest = store.read_manifest()
        keys = [next(iter(c.manifest)) for c, _ in parts]
        overlap = set(manifest) & set(keys)
        if overlap:
            raise StoreError(
                f"{store.path}: {len(overlap)} shard(s) are already counted in version "
                f"{store.latest} (e.g. {sorted(overlap)[0]}); a concurrent run may have added them"
            )
        prev_counts, index = store.read_counts(), store.read_example_index()
        repeats = find_repeats(index, [(str(i), ids) for i, (_, ids) in enumerate(parts)])
        names = {digest: str(entry.get("path")) for digest, entry in manifest.items()}
        path_of = [str(c.manifest[k].get("path")) for (c, _), k in zip(parts, keys, strict=True)]
        rejected = []
        for repeat in repeats:
            other = path_of[int(repeat.other)] if repeat.other.isdigit() else names.get(repeat.other, repeat.other)
            rejected.append(repeat_error(path_of[int(repeat.shard)], repeat, f"shard {other}"))
        dropped = {int(r.shard) for r in repeats}
        kept = [part for i, part in enumerate(parts) if i not in dropped]
        new_counts = Counts.sum(c for c, _ in kept)
        if new_counts.n_examples == 0 and prev_counts.n_examples == 0:
            raise PipelineError(f"nothing to embed: {'; '.join(str(e) for e in rejected[:3]) or 'no shards'}")
        new_index = index.add({next(iter(c.manifest)): ids for c, ids in kept})
        result = _publish_locked(store, prev_counts, new_counts, params, client, progress=progress, index=new_index)
        result.n_new_annotations = new_counts.n_annotations
        result.new_shards = sorted(str(v.get("path")) for v in new_counts.manifest.values())
        result.rejected = [str(e) for e in rejected]
        return result


def _same_params(store: EmbeddingStore, version: str, params: EmbedParams) -> bool:
    return store.read_attrs(version).get("params") == params.to_dict()


def _up_to_date(store: EmbeddingStore, version: str, skipped: list[Path]) -> EmbedResult:
    attrs = store.read_attrs(version)
    return EmbedResult(
        store=str(store.path),
        version=None,
        parent=version,
        n_examples=int(attrs.get("n_examples", 0)),
        n_labels=int(attrs.get("n_labels", 0)),
        n_labels_total=int(attrs.get("n_labels_total", 0)),
        dim=int(attrs.get("dim", 0)),
        dim_requested=int(attrs.get("dim_requested", 0)),
        eigenvalues=list(attrs.get("eigenvalues", [])),
        n_positive_eigenvalues=int(attrs.get("n_positive_eigenvalues", 0)),
        skipped_shards=[str(p) for p in skipped],
        message=f"nothing new: all {len(skipped)} shard(s) are already counted in {version}, "
        "and the parameters are unchanged",
    )


def _publish_locked(
    store: EmbeddingStore,
    prev_counts: Counts,
    new_counts: Counts,
    params: EmbedParams,
    client: Client | None,
    *,
    progress: Progress | None = None,
    index: ExampleIndex | None = None,
) -> EmbedResult:
    timings: dict[str, float] = {}
    total = prev_counts.merge(new_counts)  # the stored vocabulary order, new labels appended sorted
    start = time.perf_counter()
    matrix, kept = pmi_matrix(total, params.pmi_params())
    timings["pmi_s"] = round(time.perf_counter() - start, 3)
    labels = total.labels[kept]
    if labels.size < 2:
        raise PipelineError(f"only {labels.size} label(s) pass min_count={params.min_count}: nothing to embed")

    parent_name = store.latest
    parent = store.read(parent_name) if parent_name else None
    init = _warm_start(parent, labels) if (parent is not None and params.warm_start) else None
    fparams = params.factorize_params()
    iteration = [0]

    def report(_: str) -> None:
        iteration[0] += 1
        if progress:
            progress("factorize", iteration[0], fparams.n_power_iter)

    fact = factorize(matrix, fparams, client, init=init, progress=report)
    timings["factorize_s"] = round(fact.seconds, 3)
    embedding = fact.embedding
    alignment = None
    if parent is not None and params.align:
        embedding, alignment = align_to_parent(embedding, labels, parent)

    start = time.perf_counter()
    attrs = {
        "params": params.to_dict(),
        "pmi_pipeline_version": __version__,
        "n_examples": int(total.n_examples),
        "n_annotations": int(total.n_annotations),
        "n_labels_total": int(total.n_labels),
        "n_pairs": int(total.n_pairs),
        "pmi_nnz": int(matrix.nnz),
        "dim_requested": int(params.dim),
        "n_positive_eigenvalues": int(fact.n_positive),
        "ritz_values": [float(v) for v in fact.ritz_values],
        "eigenvalues": [float(v) for v in fact.eigenvalues],
        "spectral_shift_used": float(fact.shift),
        "shard_hashes": sorted(total.manifest),
        "alignment": alignment,
        "timings": timings,
    }
    name = store.publish(
        embedding=embedding,
        labels=labels,
        label_counts=total.label_counts[kept],
        eigenvalues=fact.eigenvalues,
        counts=total,
        attrs=attrs,
        example_index=index,
    )
    timings["publish_s"] = round(time.perf_counter() - start, 3)
    log.info(
        "published %s: %d labels x %d dims from %d examples",
        name,
        labels.size,
        embedding.shape[1],
        total.n_examples,
    )
    return EmbedResult(
        store=str(store.path),
        version=name,
        parent=parent_name,
        n_examples=int(total.n_examples),
        n_labels=int(labels.size),
        n_labels_total=int(total.n_labels),
        dim=int(embedding.shape[1]),
        dim_requested=int(params.dim),
        eigenvalues=[float(v) for v in fact.eigenvalues],
        n_positive_eigenvalues=int(fact.n_positive),
        n_pairs=int(total.n_pairs),
        alignment=alignment,
        timings=timings,
        message=f"published {name}",
    )


def _warm_start(parent: EmbeddingVersion, labels: np.ndarray) -> np.ndarray | None:
    """The parent's embedding columns as the first sketch columns, rows mapped to the new labels (0 for new ones).

    Its column space is the parent's leading eigenspace (scaling and rotation do not change a span), which is
    where the new one will be when the corpus grew by a little.
    """
    index = parent.index()
    rows = np.array([index.get(label, -1) for label in labels.tolist()])
    if (rows >= 0).sum() < parent.dim:
        return None
    init = np.zeros((labels.size, parent.dim))
    init[rows >= 0] = parent.embedding[rows[rows >= 0]]
    return init


def align_to_parent(
    embedding: np.ndarray, labels: np.ndarray, parent: EmbeddingVersion
) -> tuple[np.ndarray, dict[str, Any]]:
    """Rotate ``embedding`` onto the parent's on their shared labels (orthogonal Procrustes).

    An eigenbasis is defined only up to sign and rotation within (near-)degenerate eigenspaces, so without this a
    model trained on the parent would decode garbage against the new version. The rotation is orthogonal, so
    cosines between labels, and hence the new version's own quality, are unchanged.
    """
    index = parent.index()
    pairs = [(i, index[label]) for i, label in enumerate(labels.tolist()) if label in index]
    summary: dict[str, Any] = {"parent": parent.name, "n_shared": len(pairs)}
    if embedding.shape[1] != parent.dim or len(pairs) < embedding.shape[1]:
        summary["skipped"] = (
            f"dimensions differ ({embedding.shape[1]} vs {parent.dim})"
            if embedding.shape[1] != parent.dim
            else "too few shared labels"
        )
        return embedding, summary
    new_rows, old_rows = (np.array(x) for x in zip(*pairs, strict=True))
    a = embedding[new_rows].astype(np.float64)
    b = parent.embedding[old_rows].astype(np.float64)
    rotation, _ = scipy.linalg.orthogonal_procrustes(a, b)
    aligned = (embedding.astype(np.float64) @ rotation).astype(np.float32)
    summary["mean_cosine_unaligned"] = _mean_row_cosine(a, b)
    summary["mean_cosine"] = _mean_row_cosine(aligned[new_rows].astype(np.float64), b)
    summary["n_new_labels"] = int(labels.size - len(pairs))
    return aligned, summary


def _mean_row_cosine(a: np.ndarray, b: np.ndarray) -> float:
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    ok = norms > 0
    return float(np.mean(np.sum(a[ok] * b[ok], axis=1) / norms[ok])) if ok.any() else 0.0
