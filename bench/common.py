"""What the benchmark scripts in this directory share: the best of repeated timings, the memory and CPU of a
process tree (:class:`TreeMonitor`), and where results go.

Imported as ``from common import ...``: a script run as ``python bench/NAME.py`` has this directory on its path.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
#: Seconds between two samples of a process tree.
SAMPLE_S = 0.05


def sort_dispatch() -> Any:
    """This checkout's :mod:`pmi_pipeline.sort_dispatch`, loaded by its path: a script that times another
    checkout's library (``PYTHONPATH``) still sets numpy's dispatch as the ``pmi-pipeline`` command does, and
    before that library imports numpy."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "pmi_pipeline" / "sort_dispatch.py"
    spec = importlib.util.spec_from_file_location("_bench_sort_dispatch", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def best(repeat: int, fn: Callable[[], Any]) -> tuple[float, Any]:
    """The shortest of ``repeat`` timed calls of ``fn`` (seconds) and its last result."""
    times, out = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def interleaved(
    runs: dict[str, Callable[[], Any]], repeat: int
) -> tuple[dict[str, list[float]], dict[str, Any], float]:
    """Each of ``runs`` timed ``repeat`` times, taking turns so that a noisy host's slow minutes fall on all of
    them, after a first call of the last one (a compiled kernel's compilation): the seconds of each call, each
    one's last result, and the first call's seconds."""
    start = time.perf_counter()
    list(runs.values())[-1]()
    first_s = time.perf_counter() - start
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    results: dict[str, Any] = {}
    for _ in range(repeat):
        for name, fn in runs.items():
            start = time.perf_counter()
            results[name] = fn()
            seconds[name].append(time.perf_counter() - start)
    return seconds, results, first_s


def kernel_report(seconds: dict[str, list[float]], **fields: Any) -> tuple[dict[str, Any], str]:
    """The result file of ways of counting the same ``fields["n_shards"]`` shards timed with :func:`interleaved`:
    the date, the host's speed, ``fields`` and each way's ms per shard; and a line giving each one's best."""
    out = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "host_speed": host_speed(),
        **fields,
        "ms_per_shard": {name: [1000 * s / fields["n_shards"] for s in times] for name, times in seconds.items()},
    }
    best = ", ".join(f"{name} {min(ms):.2f} ms" for name, ms in out["ms_per_shard"].items())
    repeat = len(next(iter(seconds.values())))
    return out, f"{best} per shard (best of {repeat})"


def host_speed() -> dict[str, float]:
    """A few seconds of fixed work that says what kind of host a run had, recorded with its results.

    The VMs these benchmarks run on differ from one session to the next, and not in proportion: the same count of
    10^8 annotations over 10^5 labels took 14.4 s in one process on one VM and 38.3 s on another, while the
    in-memory baseline took 38.8 and 38.3 s (docs/performance.md, thirteenth pass). Our counting is compute:
    interpreter, sorts, hashing. The baseline's big arrays are fresh memory, faulted in from the host. So a
    ratio between them is only read with these figures beside it:

    - ``python_loop_ns``: an empty Python ``for`` loop, ns per iteration (the interpreter's speed);
    - ``sort_ns``: ``np.sort`` of 2 million random int64, ns per element (compiled compute on cached data);
    - ``fault_ns_per_byte``: filling a fresh 256 MB array 2 s after the previous one was freed, ns per byte
      (what faulting memory in costs: 1.3-1.75 on a VM whose host took freed memory back within seconds, 0.19-0.39
      on one whose host did not).

    Each is the best of 3.
    """
    import numpy as np

    def loop() -> None:
        for _ in range(2_000_000):
            pass

    keys = np.random.default_rng(0).integers(0, 2**62, 2_000_000)
    loop_s, _ = best(3, loop)
    sort_s, _ = best(3, lambda: np.sort(keys))
    nbytes = 1 << 28  # 256 MB
    fill_ms = min(row["fill_ms"] for row in refault_ms([2.0] * 3, nbytes))
    return {
        "python_loop_ns": round(loop_s / 2e6 * 1e9, 1),
        "sort_ns": round(sort_s / keys.size * 1e9, 2),
        "fault_ns_per_byte": round(fill_ms * 1e6 / nbytes, 3),
    }


def refault_ms(pauses: list[float], nbytes: int = 200_000_000) -> list[dict[str, float]]:
    """Milliseconds to fill a fresh array of ``nbytes`` after each pause (the previous one freed, and unmapped,
    before it): on a VM whose host takes freed memory back, the longer the pause, the dearer the fill."""
    import numpy as np

    rows = []
    for pause in pauses:
        time.sleep(pause)
        start = time.perf_counter()
        filled = np.empty(nbytes, np.uint8)
        filled.fill(1)
        rows.append({"pause_s": pause, "fill_ms": (time.perf_counter() - start) * 1e3})
        del filled
    return rows


class StepClock:
    """Times library functions while they run, each under a step's name. A call's time, less that of the timed
    calls it makes, goes to its step, so the steps add up; the functions are put back on leaving ``timing``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._inner: list[float] = []  # per open call: seconds spent in timed calls it made

    def wrap(self, fn: Callable[..., Any], step: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            self._inner.append(0.0)
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                self.seconds[step] += elapsed - self._inner.pop()
                if self._inner:
                    self._inner[-1] += elapsed

        return timed

    @contextlib.contextmanager
    def timing(self, steps: list[tuple[Any, str, str]]) -> Iterator[StepClock]:
        """Within the block, each ``(owner, name, step)``'s function ``owner.name`` is timed under ``step``."""
        originals = [(owner, name, getattr(owner, name)) for owner, name, _ in steps]
        for owner, name, step in steps:
            setattr(owner, name, self.wrap(getattr(owner, name), step))
        try:
            yield self
        finally:
            for owner, name, fn in originals:
                setattr(owner, name, fn)


def write_result(name: str, data: Any, directory: Path = RESULTS) -> Path:
    """Write ``data`` as JSON to ``<directory>/<name>-<UTC time>.json`` and return that path."""
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / f"{name}-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}.json"
    out.write_text(json.dumps(data, indent=1))
    return out


@dataclass
class TreeSample:
    peak_rss: int = 0
    peak_single_rss: int = 0
    max_processes: int = 0
    cpu_s: float = 0.0
    samples: int = 0
    peak_by_pid: dict[int, int] = field(default_factory=dict)  # each process's own peak RSS
    # each process's RSS at the instant of the tree's peak, and what it is (its command line's gist)
    at_peak: dict[int, int] = field(default_factory=dict)
    roles: dict[int, str] = field(default_factory=dict)


class TreeMonitor:
    """Sample a process and all its descendants every ``interval`` seconds in a background thread.

    Peak RSS is the largest *sum* of the tree's resident set sizes at one instant (shared pages, such as a
    library mapped by several workers, count once per process, as the kernel's RSS does). CPU seconds are
    summed per process over every process ever seen (user + system at its last sample), so short-lived
    workers count too.
    """

    def __init__(self, pid: int, interval: float = SAMPLE_S):
        self.root = psutil.Process(pid)
        self.interval = interval
        self.result = TreeSample()
        self._cpu: dict[tuple[int, float], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.result.cpu_s = sum(self._cpu.values())

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        total, now = 0, {}
        for proc in procs:
            try:
                with proc.oneshot():
                    rss = proc.memory_info().rss
                    cpu = proc.cpu_times()
                    key = (proc.pid, proc.create_time())
                    self.result.roles[proc.pid] = _role(proc)  # each time: a process spawned is the parent until exec
            except psutil.Error:
                continue
            total += rss
            now[proc.pid] = rss
            self.result.peak_single_rss = max(self.result.peak_single_rss, rss)
            self.result.peak_by_pid[proc.pid] = max(self.result.peak_by_pid.get(proc.pid, 0), rss)
            self._cpu[key] = max(self._cpu.get(key, 0.0), cpu.user + cpu.system)
        r = self.result
        if total > r.peak_rss:
            r.peak_rss, r.at_peak = total, now
        r.max_processes = max(r.max_processes, len(procs))
        r.samples += 1


def _role(proc: psutil.Process) -> str:
    """What a process of a count's tree is: a Dask worker (spawned by its nanny), multiprocessing's resource
    tracker, or else its command line's start (the client, which holds a LocalCluster's scheduler and nannies)."""
    cmdline = " ".join(proc.cmdline())
    if "multiprocessing.spawn" in cmdline:
        return "worker"
    if "multiprocessing.resource_tracker" in cmdline:
        return "resource tracker"
    return "client: " + cmdline[:60].replace("\n", " ")
