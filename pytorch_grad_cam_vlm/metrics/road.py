"""ROAD (Rong et al. 2022) with a faster imputation: the same noisy linear imputation as grad-cam's
``NoisyLinearImputer``, to within 1e-4 (measured ~1e-12), built for Qwen's large images.

grad-cam fills each removed pixel with the weighted mean of its 8 neighbours by solving one sparse linear system per
image and percentile: it assembles the system entry by entry in a ``lil_matrix`` and solves it with SuperLU's default
(COLAMD) ordering, which fills in badly on a 2-D pixel grid. Here the system is assembled with vectorised numpy, its
unknowns numbered in the geometric nested-dissection order of the whole pixel grid (one-pixel-wide separators split
the 8-neighbour grid), which keeps the fill-in to ``O(n log n)``. The grid's order is computed once per image size:
restricted to the removed pixels, its separators still separate them. With leaves of 4 pixels and SuperLU panels of
one column, a map's 18 systems solve 1.3-1.7x faster than with an order computed for each mask
(``benchmarks/road_imputation.md``). The system is symmetric and diagonally dominant, so no pivoting is needed.

The metric classes mirror ``pytorch_grad_cam.metrics.road`` and differ only in the imputer they hand to grad-cam's
``RemoveMostRelevantFirst`` / ``RemoveLeastRelevantFirst``.
"""
from __future__ import annotations

from functools import lru_cache
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from pytorch_grad_cam.metrics.perturbation_confidence import (AveragerAcrossThresholds, PerturbationConfidenceMetric,
                                                              RemoveLeastRelevantFirst, RemoveMostRelevantFirst)
from pytorch_grad_cam.metrics.road import NoisyLinearImputer, ROADCombined, neighbors_weights
from scipy.sparse import coo_matrix, csc_matrix
from scipy.sparse.linalg import splu

PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)
# Measured by benchmarks/bench_road.py --orders (road_imputation.md) at 112x112 and 448x448, smooth and token-grid
# maps: leaves of 4 pixels and SuperLU panels of 1 column factor fastest.
LEAF_SIZE = 4  # pixels below which nested dissection stops splitting
PANEL_SIZE = 1  # SuperLU's panel size, in columns


def sparse_system(mask: np.ndarray, img: np.ndarray,
                  weighting: Sequence[Tuple[Tuple[int, int], float]] = neighbors_weights,
                  rank: Optional[np.ndarray] = None) -> Tuple[csc_matrix, np.ndarray, np.ndarray]:
    """grad-cam's ``NoisyLinearImputer.setup_sparse_system``, vectorised: for the pixels where the binary ``mask``
    ``(H, W)`` is 0, the system ``A v = b`` whose solution ``v`` ``(N, C)`` gives each of them the weighted mean of
    its in-image neighbours. ``img`` is ``(C, H, W)``. Returns ``(A, b, pixels)``, ``pixels`` the flat indices of
    the imputed pixels in the order of ``v``'s rows: grad-cam's (ascending), or, given each flat pixel's ``rank``
    in an elimination order (:func:`dissection_rank`), that order, in which ``A`` factors with little fill-in."""
    height, width = mask.shape
    known = mask.reshape(-1) > 0.5
    pixels = np.flatnonzero(mask.reshape(-1) == 0)
    if rank is not None:
        pixels = pixels[np.argsort(rank[pixels], kind="stable")]
    n = len(pixels)
    variable = np.zeros(height * width, dtype=np.int64)
    variable[pixels] = np.arange(n)
    flat = img.reshape(img.shape[0], -1)
    rows, cols = np.divmod(pixels, width)
    diagonal = np.ones(n)
    b = np.zeros((n, img.shape[0]))
    entries_i, entries_j, entries_w = [], [], []
    for (dy, dx), weight in weighting:
        r, c = rows + dy, cols + dx
        inside = (r >= 0) & (c >= 0) & (r < height) & (c < width)
        diagonal[~inside] -= weight
        ids = np.flatnonzero(inside)
        neighbour = r[inside] * width + c[inside]
        has_value = known[neighbour]
        b[ids[has_value], :] -= weight * flat[:, neighbour[has_value]].T
        entries_i.append(ids[~has_value])
        entries_j.append(variable[neighbour[~has_value]])
        entries_w.append(np.full(int((~has_value).sum()), weight))
    entries_i.append(np.arange(n))
    entries_j.append(np.arange(n))
    entries_w.append(-diagonal)
    a = coo_matrix((np.concatenate(entries_w), (np.concatenate(entries_i), np.concatenate(entries_j))), shape=(n, n))
    return a.tocsc(), b, pixels


def nested_dissection_order(rows: np.ndarray, cols: np.ndarray, leaf_size: int = LEAF_SIZE) -> np.ndarray:
    """An elimination order of pixels at ``(rows, cols)`` for an 8-neighbour stencil: split each set at the middle
    row or column of its bounding box (the longer side), order both halves recursively, then the separator line.
    Returns a permutation of ``range(len(rows))``."""
    order: List[np.ndarray] = []
    stack = [(np.arange(len(rows)), False)]  # (pixel set, whether it is a separator to emit as it is)
    while stack:
        members, emit = stack.pop()
        if emit or len(members) <= leaf_size:
            order.append(members)
            continue
        r, c = rows[members], cols[members]
        coordinate = r if np.ptp(r) >= np.ptp(c) else c
        middle = (int(coordinate.min()) + int(coordinate.max())) // 2
        # Popped last-in first-out: the lower half first, then the upper half, then the separator.
        stack.append((members[coordinate == middle], True))
        stack.append((members[coordinate > middle], False))
        stack.append((members[coordinate < middle], False))
    return np.concatenate(order) if order else np.zeros(0, dtype=np.int64)


@lru_cache(maxsize=8)
def dissection_rank(height: int, width: int, leaf_size: int = LEAF_SIZE) -> np.ndarray:
    """Each flat pixel's place in the :func:`nested_dissection_order` of the whole ``height x width`` grid
    (read-only; computed once per size and leaf size, in 0.3 s at 448x448)."""
    order = nested_dissection_order(*np.divmod(np.arange(height * width), width), leaf_size)
    rank = np.empty(height * width, dtype=np.int32)
    rank[order] = np.arange(height * width)
    rank.flags.writeable = False
    return rank


def impute_linear(mask: np.ndarray, img: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Solve the imputation system of ``mask`` ``(H, W)`` and ``img`` ``(C, H, W)``: returns ``(values, unknown)``,
    ``values`` ``(N, C)`` float64 for the flat pixel indices ``unknown`` (ascending, as grad-cam's)."""
    a, b, pixels = sparse_system(mask, img, rank=dissection_rank(*mask.shape))
    unknown = np.sort(pixels)
    # Fortran order, as spsolve returns it: torch.randn_like follows the strides of the solution, so the imputer's
    # noise lands on the same pixels as grad-cam's.
    values = np.empty_like(b, order="F")
    if len(pixels):
        # Symmetric and weakly diagonally dominant: factor in the given order, without pivoting.
        lu = splu(a, permc_spec="NATURAL", diag_pivot_thresh=0.0, panel_size=PANEL_SIZE)
        values[np.searchsorted(unknown, pixels)] = lu.solve(b)
    return values, unknown


class FastNoisyLinearImputer(NoisyLinearImputer):
    """grad-cam's ``NoisyLinearImputer`` (same weights, same noise drawn from torch's generator in the same shape),
    with a vectorised system and a nested-dissection factorisation. Masks are binary, as ROAD's perturbations make
    them (1 keeps a pixel, 0 imputes it)."""

    def __call__(self, img: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.fill(img, *impute_linear(mask.numpy(), img.numpy()))

    def fill(self, img: torch.Tensor, values, unknown: np.ndarray) -> torch.Tensor:
        """``img`` ``(C, H, W)`` with the flat pixels ``unknown`` set to ``values`` ``(N, C)`` (numpy, or a torch
        tensor on ``img``'s device) plus the imputer's noise, drawn from torch's generator as grad-cam draws it."""
        flat = img.reshape(img.shape[0], -1)
        res = torch.tensor(values, dtype=torch.float) if isinstance(values, np.ndarray) else values.float()
        infilled = flat.clone()
        infilled[:, torch.from_numpy(unknown).to(img.device)] = res.t() + self.noise * torch.randn_like(res.t())
        return infilled.reshape_as(img)


class FastROADMostRelevantFirst(PerturbationConfidenceMetric):
    """grad-cam's ``ROADMostRelevantFirst`` with :class:`FastNoisyLinearImputer`."""

    def __init__(self, percentile: float = 80) -> None:
        super().__init__(RemoveMostRelevantFirst(percentile, FastNoisyLinearImputer()))


class FastROADLeastRelevantFirst(PerturbationConfidenceMetric):
    """grad-cam's ``ROADLeastRelevantFirst`` with :class:`FastNoisyLinearImputer`."""

    def __init__(self, percentile: float = 20) -> None:
        super().__init__(RemoveLeastRelevantFirst(percentile, FastNoisyLinearImputer()))


class FastROADMostRelevantFirstAverage(AveragerAcrossThresholds):
    """grad-cam's ``ROADMostRelevantFirstAverage`` with :class:`FastNoisyLinearImputer`."""

    def __init__(self, percentiles: Sequence[float] = PERCENTILES) -> None:
        super().__init__(FastROADMostRelevantFirst, list(percentiles))


class FastROADLeastRelevantFirstAverage(AveragerAcrossThresholds):
    """grad-cam's ``ROADLeastRelevantFirstAverage`` with :class:`FastNoisyLinearImputer`."""

    def __init__(self, percentiles: Sequence[float] = PERCENTILES) -> None:
        super().__init__(FastROADLeastRelevantFirst, list(percentiles))


class FastROADCombined(ROADCombined):
    """grad-cam's ``ROADCombined`` (``(LeRF - MoRF) / 2`` averaged over percentiles; higher is better) with
    :class:`FastNoisyLinearImputer`."""

    def __init__(self, percentiles: Sequence[float] = PERCENTILES) -> None:
        super().__init__(list(percentiles))
        self.morf_averager = FastROADMostRelevantFirstAverage(percentiles)
        self.lerf_averager = FastROADLeastRelevantFirstAverage(percentiles)
