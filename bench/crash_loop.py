"""Crash loop: SIGKILL ``pmi-pipeline embed`` at random moments and at random kill points, then recover.

Each run starts ``pmi-pipeline embed`` on a synthetic corpus in a subprocess, either on an empty store ("fresh") or
on a store whose v0001 holds the first half of the shards ("incremental"), counting with or without a Dask
LocalCluster, and kills it with SIGKILL:

- "time": after a delay drawn uniformly within a clean run's duration (measured first, per mode and scenario);
- "point": at a random named kill point (``PMI_PIPELINE_KILL_AT``, :mod:`pmi_pipeline.faults`), at a random visit.

Right after the kill it checks the invariant (no store, no ``latest``, or a ``latest`` naming a complete version
that reads back and that ``check`` passes; an incremental run's v0001 unchanged), then runs ``embed`` again and
checks the recovery: exit 0, ``check`` without any problem (not even a warning), no leftovers, the expected
versions, counts equal to counting every shard once in process (nothing lost, nothing counted twice), and the
embedding equal to a clean run's. The stage a kill hit is read from the progress bars the run printed (its stderr
is a pseudo-terminal, so they are on) and from the store it left. Prints a table, writes
bench/results/crash-loop-<time>.json.

    python bench/crash_loop.py --runs 30
"""

from __future__ import annotations

import argparse
import datetime as dt
import fcntl
import json
import os
import pty
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil

from pmi_pipeline.check import check_store
from pmi_pipeline.cooccurrence import count_shards
from pmi_pipeline.embed import EmbedParams, embed
from pmi_pipeline.faults import ENV, POINTS
from pmi_pipeline.shards import discover_shards
from pmi_pipeline.store import EmbeddingStore
from pmi_pipeline.synth import SynthConfig, write_corpus

ROOT = Path(__file__).resolve().parents[1]
MODES = {"no-dask": ["--no-dask"], "dask": ["--workers", "2"]}
PROGRESS = re.compile(r"(count|factorize):\s+\d+%\|[^|\r\n]*\|\s*(\d+)/(\d+)")


class Run:
    """One ``pmi-pipeline embed`` process: stderr on a pseudo-terminal (progress bars on), read as it comes."""

    def __init__(self, command: list[str], env: dict[str, str], log_path: Path):
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # tqdm draws nothing at width 0
        self.stdout_path = log_path
        self.chunks: list[str] = []
        with open(log_path, "w") as stdout:
            self.start = time.monotonic()
            self.proc = subprocess.Popen(
                command, stdout=stdout, stderr=slave, stdin=subprocess.DEVNULL, env=env, start_new_session=True
            )
        os.close(slave)
        self.reader = threading.Thread(target=self._read, args=(master,), daemon=True)
        self.reader.start()

    def _read(self, fd: int) -> None:
        try:
            while data := os.read(fd, 65536):
                self.chunks.append(data.decode(errors="replace"))
        except OSError:
            pass  # EIO: every holder of the terminal is gone
        finally:
            os.close(fd)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)  # the main process only, as the OOM killer would

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def reap_session(self, timeout: float = 60) -> int:
        """Wait for the process's session (its Dask workers) to end; kill and count what outlives ``timeout``."""
        deadline = time.monotonic() + timeout
        while (left := _session(self.proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
        if left:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.reader.join(timeout=5)
        return len(left)

    @property
    def stderr(self) -> str:
        return "".join(self.chunks)


def _session(sid: int) -> list[int]:
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except (OSError, psutil.Error):
            continue
    return found


def stage_from_progress(stderr: str) -> str:
    """The stage a run had reached, from its last progress bar update."""
    matches = PROGRESS.findall(stderr)
    if not matches:
        return "start"  # imports, cluster start, lock, hashing shards, reading the store
    stage, done, total = matches[-1]
    if stage == "count":
        return "count" if int(done) < int(total) else "merge+pmi"
    return "factorize" if int(done) < int(total) else "publish"


def stage_from_store(store: EmbeddingStore, latest_before: str | None) -> str | None:
    """What the store says about a kill in the publish step (None: nothing to see)."""
    if store.exists() and store.latest != latest_before:
        return "publish:latest-set"
    if store.exists() and store.unpublished():
        return "publish:renamed"
    if (store.path / "versions").is_dir() and any((store.path / "versions").glob(".tmp-*")):
        return "publish:writing"
    if (store.path / "versions").is_dir() and not store.exists():
        return "publish:creating-store"
    return None


def check_invariant(store: EmbeddingStore, scenario: str, base: dict, reference) -> list[str]:
    """Right after a kill: ``latest`` names a complete, sound version (or there is none); v0001 untouched."""
    failures = []
    if not store.exists():
        return [] if scenario == "fresh" else ["the store vanished"]
    errors = [str(p) for p in check_store(store.path) if p.severity == "error"]
    failures += errors
    latest = store.latest
    if latest is not None:
        if latest not in store.versions():
            failures.append(f"latest {latest} is not a complete version")
        else:
            version = store.read()
            if version.embedding.shape != (len(version.labels), version.dim):
                failures.append("latest's embedding does not match its labels")
            expected = "v0001" if scenario == "fresh" else "v0002"
            if latest == expected and not store.read_counts().equals(reference):
                failures.append(f"{latest} is latest with counts different from a clean run's")
    if scenario == "incremental":
        if latest not in ("v0001", "v0002"):
            failures.append(f"latest is {latest}, expected v0001 or v0002")
        if "v0001" not in store.versions():
            failures.append("v0001 is gone")
        else:
            v1 = store.read("v0001")
            if not (
                np.array_equal(v1.embedding, base["v0001"].embedding)
                and store.read_counts("v0001").equals(base["counts"])
            ):
                failures.append("v0001 changed")
    return failures


def check_recovery(store: EmbeddingStore, scenario: str, rc: int, reference, clean_version) -> list[str]:
    failures = [] if rc == 0 else [f"recovery run exited {rc}"]
    problems = check_store(store.path)
    failures += [f"check: {p}" for p in problems]
    leftovers = [*(store.path / "versions").glob(".tmp-*"), *store.path.rglob(".zarr.json.*.tmp")]
    failures += [f"leftover {p.name}" for p in leftovers]
    want = ["v0001"] if scenario == "fresh" else ["v0001", "v0002"]
    if store.versions() != want or store.latest != want[-1]:
        failures.append(f"versions {store.versions()} latest {store.latest}, expected {want}")
        return failures
    counts = store.read_counts()
    if not counts.equals(reference):
        failures.append(f"counts differ: {counts.n_examples} examples, {counts.n_annotations} annotations")
    if sorted(counts.manifest) != sorted(reference.manifest):
        failures.append("manifest differs (a shard lost or counted twice)")
    version = store.read()
    same = version.labels == clean_version.labels and np.allclose(
        version.embedding, clean_version.embedding, rtol=1e-4, atol=1e-5
    )
    if not same:
        failures.append("embedding differs from a clean run's")
    return failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--examples", type=int, default=100_000)
    parser.add_argument("--shard-size", type=int, default=10_000, help="examples per shard")
    parser.add_argument("--labels", type=int, default=4_000)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--point-share", type=float, default=1 / 3, help="share of runs killed at a named point")
    parser.add_argument("--modes", nargs="+", choices=sorted(MODES), default=["no-dask", "dask"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results-dir", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    env = {k: v for k, v in os.environ.items() if k != ENV}
    params = EmbedParams(dim=args.dim)
    started = time.monotonic()

    with tempfile.TemporaryDirectory(prefix="pmi-crash-loop-") as tmp_name:
        tmp = Path(tmp_name)
        config = SynthConfig(
            n_examples=args.examples, n_labels=args.labels, mean_labels=5.0, shard_size=args.shard_size, seed=args.seed
        )
        write_corpus(tmp / "corpus", config, progress=False)
        shards = discover_shards([tmp / "corpus"])
        reference = count_shards(shards, None).counts
        base = {"path": tmp / "base", "counts": count_shards(shards[: len(shards) // 2], None).counts}
        embed(shards[: len(shards) // 2], base["path"], params)
        base["v0001"] = EmbeddingStore(base["path"]).read("v0001")

        def command(store: Path, mode: str) -> list[str]:
            embed_args = ["embed", str(tmp / "corpus"), "--store", str(store), "--dim", str(args.dim)]
            return [sys.executable, "-m", "pmi_pipeline", *embed_args, *MODES[mode]]

        def prepare(store: Path, scenario: str) -> None:
            shutil.rmtree(store, ignore_errors=True)
            if scenario == "incremental":
                shutil.copytree(base["path"], store)

        # Clean runs: how long each takes (the window for random kills) and what it publishes.
        clean: dict[str, dict] = {}
        for mode in args.modes:
            for scenario in ("fresh", "incremental"):
                store = tmp / f"clean-{mode}-{scenario}"
                prepare(store, scenario)
                run = Run(command(store, mode), env, tmp / "clean.out")
                rc = run.wait(600)
                seconds = time.monotonic() - run.start
                run.reap_session()
                assert rc == 0, run.stderr[-2000:]
                assert EmbeddingStore(store).read_counts().equals(reference)
                clean[f"{mode}/{scenario}"] = {"seconds": round(seconds, 2), "version": EmbeddingStore(store).read()}
                print(f"clean run {mode:8s} {scenario:11s} {seconds:5.1f} s", flush=True)

        rows = []
        store = tmp / "store"
        for i in range(args.runs):
            mode = args.modes[i % len(args.modes)]
            scenario = rng.choice(["fresh", "incremental"])
            key = f"{mode}/{scenario}"
            prepare(store, scenario)
            latest_before = EmbeddingStore(store).latest
            run_env = dict(env)
            if rng.random() < args.point_share:
                point = rng.choice(POINTS)
                if point == "publish:store-created" and scenario == "incremental":
                    point = "publish:arrays-written"  # an existing store is never created again
                new_shards = len(shards) - (len(shards) // 2 if scenario == "incremental" else 0)
                visits = {"count:shard-done": new_shards, "factorize:iteration": params.n_power_iter}.get(point, 1)
                nth = rng.randint(1, visits)
                kill = f"{point}:{nth}"
                run_env[ENV] = kill
                delay = None
            else:
                delay = rng.uniform(0, clean[key]["seconds"])
                kill = f"t={delay:.2f}s"
            run = Run(command(store, mode), run_env, tmp / "run.out")
            if delay is not None:
                rc = run.wait(delay)
                run.kill()
            rc = run.wait(600)
            died_at = time.monotonic() - run.start
            orphans = run.reap_session()
            killed = rc == -signal.SIGKILL
            s = EmbeddingStore(store)
            stage = stage_from_store(s, latest_before) or stage_from_progress(run.stderr)
            if not killed:
                stage = "finished" if rc == 0 else f"exit {rc}"
            invariant = check_invariant(s, scenario, base, reference)
            latest_after_kill = s.latest if s.exists() else None

            recovery = Run(command(store, mode), env, tmp / "recovery.out")
            rc2 = recovery.wait(600)
            orphans += recovery.reap_session()
            recovered = check_recovery(s, scenario, rc2, reference, clean[key]["version"])
            if orphans:
                recovered.append(f"{orphans} process(es) outlived their run")
            message = (tmp / "recovery.out").read_text().splitlines()[:1]
            row = {
                "run": i + 1,
                "mode": mode,
                "scenario": scenario,
                "kill": kill,
                "died_at_s": round(died_at, 2),
                "killed": killed,
                "stage": stage,
                "latest_after_kill": latest_after_kill,
                "invariant_ok": not invariant,
                "invariant_failures": invariant,
                "recovery_ok": not recovered,
                "recovery_failures": recovered,
                "recovery_message": message[0] if message else "",
            }
            rows.append(row)
            print(
                f"{i + 1:3d} {mode:8s} {scenario:11s} {kill:26s} {died_at:5.1f}s {stage:22s} "
                f"invariant {'ok' if not invariant else 'FAIL'}  recovery {'ok' if not recovered else 'FAIL'}  "
                + "; ".join(invariant + recovered),
                flush=True,
            )

    summary = {
        "runs": len(rows),
        "killed": sum(r["killed"] for r in rows),
        "invariant_ok": sum(r["invariant_ok"] for r in rows),
        "recovery_ok": sum(r["recovery_ok"] for r in rows),
        "by_stage": dict(Counter(r["stage"] for r in rows)),
        "by_kill": {"point": sum("=" not in r["kill"] for r in rows), "time": sum("=" in r["kill"] for r in rows)},
        "seconds": round(time.monotonic() - started, 1),
    }
    print(json.dumps(summary, indent=2))
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%dT%H%M%S")
    out = args.results_dir / f"crash-loop-{stamp}.json"
    payload = {
        "command": " ".join(["python", "bench/crash_loop.py", *sys.argv[1:]]),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "corpus": {
            "shards": len(shards),
            "examples": reference.n_examples,
            "labels": reference.n_labels,
            "annotations": reference.n_annotations,
            "pairs": reference.n_pairs,
        },
        "clean_seconds": {k: v["seconds"] for k, v in clean.items()},
        "summary": summary,
        "rows": rows,
    }
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


if __name__ == "__main__":
    main()
