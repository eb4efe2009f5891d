"""What the benchmark scripts in this directory share: the best of repeated timings, and where results go.

Imported as ``from common import ...``: a script run as ``python bench/NAME.py`` has this directory on its path.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def best(repeat: int, fn: Callable[[], Any]) -> tuple[float, Any]:
    """The shortest of ``repeat`` timed calls of ``fn`` (seconds) and its last result."""
    times, out = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def write_result(name: str, data: Any, directory: Path = RESULTS) -> Path:
    """Write ``data`` as JSON to ``<directory>/<name>-<UTC time>.json`` and return that path."""
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / f"{name}-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}.json"
    out.write_text(json.dumps(data, indent=1))
    return out
