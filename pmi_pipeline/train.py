"""Train a model on PMI label embeddings (cosine head) or on the labels themselves (BCE head); evaluate it.

The two heads share everything but the last layer and the loss, as in Chollet (2016), section 4.3:

- ``cosine``: ``k`` outputs; the target of an example is the L2-normalized sum of its labels' embeddings,
  computed per batch from the store version (an ``embedding_bag`` over the batch's label indices); the loss
  is minus the cosine proximity. Decoding: cosine between the prediction and every L2-normalized label
  embedding, top-k on the device.
- ``bce``: ``m`` sigmoid outputs, one per label of the *store's vocabulary* (so that both heads rank the
  same label set), binary cross-entropy against the multi-hot target. Decoding: top-k logits.

The encoder is linear (the head is then the only layer) or an MLP with the widths in ``TrainConfig.hidden``.
Sparse features enter through an ``EmbeddingBag``-style linear layer (sum of ``value x weight row`` per
non-zero), so the input never becomes dense. Optimizer, schedule, batch order and seed are the same for both
heads.

Evaluation. The truth matrix is over the union of the store's labels and every other label of the data (labels
outside the store, e.g. seen only in test, cannot be predicted but still count as true labels). Propensities
and class weights come from the training split's label counts. Test rows without labels are kept unless
``TrainConfig.remove_invalid`` (see :mod:`pmi_pipeline.metrics`). Training uses only the examples that have at
least one label of the store (the cosine target of the others is undefined), for both heads.

A run directory holds::

    RUN/config.json        the TrainConfig, with the store version resolved to its name
    RUN/checkpoint.pt      model weights + config + store path, version and vocabulary digest (torch.save)
    RUN/history.json       the learning curve: metrics on the test split vs training step
    RUN/metrics.json       the final metrics (percentages) and run facts
    RUN/learning_curve.png P@1 / P@5 / PSP@5 vs step
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from pmi_pipeline.decode import CosineDecoder
from pmi_pipeline.errors import PipelineError, StoreError
from pmi_pipeline.metrics import compute_metrics, frequency_class_weights, inverse_propensity

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_FORMAT",
    "HEADS",
    "FeatureBatch",
    "TrainConfig",
    "TrainInputs",
    "TrainResult",
    "XMLModel",
    "build_inputs",
    "build_model",
    "evaluate_run",
    "fit",
    "head_loss",
    "load_checkpoint",
    "load_inputs",
    "predict_topk",
    "resolve_device",
    "save_checkpoint",
    "train",
]

HEADS = ("cosine", "bce")
CHECKPOINT_FORMAT = 1


# ----------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class TrainConfig:
    """Every parameter of a training run. Round-trips through JSON (``to_json`` / ``from_json``)."""

    head: str = "cosine"  # "cosine" | "bce"
    store: str = ""  # embedding store path
    store_version: str | None = None  # None: the store's latest, resolved to its name when the run starts
    data: str = ""  # import directory (pmi-pipeline import)
    hidden: list[int] = field(default_factory=list)  # MLP widths; [] = linear model
    dropout: float = 0.0
    input_norm: str = "l2"  # "none" | "l2": scale each feature row to unit L2 norm
    embedding_dims: int | None = None  # use only the first k' columns of the store's embedding
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "adam"  # "adam" | "adamw" | "sgd" | "rmsprop"
    lr: float = 0.01
    weight_decay: float = 0.0
    schedule: str = "constant"  # "constant" | "cosine" (decay to 0), after `warmup_steps` of linear warm-up
    warmup_steps: int = 0
    cosine_loss: str = "cosine"  # "cosine" (the paper: -cos) | "softmax" (cross-entropy over cos / temperature)
    temperature: float = 0.1  # only for cosine_loss="softmax"
    seed: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    amp: bool = True  # bfloat16 autocast on CUDA (ignored on CPU)
    eval_every: int = 0  # evaluate every N steps; 0 = once per epoch (always at step 0 and at the end)
    eval_k: int = 100  # predictions kept per test example (MAP@eval_k)
    eval_batch_size: int = 2048
    psp_a: float = 0.55
    psp_b: float = 1.5
    remove_invalid: bool = False  # drop test rows without labels before computing metrics
    val_fraction: float = 0.0  # > 0: hold out this fraction of the training rows and evaluate on it, not on test

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.input_norm not in ("none", "l2"):
            raise ValueError(f"input_norm must be 'none' or 'l2', got {self.input_norm!r}")
        if self.optimizer not in ("adam", "adamw", "sgd", "rmsprop"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if self.cosine_loss not in ("cosine", "softmax"):
            raise ValueError(f"cosine_loss must be 'cosine' or 'softmax', got {self.cosine_loss!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.epochs < 0 or self.batch_size < 1 or self.eval_k < 1:
            raise ValueError("epochs must be >= 0, batch_size and eval_k >= 1")
        self.hidden = [int(h) for h in self.hidden]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        return cls.from_dict(json.loads(text))


def resolve_device(device: str) -> torch.device:
    """``auto``: the first CUDA device when torch sees one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"--device {device} asked for, but torch sees no CUDA device")
    return dev


# ----------------------------------------------------------------------------------------------------
# Inputs


@dataclass
class TrainInputs:
    """Everything a run needs, as arrays. Label columns: the store's ``m`` labels first, then the others."""

    X_train: sp.csr_matrix | np.ndarray
    Y_train: sp.csr_matrix  # (n_train, L) binary, L = len(label_names)
    X_test: sp.csr_matrix | np.ndarray
    Y_test: sp.csr_matrix
    label_names: list[str]  # the union label space; the first n_store_labels are the store's, in its order
    n_store_labels: int
    embedding: np.ndarray  # (m, k) float32, rows in store order
    store_path: str = ""
    store_version: str = ""
    n_train_examples: int | None = None  # for propensities; defaults to the number of training rows

    @property
    def n_features(self) -> int:
        return int(self.X_train.shape[1])

    @property
    def labels_digest(self) -> str:
        return _digest(self.label_names[: self.n_store_labels])


def _digest(labels: Sequence[str]) -> str:
    h = hashlib.sha256()
    for name in labels:
        h.update(name.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def _label_matrix(label_lists: Sequence[Sequence[str]], index: dict[str, int], n_cols: int) -> sp.csr_matrix:
    indptr = np.zeros(len(label_lists) + 1, dtype=np.int64)
    cols: list[int] = []
    for i, labels in enumerate(label_lists):
        row = sorted({index[name] for name in labels})
        cols.extend(row)
        indptr[i + 1] = len(cols)
    data = np.ones(len(cols), dtype=np.float32)
    return sp.csr_matrix((data, np.asarray(cols, dtype=np.int64), indptr), shape=(len(label_lists), n_cols))


def _normalize_rows(X: sp.csr_matrix | np.ndarray) -> sp.csr_matrix | np.ndarray:
    if sp.issparse(X):
        X = sp.csr_matrix(X, dtype=np.float32, copy=True)
        norms = np.sqrt(np.asarray(X.multiply(X).sum(axis=1)).ravel())
        norms[norms == 0] = 1.0
        X.data /= np.repeat(norms, np.diff(X.indptr)).astype(np.float32)
        return X
    X = np.asarray(X, dtype=np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return X / norms


def build_inputs(
    X_train,
    train_labels: Sequence[Sequence[str]],
    X_test,
    test_labels: Sequence[Sequence[str]],
    store_labels: Sequence[str],
    embedding: np.ndarray,
    *,
    store_path: str = "",
    store_version: str = "",
) -> TrainInputs:
    """:class:`TrainInputs` from feature matrices, label-name lists, a store vocabulary and embedding."""
    store_labels = list(store_labels)
    embedding = np.asarray(embedding, dtype=np.float32)
    if embedding.shape[0] != len(store_labels):
        raise StoreError(f"embedding has {embedding.shape[0]} rows but the vocabulary {len(store_labels)} labels")
    index = {name: i for i, name in enumerate(store_labels)}
    extra: list[str] = []
    for lists in (train_labels, test_labels):
        for labels in lists:
            for name in labels:
                if name not in index:
                    index[name] = len(index)
                    extra.append(name)
    names = store_labels + extra
    if X_train.shape[1] != X_test.shape[1]:
        raise PipelineError(f"train has {X_train.shape[1]} features, test {X_test.shape[1]}")
    if extra:
        logger.info("%d labels of the data are not in the store's vocabulary (scored, never predicted)", len(extra))
    return TrainInputs(
        X_train=X_train if not sp.issparse(X_train) else sp.csr_matrix(X_train, dtype=np.float32),
        Y_train=_label_matrix(train_labels, index, len(names)),
        X_test=X_test if not sp.issparse(X_test) else sp.csr_matrix(X_test, dtype=np.float32),
        Y_test=_label_matrix(test_labels, index, len(names)),
        label_names=names,
        n_store_labels=len(store_labels),
        embedding=embedding,
        store_path=store_path,
        store_version=store_version,
    )


def load_inputs(cfg: TrainConfig) -> TrainInputs:
    """Read the store version (``cfg.store_version`` or the latest) and both splits of the data."""
    from pmi_pipeline.features import load_split
    from pmi_pipeline.store import EmbeddingStore

    if not cfg.store:
        raise PipelineError("no embedding store given (--store)")
    if not cfg.data:
        raise PipelineError("no import directory given (--data)")
    store = EmbeddingStore(cfg.store)
    version = store.read(cfg.store_version)
    train_split = load_split(cfg.data, "train")
    test_split = load_split(cfg.data, "test")
    return build_inputs(
        train_split.X,
        train_split.labels,
        test_split.X,
        test_split.labels,
        version.labels,
        version.embedding,
        store_path=str(Path(cfg.store).resolve()),
        store_version=version.name,
    )


# ----------------------------------------------------------------------------------------------------
# Model


class FeatureBatch(NamedTuple):
    """A batch of sparse rows in ``embedding_bag`` form: flat column indices, row offsets, values."""

    indices: torch.Tensor  # (nnz,) int64
    offsets: torch.Tensor  # (b,) int64
    values: torch.Tensor  # (nnz,) float32

    def to(self, device: torch.device) -> FeatureBatch:
        return FeatureBatch(*(t.to(device, non_blocking=True) for t in self))


class SparseLinear(nn.Module):
    """``x @ W + b`` for a sparse :class:`FeatureBatch` (or dense) ``x``; initialized like ``nn.Linear``."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.empty(out_features))
        bound = 1.0 / math.sqrt(max(1, in_features))
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: FeatureBatch | torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor):  # dense input
            return x @ self.weight + self.bias
        out = F.embedding_bag(x.indices, self.weight, x.offsets, mode="sum", per_sample_weights=x.values)
        return out + self.bias


class XMLModel(nn.Module):
    """Encoder (``hidden`` widths, ReLU, dropout), then the head: a linear layer with ``out_dim`` outputs.

    With ``hidden == []`` the model is linear and the head is its only layer. The first layer accepts a sparse
    :class:`FeatureBatch` or a dense tensor.
    """

    def __init__(self, n_features: int, out_dim: int, hidden: Sequence[int] = (), dropout: float = 0.0):
        super().__init__()
        widths = [*hidden, out_dim]
        self.input_layer = SparseLinear(n_features, widths[0])
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(widths):
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            layers.append(nn.Linear(a, b))
        self.rest = nn.Sequential(*layers)

    def forward(self, x: FeatureBatch | torch.Tensor) -> torch.Tensor:
        return self.rest(self.input_layer(x))


def _feature_batch(X, rows: np.ndarray) -> FeatureBatch | torch.Tensor:
    if not sp.issparse(X):
        return torch.from_numpy(np.ascontiguousarray(X[rows], dtype=np.float32))
    sub = X[rows]
    return FeatureBatch(
        torch.from_numpy(sub.indices.astype(np.int64)),
        torch.from_numpy(sub.indptr[:-1].astype(np.int64)),
        torch.from_numpy(sub.data.astype(np.float32, copy=False)),
    )


def _label_batch(Y: sp.csr_matrix, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    sub = Y[rows]
    return torch.from_numpy(sub.indices.astype(np.int64)), torch.from_numpy(sub.indptr[:-1].astype(np.int64))


def _batch_to(x: FeatureBatch | torch.Tensor, device: torch.device) -> FeatureBatch | torch.Tensor:
    return x.to(device) if isinstance(x, FeatureBatch) else x.to(device, non_blocking=True)


def _autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cosine_targets(label_idx: torch.Tensor, offsets: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    """Normalized sum of the label embeddings of each example (rows without labels stay 0)."""
    summed = F.embedding_bag(label_idx, embedding, offsets, mode="sum")
    return F.normalize(summed, dim=1)


def multi_hot(label_idx: torch.Tensor, offsets: torch.Tensor, n_rows: int, n_labels: int) -> torch.Tensor:
    target = torch.zeros(n_rows, n_labels, device=label_idx.device)
    lengths = torch.diff(offsets, append=torch.tensor([label_idx.numel()], device=offsets.device))
    rows = torch.repeat_interleave(torch.arange(n_rows, device=label_idx.device), lengths)
    target[rows, label_idx] = 1.0
    return target


def head_loss(
    cfg: TrainConfig,
    out: torch.Tensor,
    label_idx: torch.Tensor,
    offsets: torch.Tensor,
    emb: torch.Tensor | None,
    emb_n: torch.Tensor | None,
    m: int,
) -> torch.Tensor:
    """The loss of one batch: ``out`` is the model output, the labels are ``embedding_bag`` indices/offsets.

    ``emb`` / ``emb_n``: the store embedding, raw and row-normalized, on the device (cosine head only).
    """
    out = out.float()
    if cfg.head == "bce":
        return F.binary_cross_entropy_with_logits(out, multi_hot(label_idx, offsets, out.shape[0], m))
    assert emb is not None and emb_n is not None
    if cfg.cosine_loss == "cosine":
        target = cosine_targets(label_idx, offsets, emb)
        return -F.cosine_similarity(out, target, dim=1).mean()
    # softmax variant: cross-entropy between softmax(cos(pred, E_l) / T) and uniform mass on the true labels
    logits = F.normalize(out, dim=1) @ emb_n.T / cfg.temperature
    target = multi_hot(label_idx, offsets, out.shape[0], m)
    target = target / target.sum(dim=1, keepdim=True).clamp_min(1.0)
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


# ----------------------------------------------------------------------------------------------------
# Prediction and evaluation


@torch.no_grad()
def predict_topk(
    model: XMLModel,
    X,
    head: str,
    k: int,
    *,
    device: torch.device,
    decoder: CosineDecoder | None = None,
    batch_size: int = 2048,
    amp: bool = True,
) -> np.ndarray:
    """``(n, min(k, m))`` label indices (store order), best first. The cosine head needs ``decoder``."""
    model.eval()
    parts = []
    for start in range(0, X.shape[0], batch_size):
        rows = np.arange(start, min(X.shape[0], start + batch_size))
        with _autocast(device, amp):
            out = model(_batch_to(_feature_batch(X, rows), device)).float()
        if head == "cosine":
            assert decoder is not None
            _, idx = decoder.topk(out, k)
        else:
            _, idx = torch.topk(out, k=min(k, out.shape[1]), dim=1)
        parts.append(idx)
    if not parts:
        return np.zeros((0, k), dtype=np.int64)
    return torch.cat(parts).cpu().numpy()


def _evaluation_weights(inputs: TrainInputs, cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    counts = np.asarray(inputs.Y_train.sum(axis=0)).ravel()
    n = inputs.n_train_examples or inputs.Y_train.shape[0]
    return inverse_propensity(counts, n, cfg.psp_a, cfg.psp_b), frequency_class_weights(counts)


def _metrics_for(topk: np.ndarray, truth: sp.csr_matrix, inputs: TrainInputs, cfg: TrainConfig) -> dict[str, float]:
    inv_prop, weights = _evaluation_weights(inputs, cfg)
    return compute_metrics(
        topk,
        truth,
        inv_propensity=inv_prop,
        class_weights=weights,
        map_k=cfg.eval_k,
        remove_invalid=cfg.remove_invalid,
    )


# ----------------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainResult:
    config: TrainConfig
    model: XMLModel
    history: list[dict[str, float]]
    metrics: dict[str, float]
    run_dir: Path | None = None


def _store_embedding(inputs: TrainInputs, cfg: TrainConfig) -> np.ndarray:
    emb = inputs.embedding
    if cfg.embedding_dims is not None:
        if not 1 <= cfg.embedding_dims <= emb.shape[1]:
            raise PipelineError(f"embedding_dims must be in [1, {emb.shape[1]}], got {cfg.embedding_dims}")
        emb = emb[:, : cfg.embedding_dims]
    return np.ascontiguousarray(emb, dtype=np.float32)


def _make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)


def _lr_lambda(cfg: TrainConfig, total_steps: int):
    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "cosine":
            span = max(1, total_steps - cfg.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup_steps) / span)))
        return 1.0

    return f


def _batches(order: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, order.size, batch_size):
        yield order[start : start + batch_size]


def build_model(cfg: TrainConfig, n_features: int, n_store_labels: int, k: int) -> XMLModel:
    out_dim = k if cfg.head == "cosine" else n_store_labels
    torch.manual_seed(cfg.seed)
    return XMLModel(n_features, out_dim, cfg.hidden, cfg.dropout)


def fit(
    cfg: TrainConfig,
    inputs: TrainInputs,
    run_dir: str | Path | None = None,
    *,
    progress: bool | None = None,
) -> TrainResult:
    """Train ``cfg.head`` on ``inputs``; evaluate on the test split along the way; write ``run_dir`` if given.

    With ``cfg.val_fraction > 0`` a random part of the training rows (drawn from ``cfg.seed``) is held out and
    evaluated on instead of the test split, for choosing hyperparameters without looking at the test split.
    ``progress``: a tqdm bar (None: only on a terminal).
    """
    from tqdm.auto import tqdm

    device = resolve_device(cfg.device)
    cfg = dataclasses.replace(cfg, store_version=inputs.store_version or cfg.store_version)
    emb_np = _store_embedding(inputs, cfg)
    m, k = emb_np.shape
    X_train = _normalize_rows(inputs.X_train) if cfg.input_norm == "l2" else inputs.X_train
    X_test = _normalize_rows(inputs.X_test) if cfg.input_norm == "l2" else inputs.X_test
    Y_store = inputs.Y_train[:, :m].tocsr()
    trainable = np.flatnonzero(np.diff(Y_store.indptr) > 0)
    X_eval, Y_eval = X_test, inputs.Y_test
    if cfg.val_fraction > 0:
        n_train = Y_store.shape[0]
        perm = np.random.default_rng([cfg.seed, 1]).permutation(n_train)  # independent of the batch order
        val_rows = np.sort(perm[: round(cfg.val_fraction * n_train)])
        X_eval, Y_eval = X_train[val_rows], inputs.Y_train[val_rows]
        trainable = np.setdiff1d(trainable, val_rows)
    if trainable.size == 0:
        raise PipelineError("no training example has a label of the store's vocabulary")
    logger.info(
        "training %s head on %s: %d/%d training rows with store labels, %d features, m=%d, k=%d",
        cfg.head,
        device,
        trainable.size,
        Y_store.shape[0],
        inputs.n_features,
        m,
        k,
    )

    model = build_model(cfg, inputs.n_features, m, k).to(device)
    emb = torch.from_numpy(emb_np).to(device)
    emb_n = F.normalize(emb, dim=1)
    decoder = CosineDecoder(emb_np, device) if cfg.head == "cosine" else None
    opt = _make_optimizer(cfg, model.parameters())
    steps_per_epoch = math.ceil(trainable.size / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, total_steps))
    eval_every = cfg.eval_every or steps_per_epoch
    rng = np.random.default_rng(cfg.seed)

    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    train_time = 0.0
    running: list[float] = []
    seen = 0

    def evaluate(step: int, epoch: float) -> dict[str, float]:
        topk = predict_topk(
            model,
            X_eval,
            cfg.head,
            cfg.eval_k,
            device=device,
            decoder=decoder,
            batch_size=cfg.eval_batch_size,
            amp=cfg.amp,
        )
        row: dict[str, float] = {
            "step": step,
            "epoch": epoch,
            "examples_seen": seen,
            "train_time_s": train_time,
            "wall_time_s": time.perf_counter() - t0,
            "train_loss": float(np.mean(running)) if running else float("nan"),
        }
        row.update(_metrics_for(topk, Y_eval, inputs, cfg))
        history.append(row)
        running.clear()
        logger.info("step %d: loss %.4f P@1 %.2f P@5 %.2f", step, row["train_loss"], row["P@1"], row["P@5"])
        model.train()
        return row

    evaluate(0, 0.0)
    step = 0
    bar = tqdm(total=total_steps, disable=(None if progress is None else not progress), desc=f"train {cfg.head}")
    model.train()
    for _epoch in range(cfg.epochs):
        order = trainable[rng.permutation(trainable.size)]
        for rows in _batches(order, cfg.batch_size):
            t_step = time.perf_counter()
            x = _batch_to(_feature_batch(X_train, rows), device)
            label_idx, offsets = (t.to(device, non_blocking=True) for t in _label_batch(Y_store, rows))
            with _autocast(device, cfg.amp):
                out = model(x)
            loss = head_loss(cfg, out, label_idx, offsets, emb, emb_n, m)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            seen += rows.size
            running.append(float(loss.detach()))
            train_time += time.perf_counter() - t_step
            bar.update(1)
            if step % eval_every == 0 and step != total_steps:
                evaluate(step, step / steps_per_epoch)
    bar.close()
    final = evaluate(step, float(cfg.epochs)) if step > 0 else history[-1]
    metrics = {key: val for key, val in final.items() if "@" in key}
    result = TrainResult(config=cfg, model=model, history=history, metrics=metrics)
    if run_dir is not None:
        result.run_dir = _write_run(Path(run_dir), result, inputs, step)
    return result


def train(cfg: TrainConfig, run_dir: str | Path, *, progress: bool | None = None) -> TrainResult:
    """Read the store version and data named in ``cfg``, train, and write the run directory."""
    return fit(cfg, load_inputs(cfg), run_dir, progress=progress)


# ----------------------------------------------------------------------------------------------------
# Run directory and checkpoints


def save_checkpoint(path: str | Path, model: XMLModel, cfg: TrainConfig, inputs: TrainInputs, step: int) -> None:
    """Weights + all that is needed to rebuild and re-evaluate the model (loads with weights_only=True)."""
    emb = _store_embedding(inputs, cfg)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "config": cfg.to_dict(),
        "model_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "n_features": inputs.n_features,
        "out_dim": int(emb.shape[1] if cfg.head == "cosine" else emb.shape[0]),
        "store": {
            "path": inputs.store_path,
            "version": inputs.store_version,
            "n_labels": inputs.n_store_labels,
            "dim": int(emb.shape[1]),
            "labels_digest": inputs.labels_digest,
        },
        "step": int(step),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch_version": str(torch.__version__),
    }
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[XMLModel, TrainConfig, dict]:
    """Rebuild the model of a checkpoint; returns ``(model, config, payload)``."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.exists():
        raise PipelineError(f"{path}: no checkpoint")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise PipelineError(f"{path}: unsupported checkpoint format {payload.get('format')!r}")
    cfg = TrainConfig.from_dict(payload["config"])
    model = XMLModel(payload["n_features"], payload["out_dim"], cfg.hidden, cfg.dropout)
    model.load_state_dict(payload["model_state"])
    model.to(torch.device(device))
    model.eval()
    return model, cfg, payload


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serializable: {type(o)}")


def _write_run(run_dir: Path, result: TrainResult, inputs: TrainInputs, step: int) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = result.config
    (run_dir / "config.json").write_text(cfg.to_json() + "\n")
    save_checkpoint(run_dir / "checkpoint.pt", result.model, cfg, inputs, step)
    (run_dir / "history.json").write_text(json.dumps(result.history, indent=1, default=_json_default) + "\n")
    facts = {
        "head": cfg.head,
        "store": inputs.store_path,
        "store_version": inputs.store_version,
        "data": cfg.data,
        "steps": step,
        "evaluated_on": f"validation ({cfg.val_fraction:g} of train)" if cfg.val_fraction else "test",
        "n_test": int(inputs.Y_test.shape[0]),
        "n_test_without_labels": int((np.diff(inputs.Y_test.indptr) == 0).sum()),
        "test_rows_without_labels": "removed" if cfg.remove_invalid else "kept",
        "n_labels_store": inputs.n_store_labels,
        "n_labels_evaluated": len(inputs.label_names),
        "train_time_s": result.history[-1]["train_time_s"],
    }
    (run_dir / "metrics.json").write_text(
        json.dumps({"metrics": result.metrics, "run": facts}, indent=2, default=_json_default) + "\n"
    )
    try:
        from pmi_pipeline.plots import plot_learning_curves

        plot_learning_curves({cfg.head: result.history}, run_dir / "learning_curve.png")
    except Exception:  # a plot must never lose a trained model
        logger.exception("could not draw the learning curve")
    return run_dir


def evaluate_run(
    run_dir: str | Path,
    *,
    device: str = "auto",
    remove_invalid: bool | None = None,
    psp_a: float | None = None,
    psp_b: float | None = None,
    data: str | None = None,
    store: str | None = None,
    store_version: str | None = None,
) -> dict[str, float]:
    """Re-evaluate a run's checkpoint on its data's test split with the store version it was trained on.

    Returns the metrics as percentages (``P@1``, ``nDCG@3``, ``PSP@5``, ``MAP@100``, ``cwMAP@100``). Raises
    :class:`StoreError` when the store version is gone or its vocabulary differs from the one trained on.

    ``store``/``store_version`` decode a cosine-head model with another version instead, e.g. a re-embedding
    aligned to the one it was trained on: it is scored over that version's vocabulary, so labels new in it can be
    predicted (zero-shot). A BCE model's outputs are tied to its training vocabulary, so it is evaluated as trained.
    """
    dev = resolve_device(device)
    model, cfg, payload = load_checkpoint(run_dir, dev)
    overrides: dict[str, Any] = {"device": device}
    if remove_invalid is not None:
        overrides["remove_invalid"] = remove_invalid
    if psp_a is not None:
        overrides["psp_a"] = psp_a
    if psp_b is not None:
        overrides["psp_b"] = psp_b
    if data is not None:
        overrides["data"] = data
    store_info = payload["store"]
    other_version = (store is not None or store_version is not None) and cfg.head == "cosine"
    cfg = dataclasses.replace(
        cfg,
        store=(store if other_version else None) or store_info["path"] or cfg.store,
        store_version=store_version if other_version else (store_info["version"] or cfg.store_version),
        **overrides,
    )
    inputs = load_inputs(cfg)
    if not other_version and inputs.labels_digest != store_info["labels_digest"]:
        raise StoreError(f"store {cfg.store} version {cfg.store_version}: vocabulary differs from the one trained on")
    emb = _store_embedding(inputs, cfg)
    decoder = CosineDecoder(emb, dev) if cfg.head == "cosine" else None
    X_test = _normalize_rows(inputs.X_test) if cfg.input_norm == "l2" else inputs.X_test
    topk = predict_topk(
        model,
        X_test,
        cfg.head,
        cfg.eval_k,
        device=dev,
        decoder=decoder,
        batch_size=cfg.eval_batch_size,
        amp=cfg.amp,
    )
    return _metrics_for(topk, inputs.Y_test, inputs, cfg)
