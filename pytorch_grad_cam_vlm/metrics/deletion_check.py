"""Does a map point at what the model used? A cheap deletion check for any map, batched over maps.

For each map and each fraction ``f`` the check removes the map's most relevant ``f`` of the pixels, and separately
its least relevant ``f``, and scores the target on both images. The score of a map is

    score = mean over f of (drop when the top f is removed) - (drop when the bottom f is removed)
          = mean over f of target(bottom f removed) - target(top f removed)

in the units of the target (a logit, a log-probability). Positive: removing what the map calls relevant hurts the
target more than removing what it calls irrelevant, as a faithful map should. Negative: the map is *inverted*.
A map whose ``max - min`` is below ``blank_tolerance`` is *blank*: it says nothing, is not scored (NaN), and costs no
forward pass. Pixels of equal map value are removed in a seeded random order, so each fraction removes exactly its
share even where a ReLU'd map is 0 over most of the image (grad-cam's ROAD thresholds instead, and then removes
everything at once).

The check also removes a square window of :data:`PEAK_WINDOW` pixels centred on the map's maximum (the point the
pointing game and a reader look at) and records ``peak_drop = target(image) - target(window removed)``. ``total =
score + peak_drop`` ranks a map among others of the same image: it is what ``explain``'s ``auto`` maximises. Maps of
one image that peak at the same pixel share that image, and the clean image is scored once.

How far a map beats chance: the same check of maps with no information on the same image
(:mod:`pytorch_grad_cam_vlm.metrics.null`). What a check says of its map (its verdict) is
:class:`~pytorch_grad_cam_vlm.metrics.map_check.MapCheck`'s.

Removed pixels get the fill ``"mean"`` (0 in the normalised input: the processor's mean colour, as occlusion
greys) or ``"blur"`` (the image blurred by a Gaussian of :data:`BLUR_SIGMA` pixels, which keeps low frequencies).
Measured against ROAD on the demo model: ``benchmarks/deletion_check_vs_road.md``.
"""
from __future__ import annotations

import zlib
from dataclasses import replace
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from pytorch_grad_cam_vlm.metrics.localization import map_peak
from pytorch_grad_cam_vlm.metrics.map_check import MapCheck
from pytorch_grad_cam_vlm.metrics.null import null_maps, null_margin, token_cell

# Small shares find the object a map points at: an object of the demo tasks covers 3-5 % of the canvas. Measured on
# both trained demo models (`python benchmarks/auto_layer.py --n 40 --fractions F`, first 40 / 30 held-out samples):
# choosing auto's map by (0.05, 0.1, 0.2) pointed at the evidence 0.900 / 0.933 of the time, by 0.2 alone
# 0.825 / 0.700. With the peak window in the ranking, (0.05, 0.2) points as often as (0.05, 0.1, 0.2) (within two
# samples on 200 + 100 held-out samples of each model, benchmarks/auto_rules.md) for a third fewer images.
DEFAULT_FRACTIONS = (0.05, 0.2)
# Occlusion's window (metrics.localization.occlusion_map): one merged vision token of Qwen-VL, about an object of the
# demo tasks; the one window size measured (benchmarks/auto_rules.md).
PEAK_WINDOW = 28
FILLS = ("mean", "blur")
BLUR_SIGMA = 8.0
# Batch sizes, measured with benchmarks/bench_benchmark.py --batch-sizes (CPU time per image, 1 torch thread;
# benchmarks/benchmark_speed.md). The demo model at 112x112: 8.6 ms at batch 1, 2.4 at 16 (3.65x), 2.1 at 32. The
# mid-size model: at 112x112 batch 16 is 2.3x cheaper than batch 1, at 224x224 batch 8 1.4x (16: 1.25x), at 336x336
# batch 4 1.14x (16: 0.96x), at 448x448 every batch of 4 or more costs 7-16 % more than batch 1: on the CPU the
# forward pass turns compute-bound beyond about CPU_BATCH_PIXELS pixels per batch. The deletion check's images
# (benchmarks/bench_check_batch.py, idle CPU, 2 threads, per checked map against batch 1): batch 16 is 4.1x (demo
# model, 112x112) and 3.8x (crosses model, 112x168) faster, batch 8 3.2x and 3.0x; at 448x448 on the mid-size model
# batch 1 is the fastest (8: 0.88x, 16: 0.84x). On CUDA, DEFAULT_BATCH_SIZE (not measured here: no GPU was lent to
# this work).
DEFAULT_BATCH_SIZE = 16
CPU_BATCH_PIXELS = 400_000


def auto_batch_size(x: torch.Tensor) -> int:
    """The default batch size for images like ``x`` ``(1, C, H, W)``: :data:`DEFAULT_BATCH_SIZE` on CUDA; on the CPU
    as many as fit in :data:`CPU_BATCH_PIXELS` pixels (at least 1, at most :data:`DEFAULT_BATCH_SIZE`)."""
    if x.is_cuda:
        return DEFAULT_BATCH_SIZE
    return max(1, min(DEFAULT_BATCH_SIZE, CPU_BATCH_PIXELS // (x.shape[-2] * x.shape[-1])))


def map_rng(seed: int, cam: np.ndarray) -> np.random.Generator:
    """The random tie order of one map: drawn from ``seed`` and the map's values, so a map's check is the same
    whichever other maps are checked with it (``explain`` checks a map in two stages, and some maps in one)."""
    return np.random.default_rng([seed, zlib.crc32(np.ascontiguousarray(cam, dtype=np.float32).tobytes())])


def ranked_map(cam: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The map's pixel ranks scaled to [0, 1], ties in random order. Ranks keep the map's order and make every
    removed share exact, where thresholding a map that is 0 over most pixels would remove all of them at once."""
    order = np.lexsort((rng.random(cam.size), np.ravel(cam)))
    ranks = np.empty(cam.size)
    ranks[order] = np.arange(cam.size)
    return (ranks / max(1, cam.size - 1)).reshape(cam.shape).astype(np.float32)


def filled(x: torch.Tensor, fill: str) -> torch.Tensor:
    """What removed pixels of ``x`` ``(1, 3, H, W)`` become: 0 (the mean colour of the normalised input) or the
    Gaussian-blurred image."""
    if fill == "mean":
        return torch.zeros_like(x)
    if fill != "blur":
        raise ValueError(f"fill must be one of {FILLS}, got {fill!r}.")
    radius = int(3 * BLUR_SIGMA)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device)
    kernel = torch.exp(-offsets ** 2 / (2 * BLUR_SIGMA ** 2))
    kernel = (kernel / kernel.sum()).to(x.dtype)
    channels = x.shape[1]
    padded = torch.nn.functional.pad(x, (radius, radius, radius, radius), mode="replicate")
    rows = torch.nn.functional.conv2d(padded, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    return torch.nn.functional.conv2d(rows, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)


def target_scores(model: torch.nn.Module, images: torch.Tensor, target: Callable, batch_size: int) -> np.ndarray:
    """``target(model(image))`` for each image of ``images`` ``(N, 3, H, W)``, in batches, without gradients."""
    scores = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            outputs = model(images[start:start + batch_size])
            scores += [target(row) for row in outputs]
    return torch.stack([torch.as_tensor(s).float().reshape(()) for s in scores]).cpu().numpy() if scores \
        else np.zeros(0, dtype=np.float32)


def check_maps(model: torch.nn.Module, x: torch.Tensor, maps: np.ndarray, target: Callable,
               fractions: Sequence[float] = DEFAULT_FRACTIONS, fill: str = "mean",
               batch_size: Optional[int] = None, seed: int = 0, blank_tolerance: float = 1e-6,
               peak_window: int = PEAK_WINDOW, clean: Optional[float] = None,
               window_scores: Optional[dict] = None, null: int = 0, cell: Optional[int] = None,
               region: Optional[np.ndarray] = None) -> List[MapCheck]:
    """The deletion check (see the module's docstring) of each of ``maps`` ``(M, H, W)`` for one image ``x``
    ``(1, 3, H, W)`` and a grad-cam ``target`` (e.g. ``ClassifierOutputTarget(token_id)``), on ``model`` (a
    wrapper). Every perturbed image of every map goes through the model in batches of ``batch_size`` (None:
    :func:`auto_batch_size`): ``2 * F`` forward images per map that is not blank, one per distinct peak
    (``peak_window`` pixels removed around it) not already in ``window_scores`` (peak pixel -> target with its window
    removed; filled in, to share between calls on the same image), and the clean image unless its score ``clean``
    is given. Ties are broken in the order of :func:`map_rng`. ``null`` > 0 checks that many
    :func:`~pytorch_grad_cam_vlm.metrics.null.null_maps` of token cells of ``cell`` pixels (default
    ``model.token_cell``) in the same batches, ``2 * F + 1`` more images each, and sets every map's ``null_margin``
    (:func:`with_null_margins`). A ``region`` ``(H, W)`` bool (one image of several in one prompt) confines the
    check to its pixels: the fractions are shares of the region, the peak is the map's maximum there and its window
    is removed there only (``window_scores`` then holds this region's windows alone). Returns one :class:`MapCheck`
    per map."""
    maps = np.asarray(maps, dtype=np.float32)
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"check_maps takes one image (1, 3, H, W), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}.")
    if maps.ndim == 2:
        maps = maps[None]
    if maps.ndim != 3 or maps.shape[1:] != tuple(x.shape[2:]):
        raise ValueError(f"Expected maps (M, H, W) of the image's size {tuple(x.shape[2:])}, got {maps.shape}.")
    fractions = [float(f) for f in fractions]
    if not fractions or any(not 0 < f < 1 for f in fractions):
        raise ValueError(f"fractions must be numbers between 0 and 1 (exclusive), got {fractions}.")
    batch_size = auto_batch_size(x) if batch_size is None else batch_size
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}.")
    if not isinstance(peak_window, int) or peak_window < 1:
        raise ValueError(f"peak_window must be a whole number of pixels >= 1, got {peak_window!r}.")
    if null and (not isinstance(null, int) or null < 2):
        raise ValueError(f"null must be 0 (no null) or a whole number of maps >= 2 (its spread), got {null!r}.")
    if region is not None:
        region = np.asarray(region, dtype=bool)
        if region.shape != maps.shape[1:] or not region.any():
            raise ValueError(f"region must be a (H, W) bool mask of the image's size {tuple(x.shape[2:])} with at "
                             f"least one pixel, got shape {region.shape}.")
    if null:
        maps = np.concatenate([maps, null_maps(maps.shape[1:], token_cell(model, cell), null, seed)])
    x = x.detach()
    background = filled(x, fill)
    inside = slice(None) if region is None else region
    blank = [bool(not np.all(np.isfinite(m[inside])) or np.ptp(m[inside]) < blank_tolerance) for m in maps]
    images = [] if clean is not None else [x[0]]  # the clean image, for the peak drops
    window_scores = {} if window_scores is None else window_scores
    peak_images = {}  # peak pixel -> index of its image: maps that peak at the same pixel share it
    where = []  # per map: (index of its first image, index of its peak's image), None when blank
    for cam, is_blank in zip(maps, blank):
        if is_blank:
            where.append(None)
            continue
        if region is None:
            ranks = ranked_map(cam, map_rng(seed, cam))
        else:  # outside the region NaN, which neither the top nor the bottom comparison takes
            ranks = np.full(cam.shape, np.nan, np.float32)
            ranks[region] = ranked_map(cam[region], map_rng(seed, cam))
        ranks = torch.from_numpy(ranks).to(x.device)
        start = len(images)
        for f in fractions:
            for removed in (ranks >= 1 - f, ranks < f):  # the top f, then the bottom f
                images.append(torch.where(removed, background, x)[0])
        peak = map_peak(cam if region is None else np.where(region, cam, cam[region].min()))
        if peak not in peak_images and peak not in window_scores:
            peak_images[peak] = len(images)
            window = without_window(x, background, peak, peak_window)
            if region is not None:
                window = torch.where(torch.from_numpy(region).to(x.device), window, x)
            images.append(window[0])
        where.append((start, peak))
    scores = target_scores(model, torch.stack(images), target, batch_size) \
        if images and where.count(None) < len(where) else None
    clean = float(scores[0]) if clean is None and scores is not None else clean
    window_scores.update({peak: float(scores[i]) for peak, i in peak_images.items()})
    checks, n = [], len(fractions)
    for at in where:
        if at is None:
            checks.append(MapCheck(float("nan"), [], [], True, float("nan")))
            continue
        start, peak = at
        top, bottom = scores[start:start + 2 * n:2], scores[start + 1:start + 2 * n:2]
        checks.append(MapCheck(float(np.mean(bottom - top)), [float(v) for v in top], [float(v) for v in bottom],
                               False, float(clean - window_scores[peak]), clean=float(clean)))
    return with_null_margins(checks[:-null], checks[-null:], clean) if null else checks


def with_null_margins(checks: Sequence[Optional[MapCheck]], null: Sequence[MapCheck],
                      clean: float) -> List[Optional[MapCheck]]:
    """``checks`` with their :func:`~pytorch_grad_cam_vlm.metrics.null.null_margin` against the totals of ``null``
    (complete checks of :func:`~pytorch_grad_cam_vlm.metrics.null.null_maps` of the same image, whose target is
    ``clean``), the median drop of the target when a null map's top or bottom share at the first fraction is
    removed (``null_removal_drop``: what removing random token cells costs) and the null's totals (``null_totals``,
    which :func:`with_null_of` reuses for a map checked later on the same image). Partial, estimated and missing checks
    are left as they are."""
    totals = tuple(c.total for c in null)
    drop = float(np.median([clean - v for c in null for v in (c.top_removed[0], c.bottom_removed[0])]))
    return [c if c is None or not c.complete else replace(
        c, null_margin=null_margin(c.total, totals, clean), null_removal_drop=drop, null_totals=totals) for c in checks]


def with_null_of(check: MapCheck, measured: MapCheck) -> MapCheck:
    """``check`` with the null of ``measured``, a complete check of another map of the same image and target with
    its null (``null_totals`` set): its margin over those totals and the null's ``null_removal_drop``; ``check``
    as it is when ``measured`` has no null, or ``check`` is blank or not complete."""
    if measured.null_totals is None or not check.complete or check.blank:
        return check
    return replace(check, null_margin=null_margin(check.total, measured.null_totals, check.clean),
                   null_removal_drop=measured.null_removal_drop, null_totals=measured.null_totals)


def peak_drops(model: torch.nn.Module, x: torch.Tensor, maps: np.ndarray, target: Callable, clean: float,
               fill: str = "mean", batch_size: Optional[int] = None, blank_tolerance: float = 1e-6,
               peak_window: int = PEAK_WINDOW, window_scores: Optional[dict] = None) -> np.ndarray:
    """Each map's ``peak_drop`` alone (NaN when blank) given the target's ``clean`` value: one forward image per
    distinct peak not already in ``window_scores`` (filled in, as :func:`check_maps` does)."""
    window_scores = {} if window_scores is None else window_scores
    x = x.detach()
    peaks = [None if not np.all(np.isfinite(m)) or m.max() - m.min() < blank_tolerance else map_peak(m)
             for m in np.asarray(maps, dtype=np.float32)]
    new = list(dict.fromkeys(p for p in peaks if p is not None and p not in window_scores))
    if new:
        background = filled(x, fill)
        images = torch.cat([without_window(x, background, p, peak_window) for p in new])
        batch_size = auto_batch_size(x) if batch_size is None else batch_size
        window_scores.update(zip(new, map(float, target_scores(model, images, target, batch_size))))
    return np.array([np.nan if p is None else clean - window_scores[p] for p in peaks])


def target_gradient(model: torch.nn.Module, x: torch.Tensor, target: Callable) -> Tuple[float, torch.Tensor]:
    """``target(model(x))`` of one image ``x`` ``(1, 3, H, W)`` and its gradient with respect to ``x``: one forward
    and one backward pass, the whole input to :func:`first_order_checks`."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        score = torch.as_tensor(target(model(x)[0])).float().reshape(())
        gradient, = torch.autograd.grad(score, x)
    return float(score.detach()), gradient


def first_order_checks(x: torch.Tensor, gradient: torch.Tensor, clean: float, maps: np.ndarray,
                       fractions: Sequence[float] = DEFAULT_FRACTIONS, fill: str = "mean", seed: int = 0,
                       blank_tolerance: float = 1e-6, peak_window: int = PEAK_WINDOW) -> List[MapCheck]:
    """The deletion check of each of ``maps`` ``(M, H, W)`` estimated to first order, with no forward pass: removing
    a set of pixels changes the target by about the sum over it of ``gradient * (fill - x)`` (``gradient`` and
    ``clean`` from :func:`target_gradient`). The removed sets are those of :func:`check_maps` with the same ``seed``
    (ties broken in the same order), so on a model linear in its input the two agree exactly. Returns
    :class:`MapCheck` s marked ``estimated``."""
    maps = np.asarray(maps, dtype=np.float32)
    x = x.detach()
    change = ((filled(x, fill) - x) * gradient).sum(dim=(0, 1)).double().cpu().numpy()  # (H, W)
    checks = []
    for cam in maps:
        if not np.all(np.isfinite(cam)) or cam.max() - cam.min() < blank_tolerance:
            checks.append(MapCheck(float("nan"), [], [], True, float("nan"), estimated=True))
            continue
        ranks = ranked_map(cam, map_rng(seed, cam))
        top = [clean + float(change[ranks >= 1 - f].sum()) for f in fractions]
        bottom = [clean + float(change[ranks < f].sum()) for f in fractions]
        window = without_window(torch.zeros(1, 1, *cam.shape), torch.ones(1, 1, *cam.shape), map_peak(cam),
                                peak_window)[0, 0].numpy() > 0
        checks.append(MapCheck(float(np.mean(np.subtract(bottom, top))), top, bottom, False,
                               -float(change[window].sum()), estimated=True))
    return checks


def without_window(x: torch.Tensor, background: torch.Tensor, centre: tuple, window: int) -> torch.Tensor:
    """``x`` with the ``window``-pixel square centred on ``centre`` ``(x, y)`` (clipped to the image) taken from
    ``background``."""
    column, row = int(centre[0]) - window // 2, int(centre[1]) - window // 2
    out = x.clone()
    rows = slice(max(0, row), max(0, row + window))
    columns = slice(max(0, column), max(0, column + window))
    out[..., rows, columns] = background[..., rows, columns]
    return out
