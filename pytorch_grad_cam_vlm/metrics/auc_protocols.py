"""Deletion / insertion protocols (Petsiuk et al. 2018): what removed pixels become (a canvas per curve), how many
pixels each step removes, and the order of pixels of equal map value, as each published protocol does it.

- ``rise`` (RISE, ``eclique/RISE`` ``evaluation.py`` and ``Evaluation.ipynb``): deletion to ``torch.zeros_like`` of
  the *normalised* input (the processor's mean colour), insertion from the input blurred by ``gkern(11, 5)`` (an
  11-pixel kernel made by ``scipy.ndimage.gaussian_filter`` of a centred delta with sigma 5) through ``conv2d`` with
  zero padding; ``224 * 8`` pixels per step on its 224x224 inputs, i.e. 8 image rows (``8 W`` pixels) per step here,
  ``ceil(H / 8)`` steps, the last one partial where ``H`` is not a multiple of 8 (its AUC still spaces the points
  evenly, as RISE's ``auc`` does). Ties: ``np.flip(np.argsort(map))``: among equal values the later pixel first.
- ``eagle`` (EAGLE, ``RuoyuChen10/EAGLE``: ``perturbed()`` and ``evals/eval_AUC_faithfulness.py``): a black canvas
  (pixel value 0 before normalisation) for both curves, 64 steps, step ``k`` taking ``int(N * k / 64)`` pixels,
  trapezoid AUC over the removed share. Ties: ``np.argsort(-map)``: among equal values the earlier pixel first.
- ``black`` (the default): EAGLE's black canvas for both curves in 20 steps (``k N // 20`` pixels at step ``k``, 5 %
  each), ties in seeded random order (every step removes its exact share, as the benchmark's ROAD does). Chosen by
  ``benchmarks/auc_canvas.md``: on both development models a black canvas takes the target's probability below 0.1
  of the clean image's on every sample where the model's answer for a blank image is not the answer itself, where
  RISE's blur keeps more than 0.9 of it on 97 % (demo) and 47 % (crosses) of samples and the sigma-8 blur on 75 %
  (demo). 20 steps rather than EAGLE's 64 keep a row's cost (38 images for both curves, not 126).
- ``blur``: this package's former default: the input blurred by a Gaussian of sigma 8 pixels for both curves, 20
  steps, ties in seeded random order. It saturates: on the demo models the blurred image keeps most of the target's
  probability (``benchmarks/auc_canvas.md``); kept to compare with earlier runs.

The published code sorts with numpy's default (unstable) ``argsort``, whose order among equal values is not
specified; here the presets use the stable sort in the direction the published code sorts (``ties="protocol"``),
or a seeded random order (``ties="random"``). On maps without ties both give the published order.
Every curve is scored with the target's softmax probability, as both papers do; the AUC is the trapezoid rule
over evenly spaced points (RISE's ``auc`` and, on its even grid, EAGLE's ``sklearn.metrics.auc``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from pytorch_grad_cam_vlm.metrics.deletion_check import filled

CANVASES = ("black", "zeros", "rise-blur", "blur")
TIES = ("protocol", "random")


@dataclass(frozen=True)
class AUCProtocol:
    """One deletion / insertion protocol: the canvas of each curve (:data:`CANVASES`), the number of ``steps`` (or,
    for RISE, ``rows_per_step`` image rows of pixels per step), the tie order of equal map values among the pixels
    (``"first"``: the earlier pixel first, ``"last"``: the later first, ``"random"``: seeded)."""

    name: str
    deletion_canvas: str
    insertion_canvas: str
    steps: Optional[int]
    rows_per_step: Optional[int]
    tie_order: str

    def counts(self, height: int, width: int) -> List[int]:
        """The number of pixels removed at each point of the curves, ``0 .. H W``."""
        n = height * width
        if self.rows_per_step is not None:
            step = self.rows_per_step * width
            return [min(k * step, n) for k in range(math.ceil(n / step) + 1)]
        return [k * n // self.steps for k in range(self.steps + 1)]


PROTOCOLS: Dict[str, AUCProtocol] = {
    "rise": AUCProtocol("rise", "zeros", "rise-blur", None, 8, "last"),
    "eagle": AUCProtocol("eagle", "black", "black", 64, None, "first"),
    "black": AUCProtocol("black", "black", "black", 20, None, "random"),
    "blur": AUCProtocol("blur", "blur", "blur", 20, None, "random"),
}
DEFAULT_PROTOCOL = "black"  # benchmarks/auc_canvas.md (see the module)


def protocol(name: str, deletion_canvas: Optional[str] = None, insertion_canvas: Optional[str] = None,
             steps: Optional[int] = None, ties: str = "protocol") -> AUCProtocol:
    """The preset ``name`` of :data:`PROTOCOLS`, with a canvas, the step count (evenly spaced shares) or the tie
    order (``"random"``) replaced where given."""
    if name not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {tuple(PROTOCOLS)}, got {name!r}.")
    for canvas in (deletion_canvas, insertion_canvas):
        if canvas is not None and canvas not in CANVASES:
            raise ValueError(f"canvas must be one of {CANVASES}, got {canvas!r}.")
    if steps is not None and (not isinstance(steps, int) or steps < 2):
        raise ValueError(f"steps must be a whole number >= 2, got {steps!r}.")
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}.")
    chosen = PROTOCOLS[name]
    return replace(chosen, deletion_canvas=deletion_canvas or chosen.deletion_canvas,
                   insertion_canvas=insertion_canvas or chosen.insertion_canvas,
                   steps=steps if steps is not None else chosen.steps,
                   rows_per_step=None if steps is not None else chosen.rows_per_step,
                   tie_order="random" if ties == "random" else chosen.tie_order)


def rise_kernel(size: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """RISE's ``gkern(11, 5)``: ``scipy.ndimage.gaussian_filter`` of a centred delta in a ``size x size`` array
    (reflected at its edges, so it sums to 1), float32, ``(size, size)``."""
    from scipy.ndimage import gaussian_filter

    delta = np.zeros((size, size))
    delta[size // 2, size // 2] = 1
    return torch.from_numpy(gaussian_filter(delta, sigma).astype(np.float32))


def canvas(x: torch.Tensor, name: str, image_mean: Optional[torch.Tensor] = None,
           image_std: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The canvas ``name`` of the normalised images ``x`` ``(B, 3, H, W)``: ``"zeros"`` (0 once normalised: the
    processor's mean colour), ``"black"`` (pixel value 0: ``-mean / std``, from the wrapper's ``image_mean`` /
    ``image_std``), ``"rise-blur"`` (:func:`rise_kernel` by ``conv2d``, zero padding) or ``"blur"`` (sigma 8,
    :func:`~pytorch_grad_cam_vlm.metrics.deletion_check.filled`)."""
    if name == "zeros":
        return torch.zeros_like(x)
    if name == "black":
        if image_mean is None or image_std is None:
            raise ValueError("the black canvas needs the processor's image_mean and image_std.")
        return (-image_mean / image_std).to(x).expand_as(x).clone()
    if name == "rise-blur":
        kernel = rise_kernel().to(x)
        channels = x.shape[1]
        weight = kernel.expand(channels, 1, *kernel.shape).contiguous()
        return torch.nn.functional.conv2d(x, weight, padding=kernel.shape[-1] // 2, groups=channels)
    if name == "blur":
        return filled(x, "blur")
    raise ValueError(f"canvas must be one of {CANVASES}, got {name!r}.")


def removal_order(cam: np.ndarray, tie_order: str, ranks: Optional[np.ndarray] = None) -> np.ndarray:
    """The flat pixel indices of ``cam`` in removal order, the most relevant first; equal values ordered by
    ``tie_order``: ``"first"`` (as EAGLE's ``np.argsort(-map)``, with a stable sort), ``"last"`` (as RISE's
    ``np.flip(np.argsort(map))``, with a stable sort) or ``"random"`` (the order of ``ranks``, the map's
    :func:`~pytorch_grad_cam_vlm.metrics.deletion_check.ranked_map`: seeded)."""
    if tie_order == "random":
        if ranks is None:
            raise ValueError("a random tie order needs the ranked map.")
        return np.argsort(-np.ravel(ranks), kind="stable")
    flat = np.ravel(np.asarray(cam))
    if tie_order == "first":
        return np.argsort(-flat, kind="stable")
    if tie_order == "last":
        return np.argsort(flat, kind="stable")[::-1].copy()
    raise ValueError(f"tie_order must be 'first', 'last' or 'random', got {tie_order!r}.")


def removed_masks(order: np.ndarray, counts: Sequence[int], shape: Tuple[int, int],
                  device: Optional[torch.device] = None) -> List[torch.Tensor]:
    """For each count ``c`` of ``counts``, the ``(H, W)`` boolean mask of the first ``c`` pixels of ``order``."""
    place = torch.empty(len(order), dtype=torch.long)
    place[torch.from_numpy(np.ascontiguousarray(order))] = torch.arange(len(order))
    place = place.reshape(shape).to(device)
    return [place < c for c in counts]
