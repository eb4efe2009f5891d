"""Benchmark: training throughput and peak memory of both heads, and cosine decoding speed, 10^4..10^6 labels.

Synthetic, so that label count is the only thing that changes: sparse inputs (``--features`` columns,
``--nnz`` non-zeros per row) and ``--labels-per-example`` random labels per example are drawn on the device,
the label embedding is a random ``(m, k)`` matrix, and the model is the project's own :class:`XMLModel`
trained with its own loss (:func:`pmi_pipeline.train.head_loss`), Adam and bfloat16 autocast on CUDA, as
``pmi-pipeline train`` runs them. Data loading is excluded: this measures the model, the loss and the decoder.

Measured, for each label count m and head (``cosine``: k outputs and the per-batch embedding-bag target;
``bce``: m sigmoid outputs and a dense multi-hot target):

- ``samples_per_s``: training examples per second over ``--steps`` timed steps after ``--warmup`` steps;
- ``peak_gpu_mib``: ``torch.cuda.max_memory_allocated`` over those steps (null on CPU);
- ``params``: parameter count (the BCE head grows with m, the cosine head does not).

Decoding: ``queries_per_s`` for top-``--topk`` by cosine over ``--decode-labels`` L2-normalized label
embeddings (:func:`pmi_pipeline.decode.cosine_topk`, in float32 and, on CUDA, with a bfloat16 product).

Usage (on a GPU machine)::

    python bench/train_gpu.py --device cuda --out bench/results/train_gpu.json

and on a CPU, at small sizes, to check that it runs (the test suite does this)::

    python bench/train_gpu.py --smoke
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pmi_pipeline.decode import cosine_topk, l2_normalize
from pmi_pipeline.train import FeatureBatch, TrainConfig, XMLModel, head_loss, resolve_device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _random_batch(
    gen: torch.Generator, device: torch.device, batch: int, n_features: int, nnz: int, m: int, lpe: int
) -> tuple[FeatureBatch, torch.Tensor, torch.Tensor]:
    indices = torch.randint(0, n_features, (batch * nnz,), generator=gen, device=device)
    values = torch.rand(batch * nnz, generator=gen, device=device) / nnz**0.5
    offsets = torch.arange(0, batch * nnz, nnz, device=device)
    label_idx = torch.randint(0, m, (batch * lpe,), generator=gen, device=device)
    label_off = torch.arange(0, batch * lpe, lpe, device=device)
    return FeatureBatch(indices, offsets, values), label_idx, label_off


def bench_training(args: argparse.Namespace, device: torch.device, m: int, head: str) -> dict:
    cfg = TrainConfig(head=head, hidden=args.hidden, amp=not args.no_amp, device=str(device))
    torch.manual_seed(0)
    emb = torch.randn(m, args.k, device=device)
    emb_n = l2_normalize(emb)
    out_dim = args.k if head == "cosine" else m
    model = XMLModel(args.features, out_dim, args.hidden).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator(device=device).manual_seed(0)
    use_amp = device.type == "cuda" and cfg.amp

    def step() -> float:
        x, label_idx, label_off = _random_batch(
            gen, device, args.batch_size, args.features, args.nnz, m, args.labels_per_example
        )
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_amp):
            out = model(x)
        loss = head_loss(cfg, out, label_idx, label_off, emb, emb_n, m)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach()) if args.check_loss else 0.0

    for _ in range(args.warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync(device)
    elapsed = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    row = {
        "labels": m,
        "head": head,
        "samples_per_s": args.steps * args.batch_size / elapsed,
        "step_ms": 1000 * elapsed / args.steps,
        "peak_gpu_mib": peak,
        "params": sum(p.numel() for p in model.parameters()),
    }
    return row


def bench_decoding(args: argparse.Namespace, device: torch.device, matmul_dtype: torch.dtype | None) -> dict:
    torch.manual_seed(1)
    emb_n = l2_normalize(torch.randn(args.decode_labels, args.k, device=device))
    queries = torch.randn(args.decode_queries, args.k, device=device)
    kwargs = {"query_batch": args.decode_batch, "label_chunk": args.label_chunk, "matmul_dtype": matmul_dtype}
    cosine_topk(queries[: args.decode_batch], emb_n, args.topk, **kwargs)  # warm-up
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    _, idx = cosine_topk(queries, emb_n, args.topk, **kwargs)
    _sync(device)
    elapsed = time.perf_counter() - t0
    assert idx.shape == (args.decode_queries, min(args.topk, args.decode_labels))
    return {
        "labels": args.decode_labels,
        "topk": args.topk,
        "matmul_dtype": str(matmul_dtype or torch.float32).removeprefix("torch."),
        "queries_per_s": args.decode_queries / elapsed,
        "peak_gpu_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--labels", help="comma-separated label counts m (default 10000,100000,1000000)")
    p.add_argument("--heads", default="cosine,bce")
    p.add_argument("--k", type=int, default=128, help="embedding dimension")
    p.add_argument("--features", type=int, default=100_000)
    p.add_argument("--nnz", type=int, default=100, help="non-zero features per example")
    p.add_argument("--labels-per-example", type=int, default=5)
    p.add_argument(
        "--hidden",
        default="512",
        help="encoder widths (an MLP: a linear BCE head at 10^6 labels over 10^5 features would need 10^11 weights)",
    )
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--no-amp", action="store_true", help="float32 on CUDA")
    p.add_argument("--decode-labels", type=int, default=1_000_000)
    p.add_argument("--decode-queries", type=int, default=65_536)
    p.add_argument("--decode-batch", type=int, default=1024)
    p.add_argument("--label-chunk", type=int, default=None, help="decode in label chunks of this size")
    p.add_argument("--topk", type=int, default=100)
    p.add_argument("--check-loss", action="store_true", help="synchronize every step to read the loss")
    p.add_argument("--smoke", action="store_true", help="tiny sizes that run on a CPU in seconds (for tests)")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.smoke:
        args.labels = args.labels or "1000,5000"
        args.features, args.nnz, args.k, args.hidden = 2000, 20, 32, "64"
        args.batch_size, args.warmup, args.steps = 64, 1, 3
        args.decode_labels, args.decode_queries, args.decode_batch = 20_000, 512, 128
        args.check_loss = True
    args.labels = args.labels or "10000,100000,1000000"
    args.hidden = [int(h) for h in str(args.hidden).split(",") if h.strip() and h.strip() != "0"]
    args.label_list = [int(float(x)) for x in args.labels.split(",") if x.strip()]
    args.head_list = [h.strip() for h in args.heads.split(",") if h.strip()]
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    result: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "config": {k: v for k, v in vars(args).items() if k not in ("label_list", "head_list")},
        "training": [],
        "decoding": [],
    }
    for m in args.label_list:
        for head in args.head_list:
            try:
                row = bench_training(args, device, m, head)
            except torch.OutOfMemoryError as exc:
                row = {"labels": m, "head": head, "error": f"out of memory: {exc}".splitlines()[0]}
                torch.cuda.empty_cache()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            result["training"].append(row)
            print(json.dumps(row), flush=True)
    dtypes: list[torch.dtype | None] = [None] + ([torch.bfloat16] if device.type == "cuda" else [])
    for dtype in dtypes:
        row = bench_decoding(args, device, dtype)
        result["decoding"].append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
