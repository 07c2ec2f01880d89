"""How a map of several images in one prompt splits between them: each image's share of the map's mass, and the
deletion check of each image's part of the map.

The map lies on the canvas of the images (:mod:`pytorch_grad_cam_vlm.models.multi_image`). An image's share is the
map's sum over its pixels over the sum over every image's (pixels between the images do not count). Its check is
:func:`~pytorch_grad_cam_vlm.metrics.deletion_check.check_maps` confined to its pixels: the top (bottom) share of
that image's pixels removed, the other images left whole, and the window around the map's peak in that image. An
image with a large share whose check fails holds relevance the model does not use; a small share with a passing
check, evidence the map underrates.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

from pytorch_grad_cam_vlm.metrics.deletion_check import DEFAULT_FRACTIONS, check_maps
from pytorch_grad_cam_vlm.metrics.map_check import MapCheck, failure_warning
from pytorch_grad_cam_vlm.metrics.sanity import pearson
from pytorch_grad_cam_vlm.models.frame import ImageFrame
from pytorch_grad_cam_vlm.models.multi_image import ImageBoxes, box_masks, image_maps, mass_shares


@dataclass
class ImageSplit:
    """One canvas map split between the ``N`` images of its prompt: ``shares[i]`` of the map's mass lies in image
    ``i`` (NaN for a map without mass), ``checks[i]`` is the deletion check of image ``i``'s part, ``maps[i]`` that
    part on image ``i`` itself (``frames[i].image_size``, NaN where unseen)."""

    boxes: ImageBoxes
    shares: np.ndarray  # (N,)
    checks: List[MapCheck]
    maps: List[np.ndarray]  # (h0_i, w0_i) each
    frames: List[ImageFrame]

    def warnings(self, names: Sequence[str]) -> List[str]:
        """One line per image (``names`` name them) that holds more than an even share of the map's mass while its
        part fails its check: relevance the model does not use there. An image with little of the mass failing its
        check is what a map that points elsewhere looks like, and says nothing."""
        return [failure_warning(f"{name} ({share:.0%} of the map's mass)", "its part of the map", check)
                for name, share, check in zip(names, self.shares, self.checks)
                if share > 1 / len(self.shares) and check.failed]


def split_map(model: torch.nn.Module, x: torch.Tensor, cam: np.ndarray, boxes: ImageBoxes, target: Callable,
              frames: Optional[Sequence[ImageFrame]] = None, fractions: Sequence[float] = DEFAULT_FRACTIONS,
              fill: str = "mean", batch_size: Optional[int] = None, seed: int = 0, clean: Optional[float] = None,
              null: int = 0, cell: Optional[int] = None, redrawn: Optional[np.ndarray] = None,
              prompt_only: bool = False) -> ImageSplit:
    """The :class:`ImageSplit` of ``cam`` ``(H, W)``, a map of the canvas ``x`` ``(1, 3, H, W)`` of the images at
    ``boxes``, for ``target``. ``frames`` carry each image's part onto the user's image (default: the part as it is).
    ``redrawn``: a second draw of ``cam``'s method (``(H, W)``), whose correlation with ``cam`` in each image is that
    part's ``stability``; ``prompt_only``: the target hardly depends on the images (every part "untestable"). The
    other arguments go to each image's :func:`~pytorch_grad_cam_vlm.metrics.deletion_check.check_maps` (``null`` > 0:
    that many null maps per image)."""
    cam = np.asarray(cam, dtype=np.float32)
    frames = list(frames) if frames is not None else [ImageFrame.resized((h, w), (h, w)) for _, _, h, w in boxes.boxes]
    checks = [replace(check_maps(model, x, cam, target, fractions, fill, batch_size, seed, clean=clean, null=null,
                                 cell=cell, region=region)[0], prompt_only=prompt_only,
                      stability=None if redrawn is None else pearson(cam[region], redrawn[region]))
              for region in box_masks(boxes)]
    parts = image_maps(cam[None], boxes)
    return ImageSplit(boxes, mass_shares(cam[None], boxes)[0], checks,
                      [frame.to_image(part[0]) for frame, part in zip(frames, parts)], frames)
