"""Which of an image's candidate maps ``explain`` keeps, and how many forward images that costs.

``"full"`` checks every candidate (:func:`~pytorch_grad_cam_vlm.metrics.deletion_check.check_maps`) and keeps the
highest ``total``. ``"staged"`` (the default) checks every candidate at the first fraction and its peak window (maps
that peak at the same pixel share that image), then the :data:`STAGED_KEPT` best of those partial totals at the other
fractions, and keeps the highest full total among them. ``"peak"`` ranks the candidates by the drop when their peak
window is removed alone (one image per distinct peak) and checks only the best one in full.

Measured against ``"full"`` on 200 held-out samples of each of the five development models
(``benchmarks/auto_cheap.md``): the staged choice keeps the pointing game and the distractor rate (within 0.005), at
60-70 % of the forward images; ``"peak"`` costs a fifth of them or less and loses up to 4.5 points of pointing. A
first-order estimate of each map's check from one input gradient
(:func:`~pytorch_grad_cam_vlm.metrics.deletion_check.first_order_checks`) ranks them poorly on these models (their
target logits saturate; choosing among its best 3 points at the evidence 0.50-0.78 of the time), so no choice here
uses it.

Where the kept map fails its check on an image whose answer depends on it, :func:`occlusion_fallback` measures a
causal map at token resolution and ``explain`` keeps it where it passes.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from pytorch_grad_cam_vlm.metrics.deletion_check import (DEFAULT_FRACTIONS, PEAK_WINDOW, auto_batch_size, check_maps,
                                                         peak_drops, target_scores, with_null_margins, with_null_of)
from pytorch_grad_cam_vlm.metrics.localization import occlusion_map
from pytorch_grad_cam_vlm.metrics.map_check import MapCheck
from pytorch_grad_cam_vlm.metrics.null import null_maps, token_cell

CHOICES = ("staged", "full", "peak")
# How many maps the staged choice checks at the remaining fractions. Measured on 200 held-out samples of each of the
# five development models (benchmarks/auto_cheap.md): keeping 2 keeps the full check's pointing and distractor rates
# within 0.005 on all five (its same (method, layer) 0.535-0.860); keeping 4 keeps them exactly (same choice
# 0.785-0.990) for 4 more images per image, where the full check agrees with itself on 0.775-0.970 under another
# tie seed.
STAGED_KEPT = 2
# The fallback where the kept gradient map fails its check (issue 26): occlusion of non-overlapping windows of the
# token cell, one forward image each, the cell times the smallest whole number that leaves at most this many windows.
# Measured on the two development models where the default's maps fail most (benchmarks/occlusion_fallback.md, 200
# held-out samples each, 24 windows of 28 px): it passes the check on 32 of the pairs model's 37 flagged samples (all
# 25 "incomplete" ones) and 3 of the crosses model's 5, its maximum on the evidence in every one. The cap bounds its
# cost at large inputs: 36 windows of 84 px at 448x448 (occlusion at 28 px every 14 takes 961), 41 more images where
# the default takes 52-78, which keeps even an image that needs it under 1/5 of occlusion's time on every model of
# benchmarks/auto_cost.md (measured: crosses, the dearest, 1/5.1; at 64 windows about 1/4.4).
FALLBACK_WINDOWS = 48


def choose_map(model: torch.nn.Module, x: torch.Tensor, maps: np.ndarray, target: Callable, choice: str = "staged",
               fractions: Sequence[float] = DEFAULT_FRACTIONS, fill: str = "mean", batch_size: Optional[int] = None,
               seed: int = 0, clean: Optional[float] = None, null: int = 0,
               cell: Optional[int] = None, peak_window: int = PEAK_WINDOW) -> Tuple[int, List[MapCheck]]:
    """``(index, checks)``: which of ``maps`` ``(N, H, W)`` of one image ``x`` ``(1, 3, H, W)`` to keep by ``choice``
    (see the module's docstring), and one :class:`MapCheck` per map: complete for the kept map (and, ``"full"``,
    every map), ``partial`` for maps scored at the first fraction only, ``None`` where ``"peak"`` measured only the
    peak window. ``clean``: the target on ``x`` when already known (it saves one image). ``null`` > 0: that many
    :func:`~pytorch_grad_cam_vlm.metrics.null.null_maps` (token cells of ``cell`` pixels) are checked in
    full with the maps, once, and every complete check gets its ``null_margin``. ``peak_window``: the side in pixels
    of the window removed around each map's peak."""
    if choice not in CHOICES:
        raise ValueError(f"choice must be one of {CHOICES}, got {choice!r}.")
    maps = np.asarray(maps, dtype=np.float32)
    options = dict(fill=fill, batch_size=batch_size, seed=seed, clean=clean, peak_window=peak_window)
    if choice == "full" or choice == "staged" and len(fractions) == 1:
        checks = check_maps(model, x, maps, target, fractions, null=null, cell=cell, **options)
        return best_index(checks), checks
    windows = {}  # peak pixel -> target with its window removed, shared by the stages
    if clean is None:
        options["clean"] = float(target_scores(model, x.detach(), target, 1)[0])
    if choice == "peak":
        order = ranked(peak_drops(model, x, maps, target, options["clean"], fill, batch_size,
                                  peak_window=peak_window, window_scores=windows))[:1]
        checks: List[Optional[MapCheck]] = [None] * len(maps)
        checks[order[0]] = check_maps(model, x, maps[order], target, fractions, window_scores=windows, null=null,
                                      cell=cell, **options)[0]
        return order[0], checks
    nulls = list(range(len(maps), len(maps) + null))  # the null's maps ride along both stages, checked in full
    if null:
        maps = np.concatenate([maps, null_maps(maps.shape[1:], token_cell(model, cell), null, seed)])
    first = check_maps(model, x, maps, target, fractions[:1], window_scores=windows, **options)
    order = ranked(np.array([c.total for c in first[:len(first) - null]]))[:STAGED_KEPT] + nulls
    rest = check_maps(model, x, maps[order], target, fractions[1:], window_scores=windows, **options)
    checks = [MapCheck(c.score, c.top_removed, c.bottom_removed, c.blank, c.peak_drop, partial=not c.blank,
                       clean=c.clean) for c in first]
    for i, later in zip(order, rest):
        if later.blank:
            continue
        top, bottom = first[i].top_removed + later.top_removed, first[i].bottom_removed + later.bottom_removed
        checks[i] = MapCheck(float(np.mean(np.subtract(bottom, top))), top, bottom, False, first[i].peak_drop,
                             clean=first[i].clean)
    if null:
        checks = with_null_margins(checks[:-null], checks[-null:], options["clean"])
    return best_index([c if not c.partial else None for c in checks]), checks


def ranked(values: np.ndarray) -> List[int]:
    """Indices of ``values`` from the highest down, NaN (blank maps) last, ties in their order."""
    values = np.asarray(values, dtype=np.float64)
    return [int(i) for i in np.argsort(np.where(np.isnan(values), np.inf, -values), kind="stable")]


def best_index(checks: Sequence[Optional[MapCheck]]) -> int:
    """The check of the highest ``total`` among ``checks`` (``None`` skipped); the first when all are blank."""
    totals = np.array([np.nan if c is None else c.total for c in checks], dtype=np.float64)
    return 0 if np.all(np.isnan(totals)) else int(np.nanargmax(totals))


def fallback_window(model: torch.nn.Module, size: Tuple[int, int], cell: Optional[int] = None,
                    most: int = FALLBACK_WINDOWS) -> int:
    """The side in pixels of :func:`occlusion_fallback`'s windows on an input of ``size`` ``(height, width)``: the
    token cell (``cell``, default ``model.token_cell``) times the smallest whole number that leaves at most ``most``
    windows covering the input."""
    cell = token_cell(model, cell)
    window = cell
    while -(-size[0] // window) * -(-size[1] // window) > most and window < min(size):
        window += cell
    return min(window, *size)


def occlusion_fallback(model: torch.nn.Module, x: torch.Tensor, target: Callable, measured: MapCheck,
                       fractions: Sequence[float] = DEFAULT_FRACTIONS, fill: str = "mean",
                       batch_size: Optional[int] = None, seed: int = 0,
                       cell: Optional[int] = None) -> Tuple[np.ndarray, MapCheck]:
    """``(map, check)``: occlusion of one image ``x`` ``(1, 3, H, W)`` for ``target`` at windows of
    :func:`fallback_window` (each removed once), its drops above 0 scaled to [0, 1], checked as ``measured`` (the
    check of a map of the same image that failed) was, against its null (:func:`~pytorch_grad_cam_vlm.metrics.
    deletion_check.with_null_of`). Forward images: one per window, ``2 F`` and the peak window's (the clean score is
    ``measured``'s)."""
    window = fallback_window(model, tuple(x.shape[2:]), cell)
    drops = np.maximum(occlusion_map(model, x, target, window=window, stride=window,
                                     batch_size=batch_size or auto_batch_size(x), clean=measured.clean), 0)
    cam = drops / drops.max() if drops.max() > 0 else drops  # as grad-cam scales its maps: the evidence for, in [0, 1]
    check, = check_maps(model, x, cam[None], target, fractions, fill, batch_size, seed, clean=measured.clean)
    return cam, with_null_of(check, measured)
