"""Named kill points for crash tests: a real SIGKILL of this process at an exact point of the pipeline.

Set ``PMI_PIPELINE_KILL_AT`` to a point's name (optionally ``name:n`` for its n-th visit, 1-based) and the process
kills itself there with SIGKILL: no cleanup, no ``finally``, no flushing, as in a power cut or the OOM killer.
Unset, a point costs one dictionary lookup. The points are listed in :data:`POINTS`; docs/reliability.md says
what each one proves.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "PMI_PIPELINE_KILL_AT"
POINTS = (
    "count:shard-done",  # a shard's counts are back (or cached), others are still being counted
    "count:merged",  # all new shards counted and summed, nothing written
    "factorize:iteration",  # inside the range finder's power iterations
    "publish:store-created",  # first publish to a new store: versions/ exists, the root zarr.json does not yet
    "publish:arrays-written",  # the new version's arrays are in versions/.tmp-*, not yet renamed
    "publish:renamed",  # the version directory is in place, ``latest`` still names the parent
    "publish:latest-set",  # ``latest`` names the new version, the writer lock is still held
)
_visits: Counter[str] = Counter()


def fault_point(name: str) -> None:
    """SIGKILL this process if ``PMI_PIPELINE_KILL_AT`` names this point (and visit)."""
    target = os.environ.get(ENV)
    if not target:
        return
    point, _, nth = target.rpartition(":") if target.rsplit(":", 1)[-1].isdigit() else (target, "", "1")
    if point != name:
        return
    _visits[name] += 1
    if _visits[name] >= int(nth):
        os.kill(os.getpid(), signal.SIGKILL)
