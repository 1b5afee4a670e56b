"""Progress lines with an ETA for work made of many trainings (sweep jobs, blame cells)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Progress:
    """`total` trainings, `done` of them before this process started counting at `start`."""

    total: int
    done: int = 0
    start: float = field(default_factory=time.time)
    counted: int = 0  # finished since `start`: the ETA's rate

    def line(self, kind: str, name: str, metric: str, value: float | None, status: str) -> str:
        """Count one more finished training: `cell 3/8 done (lr=3e-4): val/dice_best 0.812, ETA 14 min`."""
        self.done, self.counted = self.done + 1, self.counted + 1
        eta = (time.time() - self.start) / self.counted * max(self.total - self.done, 0) / 60
        result = f"{metric} {value:.3f}" if value is not None else status
        return f"{kind} {self.done}/{self.total} done ({name}): {result}, ETA {eta:.0f} min"
