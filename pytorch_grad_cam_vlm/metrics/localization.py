"""Do the maps point at the evidence? The causal reference (occlusion), the pointing game, the energy inside a box,
and the localization table over methods and decoder layers on the demo task.

    python -m pytorch_grad_cam_vlm.metrics.localization --n 200 --out benchmarks/
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from pytorch_grad_cam_vlm.models.qwen_vl import QwenVLWrapper

Box = Tuple[int, int, int, int]


# ------------------------------------------------------------------------------------------------ reference
def occlusion_map(wrapper: QwenVLWrapper, x: torch.Tensor, target: Union[int, Callable], window: int = 28,
                  stride: Optional[int] = None, batch_size: int = 64, clean: Optional[float] = None) -> np.ndarray:
    """The causal reference: grey out ``window``-pixel squares (every ``stride`` pixels, half a window by default)
    and record how much the target drops: the logit of a token id, or a grad-cam target called on each output row
    (``ClassifierOutputTarget``, ``AnswerTarget``, ...); each pixel gets the mean drop of the windows that cover it.
    ``x`` is one normalised image ``(1, 3, H, W)``; grey is the processor's mean colour (0 once normalised). Returns
    an ``(H, W)`` float32 map, positive where hiding the pixels lowers the answer's score. Windows of the wrapper's
    ``token_cell`` with ``stride`` equal to it remove each token cell once (the map a check calls "incomplete"
    recommends). ``clean``: the target's score on ``x`` where it was measured already (a check's ``clean``),
    which saves its forward image."""
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"occlusion_map takes one image (1, 3, H, W), got shape {tuple(x.shape)}.")
    stride = stride or max(1, window // 2)
    _, _, height, width = x.shape
    if window > min(height, width):
        raise ValueError(f"The occlusion window ({window} px) is larger than the image ({height}x{width}).")
    tops = _window_starts(height, window, stride)
    lefts = _window_starts(width, window, stride)
    corners = [(t, l) for t in tops for l in lefts]
    score = (lambda row: row[target]) if isinstance(target, int) else target
    with torch.no_grad():
        base = float(score(wrapper(x)[0])) if clean is None else float(clean)
        scores = []
        for start in range(0, len(corners), batch_size):
            chunk = corners[start:start + batch_size]
            occluded = x.repeat(len(chunk), 1, 1, 1)
            for i, (t, l) in enumerate(chunk):
                occluded[i, :, t:t + window, l:l + window] = 0
            scores += [float(score(row)) for row in wrapper(occluded)]
    drops = base - np.array(scores, dtype=np.float32)
    total = np.zeros((height, width), dtype=np.float64)
    count = np.zeros((height, width), dtype=np.float64)
    for (t, l), drop in zip(corners, drops):
        total[t:t + window, l:l + window] += drop
        count[t:t + window, l:l + window] += 1
    return (total / count).astype(np.float32)


def _window_starts(size: int, window: int, stride: int) -> List[int]:
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:  # cover the last pixels too
        starts.append(size - window)
    return starts


# ------------------------------------------------------------------------------------------------ scores
def map_peak(cam: np.ndarray) -> Optional[Tuple[float, float]]:
    """``(x, y)`` of the map's maximum, or ``None`` for a flat (blank) map. A maximum spread over a plateau (as
    occlusion and upsampled token maps make) counts at the plateau pixel nearest to the plateau's centre."""
    cam = np.asarray(cam, dtype=np.float64)
    top, bottom = cam.max(), cam.min()
    if not np.isfinite(top) or top - bottom <= 1e-12 * max(1.0, abs(top)):
        return None
    ys, xs = np.nonzero(cam >= top - 1e-6 * (top - bottom))
    nearest = np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2)
    return float(xs[nearest]), float(ys[nearest])


def pointing_hit(cam: np.ndarray, box: Box, tolerance_px: float = 14) -> bool:
    """Pointing game: whether the map's maximum lies in ``box`` ``(x0, y0, x1, y1)`` (pixels, ``x1``/``y1``
    exclusive) widened by ``tolerance_px`` on every side. A blank map points nowhere."""
    peak = map_peak(cam)
    if peak is None:
        return False
    x, y = peak
    x0, y0, x1, y1 = box
    return x0 - tolerance_px <= x < x1 + tolerance_px and y0 - tolerance_px <= y < y1 + tolerance_px


def energy_in_box(cam: np.ndarray, box: Box) -> float:
    """The share of the map's positive mass inside ``box`` (0 for a map with no positive mass)."""
    positive = np.clip(np.asarray(cam, dtype=np.float64), 0, None)
    total = positive.sum()
    if total <= 0:
        return 0.0
    x0, y0, x1, y1 = box
    return float(positive[y0:y1, x0:x1].sum() / total)


def energy_in_boxes(cam: np.ndarray, boxes: Sequence[Box]) -> float:
    """:func:`~pytorch_grad_cam_vlm.metrics.localization.energy_in_box` of the union of ``boxes`` (integer pixel boxes):
    the mass of the union counted once. The union's pixels are gathered into one strip, so the strip's box holds
    exactly their mass."""
    inside = np.zeros(cam.shape, dtype=bool)
    for x0, y0, x1, y1 in boxes:
        inside[y0:y1, x0:x1] = True
    return energy_in_mask(cam, inside)


def energy_in_mask(cam: np.ndarray, mask: np.ndarray) -> float:
    """The share of the map's positive mass inside the binary ``mask`` (the map's size). The mask's pixels are
    gathered into one strip, so the strip's box holds exactly their mass."""
    inside = np.asarray(mask, dtype=bool)
    strip = np.concatenate([cam[inside], cam[~inside]])[None]
    return energy_in_box(strip, (0, 0, int(inside.sum()), 1))


def pointing_in_mask(cam: np.ndarray, mask: np.ndarray, tolerance_px: float = 14) -> bool:
    """Pointing game on a binary ``mask`` (the map's size): whether the map's maximum lies in the box of one of the
    mask's pixels widened by ``tolerance_px``, which for a mask that fills a box is exactly :func:`pointing_hit` on
    that box. A blank map points nowhere."""
    peak = map_peak(cam)
    if peak is None:
        return False
    x, y = peak
    height, width = np.shape(mask)
    # Pixel (mx, my) hits when mx - t <= x < mx + 1 + t, i.e. x - 1 - t < mx <= x + t (and alike for y).
    columns = slice(max(0, int(np.floor(x - 1 - tolerance_px)) + 1), max(0, int(np.floor(x + tolerance_px)) + 1))
    rows = slice(max(0, int(np.floor(y - 1 - tolerance_px)) + 1), max(0, int(np.floor(y + tolerance_px)) + 1))
    return bool(np.asarray(mask, dtype=bool)[rows, columns].any())
