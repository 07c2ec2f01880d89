"""Bootstrap 95 % intervals of the benchmark's means over samples (percentile bootstrap, Efron 1979).

Every method x layer is resampled with the same draws of samples (the rows of one draw are those of the same
samples), so intervals of different rows are comparable. Two rows whose intervals overlap are called not separable:
a conservative reading (the paired difference may still be significant), but one that :func:`markdown_tables` can
make from ``summary.csv`` alone.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

LEVEL = 0.95
DEFAULT_RESAMPLES = 1000


def sample_draws(samples: Sequence[int], resamples: int, seed: int) -> np.ndarray:
    """``(resamples, n)`` positions into the sorted distinct ``samples``, drawn with replacement from ``seed``."""
    n = len(set(samples))
    return np.random.default_rng([seed, n, resamples]).integers(0, n, size=(resamples, n))


def interval(values: Dict[int, float], samples: Sequence[int], draws: np.ndarray
             ) -> Tuple[Optional[float], Optional[float]]:
    """The 95 % interval of the mean of ``values`` (sample -> value; NaN or absent where the score does not apply)
    over the bootstrap ``draws`` of the sorted distinct ``samples``; ``(None, None)`` when no value applies or
    there are no draws."""
    ordered = sorted(set(samples))
    column = np.array([values.get(s, np.nan) for s in ordered], dtype=np.float64)
    if len(draws) == 0 or not np.isfinite(column).any():
        return None, None
    resampled = column[draws]
    counts = np.isfinite(resampled).sum(axis=1)
    means = np.where(counts > 0, np.nansum(resampled, axis=1) / np.maximum(counts, 1), np.nan)
    means = means[np.isfinite(means)]
    low, high = np.percentile(means, [100 * (1 - LEVEL) / 2, 100 * (1 + LEVEL) / 2])
    return float(low), float(high)


def separable(a: dict, b: dict, metric: str) -> Optional[bool]:
    """Whether the intervals of ``metric`` of the summary rows ``a`` and ``b`` are disjoint (None: no intervals)."""
    bounds: List[Optional[float]] = [row.get(f"{metric}_{end}") for row in (a, b) for end in ("low", "high")]
    if any(v is None or math.isnan(v) for v in bounds):
        return None
    a_low, a_high, b_low, b_high = bounds
    return a_high < b_low or b_high < a_low
