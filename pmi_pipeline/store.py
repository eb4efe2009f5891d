"""The versioned Zarr v3 embedding store.

Layout (docs/architecture.md): the root group's attributes hold ``format_version`` and ``latest``; each version is
a group ``versions/<name>`` with ``embedding``, ``labels``, ``label_counts``, ``eigenvalues``, its parameters and
provenance in attributes, and the accumulated ``counts`` that the next version adds to.

Publishing is atomic: a version is written under ``versions/.tmp-*``, renamed into place (one ``rename`` of a
directory), and only then does ``latest`` change, by an atomic replace of the root ``zarr.json``. A reader following
``latest`` never sees a partial version, and a writer killed at any point leaves the previous ``latest`` intact;
leftovers of a killed writer are removed by the next one. Writers hold an exclusive ``fcntl`` lock on ``.lock``,
so two writers on one store take turns instead of interleaving.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import zarr
from zarr.codecs import BloscCodec
from zarr.storage import LocalStore

from pmi_pipeline.cooccurrence import Counts
from pmi_pipeline.errors import StoreError
from pmi_pipeline.example_ids import ExampleIndex
from pmi_pipeline.faults import fault_point

log = logging.getLogger(__name__)

FORMAT_NAME = "pmi-pipeline-embedding-store"
FORMAT_VERSION = 1
VERSION_PATTERN = re.compile(r"^v(\d{4,})$")
_COMPRESSORS = (BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"),)


@dataclass
class EmbeddingVersion:
    """One published version, loaded whole (an m x k float32 embedding fits in memory even at 10^6 labels)."""

    name: str
    embedding: np.ndarray  # (m, k) float32
    labels: list[str]
    label_counts: np.ndarray  # (m,) int64
    eigenvalues: np.ndarray  # (k,) float64
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.embedding.shape[1])

    def index(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}


_JSON_TMP = re.compile(r"^\.zarr\.json\.[0-9a-f]{32}\.tmp$")  # _write_json_atomic's temporary files


def _write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def array_checksum(data: np.ndarray) -> str:
    """SHA-256 of an array's values (strings joined by NUL), recorded at publish and verified by ``check``."""
    data = np.asarray(data)
    if data.dtype == object or data.dtype.kind in "UT":
        payload = "\0".join(str(x) for x in data.ravel().tolist()).encode("utf-8")
    else:
        payload = np.ascontiguousarray(data).tobytes()
    return "sha256:" + hashlib.sha256(payload).hexdigest()


def _array(group: zarr.Group, name: str, data: np.ndarray) -> str:
    """Write one array; return its checksum."""
    if data.dtype == object or data.dtype.kind == "U":
        array = group.create_array(name, shape=data.shape, dtype=str, chunks=(max(1, min(data.size, 65536)),))
        if data.size:
            array[:] = data.astype(str)
        return array_checksum(data)
    chunks = tuple(max(1, min(s, 65536 if data.ndim == 1 else 8192)) for s in data.shape)
    array = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks, compressors=_COMPRESSORS)
    if data.size:
        array[...] = data
    return array_checksum(data)


class EmbeddingStore:
    """A directory holding versions of a label embedding. Opening does not create it; publishing does."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    # -- reading -------------------------------------------------------------------------------------------
    def exists(self) -> bool:
        return (self.path / "zarr.json").is_file()

    def _root_meta(self) -> dict:
        meta_path = self.path / "zarr.json"
        if not meta_path.is_file():
            raise StoreError(
                f"{self.path}: no embedding store here (run `pmi-pipeline embed ... --store {self.path}` first)"
            )
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise StoreError(f"{meta_path}: unreadable store metadata ({exc})") from None
        attrs = meta.get("attributes", {}) if isinstance(meta, dict) else {}
        if meta.get("zarr_format") != 3 or attrs.get("format") != FORMAT_NAME:
            raise StoreError(f"{self.path}: not a pmi-pipeline embedding store (a foreign Zarr group or directory)")
        if attrs.get("format_version", 0) > FORMAT_VERSION:
            raise StoreError(
                f"{self.path}: store format {attrs['format_version']} is newer than this "
                f"pmi-pipeline supports ({FORMAT_VERSION}); upgrade pmi-pipeline"
            )
        return meta

    @property
    def latest(self) -> str | None:
        """Name of the newest complete version, or None for a store without versions (or no store)."""
        if not self.exists():
            return None
        return self._root_meta()["attributes"].get("latest")

    def versions(self) -> list[str]:
        """Complete versions, oldest first (in-progress ``.tmp-*`` directories are not versions)."""
        root = self.path / "versions"
        if not root.is_dir():
            return []
        names = [p.name for p in root.iterdir() if VERSION_PATTERN.match(p.name) and (p / "zarr.json").is_file()]
        return sorted(names, key=lambda n: int(VERSION_PATTERN.match(n).group(1)))

    def unpublished(self) -> list[str]:
        """Complete versions newer than ``latest``: left by a writer killed between the rename and ``latest``.

        No reader following ``latest`` ever saw them; the next publish removes them and reuses the number.
        """
        latest = self.latest
        floor = int(VERSION_PATTERN.match(latest).group(1)) if latest else 0
        return [n for n in self.versions() if int(VERSION_PATTERN.match(n).group(1)) > floor]

    def _version_group(self, version: str | None) -> tuple[str, zarr.Group]:
        name = version or self._root_meta()["attributes"].get("latest")
        if name is None:
            raise StoreError(f"{self.path}: the store has no published version yet")
        if name not in self.versions():
            raise StoreError(f"{self.path}: no version {name!r} (versions: {', '.join(self.versions()) or 'none'})")
        return name, zarr.open_group(LocalStore(self.path / "versions" / name, read_only=True), mode="r")

    def read(self, version: str | None = None) -> EmbeddingVersion:
        """Load a version (default: ``latest``)."""
        name, group = self._version_group(version)
        try:
            return EmbeddingVersion(
                name=name,
                embedding=np.asarray(group["embedding"][...], dtype=np.float32),
                labels=[str(x) for x in group["labels"][...]],
                label_counts=np.asarray(group["label_counts"][...], dtype=np.int64),
                eigenvalues=np.asarray(group["eigenvalues"][...], dtype=np.float64),
                attrs=dict(group.attrs),
            )
        except KeyError as exc:
            raise StoreError(f"{self.path}/versions/{name}: incomplete version, missing {exc}") from None

    def read_attrs(self, version: str | None = None) -> dict[str, Any]:
        _, group = self._version_group(version)
        return dict(group.attrs)

    def read_manifest(self, version: str | None = None) -> dict[str, Any]:
        """The content hashes of the shards counted into a version (empty for a store with no version).

        Reads attributes only, not the counts, so that finding new shards stays cheap however large the store.
        """
        if version is None and self.latest is None:
            return {}
        name, group = self._version_group(version)
        try:
            return dict(group["counts"].attrs["manifest"])
        except KeyError as exc:
            raise StoreError(f"{self.path}/versions/{name}: counts missing {exc}") from None

    def read_counts(self, version: str | None = None) -> Counts:
        """The accumulated counts a version was built from (empty counts for a store with no version).

        Verified against the checksums recorded at publish: new counts are added to these, so a damaged store
        must stop a writer rather than be carried into every later version.
        """
        if version is None and self.latest is None:
            return Counts.empty()
        name, group = self._version_group(version)
        names = ("labels", "label_counts", "pair_row", "pair_col", "pair_count")
        arrays = self._verified(name, group, "counts", names)
        counts = group["counts"]
        labels = np.asarray([str(x) for x in arrays["labels"]], dtype=object)
        m = labels.size
        pairs = sp.csr_matrix(
            (arrays["pair_count"], (arrays["pair_row"], arrays["pair_col"])), shape=(m, m), dtype=np.int64
        )
        return Counts(
            labels, arrays["label_counts"], pairs, int(counts.attrs["n_examples"]), dict(counts.attrs["manifest"])
        )

    def read_example_index(self, version: str | None = None) -> ExampleIndex:
        """Fingerprints of the examples counted into a version (empty for no version; verified like the counts)."""
        if version is None and self.latest is None:
            return ExampleIndex.empty()
        name, group = self._version_group(version)
        if "example_ids" not in group:
            log.warning(
                "%s/versions/%s has no example-id index (written by an older pmi-pipeline): example ids repeated "
                "from its shards cannot be detected",
                self.path,
                name,
            )
            return ExampleIndex.empty()
        arrays = self._verified(name, group, "example_ids", ("hash", "shard"))
        return ExampleIndex(
            arrays["hash"].astype(np.uint64),
            arrays["shard"].astype(np.int32),
            list(group["example_ids"].attrs["shards"]),
        )

    def _verified(self, name: str, group: zarr.Group, sub: str, names: Sequence[str]) -> dict[str, np.ndarray]:
        where = f"{self.path}/versions/{name}/{sub}"
        checksums = group.attrs.get("checksums", {})
        arrays = {}
        for n in names:
            try:
                data = np.asarray(group[sub][n][...])
            except KeyError:
                raise StoreError(
                    f"{where}: missing array {n!r}; the store is damaged (see `pmi-pipeline check`)"
                ) from None
            except Exception as exc:  # a chunk that does not decode
                raise StoreError(
                    f"{where}/{n}: unreadable ({type(exc).__name__}: {exc}); the store is damaged "
                    "(see `pmi-pipeline check`)"
                ) from None
            recorded = checksums.get(f"{sub}/{n}")
            if recorded is not None and recorded != array_checksum(data):
                raise StoreError(
                    f"{where}/{n}: contents do not match the checksum recorded at publish; the store is damaged "
                    "(see `pmi-pipeline check`), and nothing is added to damaged counts"
                )
            arrays[n] = data
        return arrays

    # -- writing -------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, *, wait: bool = True, timeout: float | None = None) -> Iterator[None]:
        """Exclusive writer lock. ``wait=False`` fails at once with a clear message if another writer holds it."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = None if timeout is None else time.monotonic() + timeout
            announced = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                    if not wait or (deadline is not None and time.monotonic() > deadline):
                        raise StoreError(
                            f"{self.path}: locked by {holder}; another writer is publishing to "
                            "this store (retry later, or wait for it)"
                        ) from None
                    if not announced:
                        log.warning("%s: waiting for the writer lock held by %s", self.path, holder)
                        announced = True
                    time.sleep(0.2)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} since {dt.datetime.now(dt.UTC).isoformat()}".encode(), 0)
            yield
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # closing releases the flock

    def _ensure_root(self) -> None:
        if self.exists():
            self._root_meta()  # refuses a foreign store
            return
        if self.path.exists() and not self._only_a_killed_create():
            raise StoreError(f"{self.path}: exists and is not an embedding store; refusing to write into it")
        # Written by hand, not with zarr's mode="w", which would empty the directory (and our held lock file).
        (self.path / "versions").mkdir(parents=True, exist_ok=True)
        _write_json_atomic(
            self.path / "versions" / "zarr.json", {"zarr_format": 3, "node_type": "group", "attributes": {}}
        )
        fault_point("publish:store-created")
        _write_json_atomic(
            self.path / "zarr.json",
            {
                "zarr_format": 3,
                "node_type": "group",
                "attributes": {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "latest": None},
            },
        )

    def _only_a_killed_create(self) -> bool:
        """Whether the directory holds nothing but the lock and what a writer killed in :meth:`_ensure_root` left.

        That is ``versions/`` with at most its ``zarr.json`` (and temporary files of the atomic JSON writes): a
        store whose root metadata was never written, which the next writer completes instead of refusing.
        """
        for entry in self.path.iterdir():
            if entry.name == ".lock" or _JSON_TMP.match(entry.name):
                continue
            if entry.name == "versions" and entry.is_dir():
                if all(e.name == "zarr.json" or _JSON_TMP.match(e.name) for e in entry.iterdir()):
                    continue
            return False
        return True

    def _next_name(self) -> str:
        existing = [int(VERSION_PATTERN.match(n).group(1)) for n in self.versions()]
        return f"v{(max(existing) + 1) if existing else 1:04d}"

    def _remove_leftovers(self) -> None:
        for tmp in [*self.path.glob(".zarr.json.*.tmp"), *(self.path / "versions").glob(".zarr.json.*.tmp")]:
            if _JSON_TMP.match(tmp.name):  # a metadata write killed before its rename; the old file is intact
                tmp.unlink(missing_ok=True)
        for tmp in (self.path / "versions").glob(".tmp-*"):
            log.warning("removing %s, left by a writer that did not finish", tmp)
            shutil.rmtree(tmp, ignore_errors=True)
        for name in self.unpublished():
            log.warning("removing %s: written but never made latest by a writer that did not finish", name)
            # Renamed out of the version namespace first, so a crash mid-removal leaves a .tmp-* leftover.
            doomed = self.path / "versions" / f".tmp-unpublished-{name}-{uuid.uuid4().hex[:8]}"
            os.rename(self.path / "versions" / name, doomed)
            shutil.rmtree(doomed, ignore_errors=True)

    def publish(
        self,
        *,
        embedding: np.ndarray,
        labels: np.ndarray | list[str],
        label_counts: np.ndarray,
        eigenvalues: np.ndarray,
        counts: Counts,
        attrs: dict[str, Any],
        example_index: ExampleIndex | None = None,
    ) -> str:
        """Write a new version and make it ``latest``. Call with :meth:`lock` held. Returns the version name."""
        labels = np.asarray(labels, dtype=object)
        m = labels.size
        if embedding.shape[0] != m or label_counts.shape != (m,):
            raise ValueError(f"shapes disagree: embedding {embedding.shape}, {m} labels, counts {label_counts.shape}")
        if eigenvalues.shape != (embedding.shape[1],):
            raise ValueError(f"{eigenvalues.shape[0]} eigenvalues for {embedding.shape[1]} dimensions")
        self._ensure_root()
        self._remove_leftovers()
        name = self._next_name()
        tmp = self.path / "versions" / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
        group = zarr.open_group(LocalStore(tmp), mode="w")
        arrays = {
            "embedding": np.ascontiguousarray(embedding, dtype=np.float32),
            "labels": labels,
            "label_counts": np.asarray(label_counts, dtype=np.int64),
            "eigenvalues": np.asarray(eigenvalues, dtype=np.float64),
        }
        checksums = {name_: _array(group, name_, data) for name_, data in arrays.items()}
        counts_group = group.create_group("counts")
        coo = counts.pairs.tocoo()
        index_dtype = np.int32 if counts.n_labels < 2**31 else np.int64
        count_arrays = {
            "labels": counts.labels,
            "label_counts": counts.label_counts,
            "pair_row": coo.row.astype(index_dtype),
            "pair_col": coo.col.astype(index_dtype),
            "pair_count": coo.data.astype(np.int64),
        }
        checksums.update({f"counts/{n}": _array(counts_group, n, data) for n, data in count_arrays.items()})
        counts_group.attrs.update({"n_examples": counts.n_examples, "manifest": counts.manifest})
        if example_index is not None:
            ids_group = group.create_group("example_ids")
            id_arrays = {"hash": example_index.hashes, "shard": example_index.shard}
            checksums.update({f"example_ids/{n}": _array(ids_group, n, data) for n, data in id_arrays.items()})
            ids_group.attrs["shards"] = example_index.shards
        group.attrs.update(
            {
                **attrs,
                "created": dt.datetime.now(dt.UTC).isoformat(),
                "parent": self.latest,
                "n_labels": int(m),
                "dim": int(embedding.shape[1]),
                "checksums": checksums,
            }
        )
        _fsync_tree(tmp)
        fault_point("publish:arrays-written")
        os.rename(tmp, self.path / "versions" / name)
        _fsync_dir(self.path / "versions")
        fault_point("publish:renamed")
        self._set_latest(name)
        fault_point("publish:latest-set")
        return name

    def _set_latest(self, name: str) -> None:
        meta = self._root_meta()
        meta["attributes"]["latest"] = name
        _write_json_atomic(self.path / "zarr.json", meta)


def _fsync_tree(root: Path) -> None:
    """Flush a freshly written version to disk before it is renamed into place."""
    for dirpath, _, filenames in os.walk(root):
        for filename in filenames:
            fd = os.open(os.path.join(dirpath, filename), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))
