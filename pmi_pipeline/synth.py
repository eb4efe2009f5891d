"""Synthetic multi-label corpora with realistic structure, for benchmarks and scale tests.

A corpus is a directory of annotation shards in list form (``example_id`` int64, ``labels`` list<string>,
zstd Parquet, ``shard_size`` examples per file) that any stage of the pipeline reads like real data. The label
model mimics what real label sets look like:

- **Power-law frequencies.** Label ``i`` has a frequency rank (a seeded permutation, so names say nothing
  about frequency) and a base weight ``(rank + 1) ** -zipf_exponent``.
- **Latent groups.** Labels are split into ``n_groups`` groups of nearly equal size. Each example picks one
  group (or, with probability ``two_group_prob``, two distinct groups), with probability proportional to the
  group's total weight, and draws most of its labels (a ``group_share`` of them on average) from those groups
  *without replacement*, by weight. The rest are background labels drawn from the global Zipf distribution.
  Labels of one group therefore co-occur far more often than chance: the structure an embedding should find.
- **Labels per example** are ``1 + Poisson(mean_labels - 1)``: at least one, mean ``mean_labels``. An
  example's labels are a set; they are written sorted by label id.

Generation is vectorized with numpy (no per-example Python loop) and shard-at-a-time, so memory is bounded by
one shard whatever the corpus size, and shards can be written by several processes at once. Every shard has
its own random stream derived from ``(seed, shard index)``, so the bytes written do not depend on the number
of processes.

Besides the shards, :func:`write_corpus` writes ``corpus.json`` (the configuration and the totals, written
last: its presence marks a complete corpus) and ``labels.tsv`` (the ground truth: each label's group,
frequency rank, expected probability and observed count). Neither is a Parquet file, so shard discovery
ignores them.

Example::

    from pmi_pipeline.synth import SynthConfig, write_corpus

    summary = write_corpus("/tmp/corpus", SynthConfig(n_annotations=10_000_000, n_labels=20_000))
    print(summary.n_annotations, summary.annotations_per_s)

Measured with ``bench/embed.py`` on 2 shared cores, one process, 20k labels: 10^8 annotations in 400 shards in
70-113 s depending on the load (0.9-1.4 million annotations/s, Parquet writing included) at a flat 200 MiB peak
RSS; 2.7 MB of zstd Parquet per million annotations.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import multiprocessing
import os
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pmi_pipeline.errors import PipelineError

log = logging.getLogger(__name__)

CORPUS_FILE = "corpus.json"
LABELS_FILE = "labels.tsv"
SHARD_PATTERN = "part-{:05d}.parquet"

# Examples generated per vectorized step inside a shard: keeps the temporaries (n x group size keys and sort
# orders) to a few tens of MB whatever the shard size.
_BATCH = 65_536


@dataclass(frozen=True)
class SynthConfig:
    """Parameters of a synthetic corpus. Give ``n_annotations`` or ``n_examples`` (not both).

    ``n_annotations`` is a target: the number of examples is ``round(n_annotations / mean_labels)`` and the
    total written is within a fraction of a percent of it (labels per example are random).
    """

    n_annotations: int | None = None
    n_examples: int | None = None
    n_labels: int = 20_000
    mean_labels: float = 5.0
    n_groups: int | None = None
    """Latent groups of co-occurring labels; ``None``: one per 20 labels; 0: no groups (pure Zipf)."""
    zipf_exponent: float = 1.0
    group_share: float = 0.8
    """Expected fraction of an example's labels drawn from its latent group(s)."""
    two_group_prob: float = 0.3
    """Probability that an example draws its group labels from two groups instead of one."""
    shard_size: int = 250_000
    """Examples per shard file."""
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.n_annotations is None) == (self.n_examples is None):
            raise ValueError("give exactly one of n_annotations and n_examples")
        if self.n_annotations is not None and self.n_annotations < 1:
            raise ValueError(f"n_annotations must be >= 1, got {self.n_annotations}")
        if self.n_examples is not None and self.n_examples < 1:
            raise ValueError(f"n_examples must be >= 1, got {self.n_examples}")
        if self.n_labels < 1:
            raise ValueError(f"n_labels must be >= 1, got {self.n_labels}")
        if not (1.0 <= self.mean_labels <= self.n_labels):
            raise ValueError(f"mean_labels must be in [1, n_labels], got {self.mean_labels}")
        if self.n_groups is not None and not (0 <= self.n_groups <= self.n_labels):
            raise ValueError(f"n_groups must be in [0, n_labels], got {self.n_groups}")
        if self.zipf_exponent < 0:
            raise ValueError(f"zipf_exponent must be >= 0, got {self.zipf_exponent}")
        if not (0.0 <= self.group_share <= 1.0):
            raise ValueError(f"group_share must be in [0, 1], got {self.group_share}")
        if not (0.0 <= self.two_group_prob <= 1.0):
            raise ValueError(f"two_group_prob must be in [0, 1], got {self.two_group_prob}")
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        if self.shard_size * (self.mean_labels + 10 * math.sqrt(self.mean_labels)) >= 2**31:
            raise ValueError(f"shard_size {self.shard_size} is too large: a shard must hold < 2**31 annotations")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    @property
    def total_examples(self) -> int:
        if self.n_examples is not None:
            return int(self.n_examples)
        return max(1, round(self.n_annotations / self.mean_labels))

    @property
    def total_groups(self) -> int:
        return max(1, self.n_labels // 20) if self.n_groups is None else int(self.n_groups)

    @property
    def n_shards(self) -> int:
        return -(-self.total_examples // self.shard_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SynthConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class SynthSummary:
    """What :func:`write_corpus` wrote."""

    out_dir: Path
    config: SynthConfig
    paths: list[Path]
    n_examples: int
    n_annotations: int
    label_counts: np.ndarray = field(repr=False)
    """Examples per label, in label-id order (label ``i`` is named ``label_name(i, n_labels)``)."""
    elapsed_s: float

    @property
    def mean_labels(self) -> float:
        return self.n_annotations / self.n_examples

    @property
    def annotations_per_s(self) -> float:
        return self.n_annotations / self.elapsed_s if self.elapsed_s > 0 else float("inf")

    @property
    def n_labels_used(self) -> int:
        return int(np.count_nonzero(self.label_counts))

    def top_share(self, fraction: float = 0.01) -> float:
        """Share of all annotations held by the most frequent ``fraction`` of the labels."""
        top = max(1, round(fraction * len(self.label_counts)))
        counts = np.sort(self.label_counts)[::-1]
        return float(counts[:top].sum() / max(1, counts.sum()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "n_examples": self.n_examples,
            "n_annotations": self.n_annotations,
            "mean_labels": self.mean_labels,
            "n_shards": len(self.paths),
            "shards": [p.name for p in self.paths],
            "n_labels_used": self.n_labels_used,
            "top_1pct_label_share": self.top_share(0.01),
            "elapsed_s": self.elapsed_s,
            "annotations_per_s": self.annotations_per_s,
        }


def label_name(index: int | np.ndarray, n_labels: int) -> str | list[str]:
    """``L000123``-style names, zero-padded to at least 6 digits (more when ``n_labels`` needs them)."""
    width = max(6, len(str(max(0, n_labels - 1))))
    if isinstance(index, np.ndarray):
        return [f"L{i:0{width}d}" for i in index.tolist()]
    return f"L{index:0{width}d}"


@dataclass(frozen=True)
class LabelModel:
    """The corpus's hidden structure: label weights, ranks and latent groups. Built from the seed alone."""

    weight: np.ndarray
    """(m,) float64, sums to 1: the global Zipf distribution (background draws and group choice)."""
    rank: np.ndarray
    """(m,) int64: frequency rank of each label id under the global distribution (0 = most frequent)."""
    group_of: np.ndarray
    """(m,) int32: the latent group of each label (-1 when there are no groups)."""
    members: np.ndarray
    """(n_groups, G) int32: label ids of each group, padded with -1."""
    inv_weight: np.ndarray
    """(n_groups, G) float32: 1 / weight of each member (inf for padding), scaling the sampling keys."""
    group_size: np.ndarray
    """(n_groups,) int64."""
    group_cdf: np.ndarray
    label_cdf: np.ndarray


def label_model(config: SynthConfig) -> LabelModel:
    """The label weights and latent groups of ``config``'s corpus (deterministic in ``config.seed``)."""
    m = config.n_labels
    rng = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(0,)))
    rank = rng.permutation(m).astype(np.int64)
    weight = (rank + 1.0) ** -config.zipf_exponent
    weight /= weight.sum()
    n_groups = config.total_groups
    if n_groups == 0:
        group_of = np.full(m, -1, dtype=np.int32)
        members = np.zeros((0, 0), dtype=np.int32)
        inv_weight = np.zeros((0, 0), dtype=np.float32)
        group_size = np.zeros(0, dtype=np.int64)
        group_cdf = np.zeros(0)
    else:
        # Nearly equal groups over a random order of the labels: group membership is independent of frequency.
        order = rng.permutation(m)
        group_size = np.full(n_groups, m // n_groups, dtype=np.int64)
        group_size[: m % n_groups] += 1
        width = int(group_size.max())
        starts = np.concatenate(([0], np.cumsum(group_size)[:-1]))
        slot = np.arange(m) - np.repeat(starts, group_size)
        gid = np.repeat(np.arange(n_groups), group_size)
        members = np.full((n_groups, width), -1, dtype=np.int32)
        members[gid, slot] = order
        group_of = np.empty(m, dtype=np.int32)
        group_of[order] = gid
        inv_weight = np.full((n_groups, width), np.inf, dtype=np.float32)
        inv_weight[gid, slot] = (1.0 / weight[order]).astype(np.float32)
        group_cdf = _cdf(np.bincount(gid, weights=weight[order], minlength=n_groups))
    return LabelModel(
        weight=weight,
        rank=rank,
        group_of=group_of,
        members=members,
        inv_weight=inv_weight,
        group_size=group_size,
        group_cdf=group_cdf,
        label_cdf=_cdf(weight),
    )


def _cdf(weights: np.ndarray) -> np.ndarray:
    cdf = np.cumsum(weights, dtype=np.float64)
    cdf /= cdf[-1]
    cdf[-1] = 1.0  # searchsorted(cdf, u) with u in [0, 1) then never runs off the end
    return cdf


def _draw(cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
    return np.searchsorted(cdf, u, side="right").astype(np.int64)


def generate_batch(model: LabelModel, config: SynthConfig, n: int, rng: np.random.Generator):
    """Labels of ``n`` examples: ``(labels_per_example (n,) int64, flat label ids int32)``.

    Each example's labels are distinct and sorted; examples are in order.
    """
    m = config.n_labels
    k = 1 + rng.poisson(config.mean_labels - 1.0, size=n)
    np.minimum(k, m, out=k)
    n_groups = len(model.group_size)
    if n_groups:
        n_bg = rng.binomial(k, 1.0 - config.group_share)
    else:
        n_bg = k.copy()
    n_grp = k - n_bg

    group_keys: list[np.ndarray] = []
    if n_groups:
        g1 = _draw(model.group_cdf, rng.random(n))
        two = (rng.random(n) < config.two_group_prob) & (n_grp >= 2) if n_groups > 1 else np.zeros(n, bool)
        # A second group distinct from the first (shifting a collision to the next group biases it
        # negligibly).
        g2 = _draw(model.group_cdf, rng.random(n))
        g2 = np.where(g2 == g1, (g2 + 1) % n_groups, g2)
        n2 = np.where(two, n_grp // 2, 0)
        n1 = n_grp - n2
        rows = np.arange(n)
        for g, want in ((g1, n1), (g2, n2)):
            take = np.minimum(want, model.group_size[g])
            n_bg += want - take  # a group too small for its share: the rest become background labels
            sel = take > 0
            if not sel.any():
                continue
            gs, ts, rs = g[sel], take[sel], rows[sel]
            # Weighted sampling without replacement (successive sampling, as Plackett-Luce): the smallest
            # Exp(1) / weight keys win. Padding has weight 0, an infinite key, and is never taken.
            keys = rng.standard_exponential((len(gs), model.members.shape[1]), dtype=np.float32)
            keys *= model.inv_weight[gs]
            order = np.argsort(keys, axis=1)
            chosen = np.take_along_axis(model.members[gs], order, axis=1)
            mask = np.arange(chosen.shape[1]) < ts[:, None]
            group_keys.append(np.repeat(rs, ts) * m + chosen[mask])
    grp = np.concatenate(group_keys) if group_keys else np.zeros(0, dtype=np.int64)

    # Background labels by global frequency, with replacement: draw spares, drop labels the example already
    # has (from its groups or an earlier draw) and keep the first n_bg survivors of each example, in draw
    # order.
    n_cand = np.where(n_bg > 0, 2 * n_bg + 2, 0)
    cand_rows = np.repeat(np.arange(n), n_cand)
    cand = cand_rows * m + _draw(model.label_cdf, rng.random(len(cand_rows)))
    both = np.concatenate((grp, cand))
    uniq, first = np.unique(both, return_index=True)  # stable: `first` is the earliest occurrence
    keep = first < len(grp)
    bg_pos = np.flatnonzero(~keep)
    by_draw = bg_pos[np.argsort(first[bg_pos], kind="stable")]
    bg_rows = uniq[by_draw] // m
    rank_in_row = np.arange(len(by_draw)) - np.searchsorted(bg_rows, bg_rows, side="left")
    keep[by_draw[rank_in_row < n_bg[bg_rows]]] = True
    final = uniq[keep]  # sorted by (example, label)
    counts = np.bincount(final // m, minlength=n)
    return counts, (final % m).astype(np.int32)


def _shard_rng(config: SynthConfig, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(1, index)))


def shard_table(config: SynthConfig, index: int, model: LabelModel | None = None, names: pa.Array | None = None):
    """Shard ``index`` of the corpus as an Arrow table, and its label counts ((m,) int64)."""
    model = model if model is not None else label_model(config)
    names = names if names is not None else pa.array(label_name(np.arange(config.n_labels), config.n_labels))
    start = index * config.shard_size
    n = min(config.shard_size, config.total_examples - start)
    if n <= 0:
        raise ValueError(f"shard {index} is past the end of the corpus ({config.n_shards} shards)")
    rng = _shard_rng(config, index)
    sizes, flat = [], []
    for lo in range(0, n, _BATCH):
        s, f = generate_batch(model, config, min(_BATCH, n - lo), rng)
        sizes.append(s)
        flat.append(f)
    size = np.concatenate(sizes)
    labels = np.concatenate(flat)
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(size, out=offsets[1:])
    table = pa.table(
        {
            "example_id": pa.array(np.arange(start, start + n, dtype=np.int64)),
            "labels": pa.ListArray.from_arrays(pa.array(offsets), names.take(pa.array(labels))),
        }
    )
    return table, np.bincount(labels, minlength=config.n_labels).astype(np.int64)


def _write_shard(out_dir: str, config: SynthConfig, indices: list[int]) -> list[tuple[int, int, int, np.ndarray]]:
    """Write shards ``indices``; return ``(index, n_examples, n_annotations, label_counts)`` for each."""
    model = label_model(config)
    names = pa.array(label_name(np.arange(config.n_labels), config.n_labels))
    done = []
    for index in indices:
        table, counts = shard_table(config, index, model, names)
        path = Path(out_dir) / SHARD_PATTERN.format(index)
        tmp = path.with_name(f".{path.name}.tmp")
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)
        done.append((index, table.num_rows, int(counts.sum()), counts))
    return done


def _prepare(out_dir: Path, overwrite: bool) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    existing = [p for p in out_dir.iterdir() if p.name in (CORPUS_FILE, LABELS_FILE) or p.suffix == ".parquet"]
    if existing and not overwrite:
        raise PipelineError(
            f"{out_dir} already holds a corpus ({existing[0].name}); "
            "pass overwrite=True (--overwrite on the command line)"
        )
    for p in existing:
        p.unlink()


def write_corpus(
    out_dir: str | Path,
    config: SynthConfig,
    progress: bool = True,
    *,
    workers: int = 1,
    overwrite: bool = False,
) -> SynthSummary:
    """Write the corpus described by ``config`` into ``out_dir`` as ``part-NNNNN.parquet`` shards.

    Shards are generated one at a time per process (``workers`` processes; memory is one shard per
    process) and each is written under a temporary name then renamed, so a shard that exists is complete.
    ``corpus.json`` is written last. The output is byte-for-byte the same for the same ``config`` whatever
    ``workers`` is.
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    _prepare(out, overwrite)
    t0 = time.perf_counter()
    n_shards = config.n_shards
    label_counts = np.zeros(config.n_labels, dtype=np.int64)
    n_examples = n_annotations = 0
    bar = tqdm(total=config.total_examples, unit="ex", unit_scale=True, disable=not progress, desc="synth")
    try:
        for results in _run_shards(out, config, n_shards, workers):
            for _, n_ex, n_ann, counts in results:
                n_examples += n_ex
                n_annotations += n_ann
                label_counts += counts
                bar.update(n_ex)
                bar.set_postfix(annotations=f"{n_annotations:.3g}", refresh=False)
    finally:
        bar.close()
    elapsed = time.perf_counter() - t0
    summary = SynthSummary(
        out_dir=out,
        config=config,
        paths=[out / SHARD_PATTERN.format(i) for i in range(n_shards)],
        n_examples=n_examples,
        n_annotations=n_annotations,
        label_counts=label_counts,
        elapsed_s=elapsed,
    )
    _write_labels_tsv(out / LABELS_FILE, config, label_counts)
    tmp = out / f".{CORPUS_FILE}.tmp"
    tmp.write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    os.replace(tmp, out / CORPUS_FILE)
    log.info(
        "wrote %d examples, %d annotations in %d shards to %s (%.1f s)",
        n_examples,
        n_annotations,
        n_shards,
        out,
        elapsed,
    )
    return summary


def _run_shards(out: Path, config: SynthConfig, n_shards: int, workers: int) -> Iterator[list]:
    workers = max(1, min(workers, n_shards))
    if workers == 1:
        for i in range(n_shards):
            yield _write_shard(str(out), config, [i])
        return
    # spawn, not fork: the caller may have threads (progress bars, a Dask client) that fork would copy
    # mid-state.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        pending: set[Future] = set()
        todo = iter(range(n_shards))
        # At most two shards queued per process: results stream back and memory stays bounded.
        for i in todo:
            pending.add(pool.submit(_write_shard, str(out), config, [i]))
            if len(pending) >= 2 * workers:
                break
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                yield fut.result()
                nxt = next(todo, None)
                if nxt is not None:
                    pending.add(pool.submit(_write_shard, str(out), config, [nxt]))


def _write_labels_tsv(path: Path, config: SynthConfig, label_counts: np.ndarray) -> None:
    model = label_model(config)
    names = label_name(np.arange(config.n_labels), config.n_labels)
    lines = ["label\tgroup\tfrequency_rank\tprobability\tcount"]
    lines += [
        f"{n}\t{g}\t{r}\t{w:.6g}\t{c}"
        for n, g, r, w, c in zip(
            names,
            model.group_of.tolist(),
            model.rank.tolist(),
            model.weight.tolist(),
            label_counts.tolist(),
            strict=True,
        )
    ]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


def read_corpus_info(out_dir: str | Path) -> dict[str, Any]:
    """The ``corpus.json`` of a corpus written by :func:`write_corpus`."""
    path = Path(out_dir) / CORPUS_FILE
    if not path.exists():
        raise PipelineError(f"{out_dir} has no {CORPUS_FILE}: not a complete synthetic corpus")
    return json.loads(path.read_text())
