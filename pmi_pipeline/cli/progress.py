"""Progress bars for long stages (tqdm on stderr, hidden when stderr is not a terminal)."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


class StageProgress:
    """A ``(stage, done, total)`` callback that keeps one tqdm bar per stage."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and sys.stderr.isatty()
        self.bars: dict[str, tqdm] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        bar = self.bars.get(stage)
        if bar is None:
            unit = "shard" if stage == "count" else "iter"
            bar = self.bars[stage] = tqdm(total=total, desc=stage, unit=unit, file=sys.stderr, leave=True)
        bar.n = done
        bar.refresh()

    def __enter__(self) -> StageProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        for bar in self.bars.values():
            bar.close()
