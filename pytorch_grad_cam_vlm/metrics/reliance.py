"""Does the target depend on the image at all? A vision-language model can answer from its prompt alone; then every
map is noise, however well it ranks among the others.

Visual reliance replaces the whole image by the deletion check's fill (the mean colour: 0 in the normalised input)
and, separately, by its blur (:data:`~pytorch_grad_cam_vlm.metrics.deletion_check.BLUR_SIGMA`), and reports the
target's change in its own units and as a share of its clean value. Two forward images per image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from pytorch_grad_cam_vlm.metrics.deletion_check import filled, target_scores
from pytorch_grad_cam_vlm.metrics.map_check import MapCheck

# Below this share of its clean value, removing the whole image leaves the target as it is: the answer comes from the
# prompt. Measured (benchmarks/visual_reliance.md, 100 held-out samples each): a model whose image tokens are zeroed
# gives exactly 0; the crosses, pairs, onevision and internvl models' smallest shares are 0.79-1.03; the demo model
# gives 0 on its "triangle" answers, the answer it gives a grey image too, and the OneVision development model +0.2 %
# on a sample where occlusion finds the object: a model's default answer survives a blank image, yet parts of the
# image still move it. So the warning also needs every part the deletion check removed (each map's top and bottom
# shares, its peak window, the null maps') to leave the target within the threshold (``part_change``), as it does,
# exactly, for a model that cannot see the image. The blur is reported, not part of the rule: it moves the demo
# model's "triangle" (to -0.85 on held-out sample 0, whose grey image and every removal leave it at 8.63), which says
# the model reads images, not that this answer comes from this one. With the blur in the rule 17 of 200 held-out demo
# samples went unwarned, every map of them "untestable" (docs/auto.md, benchmarks/verdict_null.md).
RELIANCE_THRESHOLD = 0.05


@dataclass
class VisualReliance:
    """The target on the image (``clean``), on the image replaced by its mean colour (``without_image``) and on its
    blur (``blurred``)."""

    clean: float
    without_image: float
    blurred: float
    part_change: float = 0.0  # the largest change of the target when the deletion check removed a part of the image

    @property
    def drop(self) -> float:
        """How much the target falls when the whole image is replaced by its mean colour (its units)."""
        return self.clean - self.without_image

    @property
    def blur_drop(self) -> float:
        """How much the target falls when the image is blurred (its units)."""
        return self.clean - self.blurred

    @property
    def share(self) -> float:
        """``drop`` as a share of the clean value's size (NaN when the clean value is 0)."""
        return self.drop / abs(self.clean) if self.clean else float("nan")

    @property
    def blur_share(self) -> float:
        """``blur_drop`` as a share of the clean value's size."""
        return self.blur_drop / abs(self.clean) if self.clean else float("nan")

    @property
    def part_share(self) -> float:
        """``part_change`` as a share of the clean value's size."""
        return abs(self.part_change) / abs(self.clean) if self.clean else float("nan")

    @property
    def prompt_only(self) -> bool:
        """Neither replacing the whole image by its mean colour nor removing any part of it that the deletion check
        removed changes the target by :data:`RELIANCE_THRESHOLD` of its value: the model gives this answer without
        the image. The blur is not asked (see :data:`RELIANCE_THRESHOLD`)."""
        return bool(np.nanmax([abs(self.share), self.part_share, 0.0]) < RELIANCE_THRESHOLD)

    def warning(self, name: str) -> Optional[str]:
        """One line when the answer comes from the prompt (``None`` otherwise)."""
        if not self.prompt_only:
            return None
        return (f"{name}: the target hardly depends on the image (replacing the whole image by its mean colour "
                f"changes it by {self.share:+.1%}, removing parts of it by at most {self.part_share:.1%}; blurring "
                f"it by {self.blur_share:+.1%}): the answer comes from the prompt, not the image, and no map of it "
                "can be trusted.")


def part_change(clean: float, checks: Sequence[MapCheck]) -> float:
    """The largest change of the target, from its ``clean`` value, among the images ``checks`` scored: each map's top
    and bottom shares removed and its peak window removed (0 when every map was blank). Maps a staged or peak choice
    left unchecked come as ``None`` and are skipped."""
    changes = [c.largest_change(clean) for c in checks if c is not None and not c.blank]
    return float(np.nanmax(changes)) if changes and not np.all(np.isnan(changes)) else 0.0


def visual_reliance(model: torch.nn.Module, x: torch.Tensor, target: Callable, clean: Optional[float] = None,
                    batch_size: int = 2, checks: Sequence[MapCheck] = ()) -> VisualReliance:
    """The :class:`VisualReliance` of ``target`` on one image ``x`` ``(1, 3, H, W)``: two forward images (one batch),
    and the clean image unless its score ``clean`` is given. ``checks``: the deletion checks of maps of this image,
    whose removals say whether parts of the image move the target (:func:`part_change`); no extra image."""
    x = x.detach()
    images = [filled(x, "mean"), filled(x, "blur")] + ([] if clean is not None else [x])
    scores = target_scores(model, torch.cat(images), target, batch_size)
    clean = float(scores[2]) if clean is None else float(clean)
    return VisualReliance(clean, float(scores[0]), float(scores[1]), part_change(clean, checks))
