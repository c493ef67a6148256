"""One run's measurements pooled per (implementation, metric), and how a figure is written.

Shared by ``bench/report.py`` (the tables and plots) and ``bench/goals.py`` (the targets and
the figures derived for them). Standard library only: the report also runs in the tools venv.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["P99_MIN_SAMPLES", "Stats", "aggregate", "fmt_bytes", "fmt_time", "fmt_value", "sig"]

P99_MIN_SAMPLES = 100


@dataclass(frozen=True)
class Stats:
    """One implementation's numbers for one metric, pooled over the run's repetitions."""

    unit: str  # "s", "B", "count", or "x" (a ratio derived from other figures)
    samples: Tuple[float, ...]
    run_medians: Tuple[float, ...]
    nbytes: Optional[int] = None  # set for transfers: the figure shown is a rate

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def p99(self) -> Optional[float]:
        """Nearest-rank 99th percentile, only where there are enough samples to mean it."""
        if len(self.samples) < P99_MIN_SAMPLES:
            return None
        ordered = sorted(self.samples)
        return ordered[math.ceil(0.99 * len(ordered)) - 1]

    @property
    def headline(self) -> float:
        """The number compared across implementations: the median, or the median's rate."""
        return self.nbytes / self.median if self.nbytes else self.median

    @property
    def higher_is_better(self) -> bool:
        return bool(self.nbytes)

    def spread(self) -> Optional[Tuple[float, float]]:
        if len(self.run_medians) < 2:
            return None
        values = [self.nbytes / m for m in self.run_medians] if self.nbytes else \
            list(self.run_medians)
        return min(values), max(values)


def aggregate(records: Sequence[Dict[str, Any]]) -> Dict[Tuple[str, str], Stats]:
    """Pool each (implementation, metric)'s samples over every record that has them."""
    pooled: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
    for rec in records:
        for key, metric in (rec.get("metrics") or {}).items():
            if metric.get("samples"):
                pooled.setdefault((rec["impl"], key), []).append(metric)
    stats = {}
    for (impl, key), metrics in pooled.items():
        samples = tuple(s for m in metrics for s in m["samples"])
        stats[(impl, key)] = Stats(
            unit=metrics[0]["unit"], samples=samples,
            run_medians=tuple(statistics.median(m["samples"]) for m in metrics),
            nbytes=metrics[0].get("bytes"))
    return stats


def sig(value: float) -> str:
    """Three significant figures, without scientific notation."""
    value = float(f"{value:.3g}")  # 99.99999 is 100, not 100.0
    if value == 0:
        return "0"
    digits = max(0, 2 - math.floor(math.log10(abs(value))))
    return f"{value:.{digits}f}"


def fmt_time(seconds: float) -> str:
    for scale, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs")):
        if abs(seconds) >= scale or unit == "µs":
            return f"{sig(seconds / scale)} {unit}"
    raise AssertionError("unreachable")


def fmt_bytes(value: float) -> str:
    if abs(value) >= 1 << 30:
        return f"{sig(value / (1 << 30))} GiB"
    if abs(value) >= 1 << 20:
        return f"{sig(value / (1 << 20))} MiB"
    if abs(value) >= 1 << 10:
        return f"{sig(value / 1024)} KiB"
    return f"{value:,.0f} B"


def fmt_value(value: float, unit: str) -> str:
    """A plain figure in its unit: a time, a size, a ratio or a count."""
    if unit == "s":
        return fmt_time(value)
    if unit == "B":
        return fmt_bytes(value)
    if unit == "x":
        return f"{sig(value)}x"
    return f"{value:g}"
