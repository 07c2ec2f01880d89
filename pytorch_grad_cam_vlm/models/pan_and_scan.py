"""Where Gemma 3's image tokens lie on the input: one square image, or with pan-and-scan the whole image and its crops
on a canvas, and how :class:`~pytorch_grad_cam_vlm.Gemma3Wrapper` puts their hidden states back on the pixel plane.

Pan-and-scan as the processor does it (transformers 5.x, ``Gemma3ImageProcessor``, ``do_pan_and_scan=True``): a
picture whose aspect ratio reaches ``pan_and_scan_min_ratio_to_activate`` is cut along its long side into ``n`` crops
(2 to ``pan_and_scan_max_num_crops``, each at least ``pan_and_scan_min_crop_size`` pixels; ``ceil(side / n)`` long,
the last one shorter by the rounding), and the encoder sees the whole picture resized (squashed) to its square
``image_size``, then each crop resized to that square. The prompt holds one block of ``mm_tokens_per_image``
tokens per image, the whole picture's first ("Here is the original image ... and here are some crops ...").

The wrapper's input is the *canvas*: the processor's crops side by side, ``(S, n S)`` or ``(n S, S)`` for the
encoder's size ``S``; without crops, the one ``S x S`` image. The maps lie on the canvas's grid of crop tokens
(:meth:`~pytorch_grad_cam_vlm.models.tiles.TileViews.place_views`):

- ``"crops"`` (fine): each crop's ``g x g`` tokens on its square of the canvas;
- ``"whole"`` (coarse): the whole picture's ``g x g`` tokens, resized (bilinear) onto the canvas's grid;
- ``"combined"``: both stacked as channels ``(B, 2C, h, w)``, so grad-cam's channel sum adds the two maps before
  its ReLU (as :mod:`pytorch_grad_cam_vlm.models.anyres` does for LLaVA's tiles and base image).

Without crops every view is the one image's ``g x g`` grid.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from pytorch_grad_cam_vlm.models.frame import ImageFrame, Piece
from pytorch_grad_cam_vlm.models.multi_image import ImageBoxes
from pytorch_grad_cam_vlm.models.tiles import tile_grids

VIEWS = ("crops", "whole", "combined")


@dataclass
class Gemma3Layout:
    """Where the images sit in one prompt and how their tokens cover the input, for one input size."""

    text_inputs: Dict[str, torch.Tensor]  # input_ids, attention_mask, token_type_ids for batch 1, no pixel values
    image_positions: torch.Tensor  # sequence positions of every image token: the whole image's, then each crop's
    grid: int  # image tokens per side of one image, sqrt(mm_tokens_per_image)
    crops: Tuple[int, int]  # rows and columns of crops on the canvas; (1, 1) without crops
    canvas: Tuple[int, int]  # (H, W) of the input in pixels
    answer_ids: Optional[torch.Tensor] = None  # the teacher-forced answer's token ids, the last tokens of input_ids
    boxes: Optional[ImageBoxes] = None  # several images in one prompt, side by side on the canvas

    @property
    def has_crops(self) -> bool:
        return self.crops != (1, 1)

    @property
    def image_count(self) -> int:
        """Images the encoder sees per sample: the whole picture and its crops, the one image, or the prompt's
        several images."""
        if self.boxes is not None:
            return len(self.boxes)
        return 1 + self.crops[0] * self.crops[1] if self.has_crops else 1

    @property
    def sequence_length(self) -> int:
        return int(self.text_inputs["input_ids"].shape[1])

    @property
    def whole_positions(self) -> torch.Tensor:
        """Positions of the whole picture's tokens in raster order."""
        return self.image_positions[:self.grid ** 2]

    @property
    def crop_positions(self) -> torch.Tensor:
        """Positions of the crops' tokens (the whole picture's without crops), crop after crop."""
        return self.image_positions[self.grid ** 2:] if self.has_crops else self.whole_positions


def canvas_crops(canvas: Tuple[int, int], image_size: int) -> Tuple[int, int]:
    """Rows and columns of crops of a canvas ``(H, W)``; ``ValueError`` for a size that is no canvas."""
    (height, width), s = canvas, image_size
    rows, cols = height // s, width // s
    if height % s or width % s or min(rows, cols) != 1:
        raise ValueError(f"A {height}x{width} input is no Gemma 3 input: that is one {s}x{s} image, or with "
                         f"pan-and-scan {s}x{s} crops in one row or column ({s}x{2 * s}, {2 * s}x{s}, ...). "
                         "Prepare images with wrapper.preprocess(image).")
    return rows, cols


def crops_frame(image_size: Tuple[int, int], canvas: Tuple[int, int], tile: int) -> ImageFrame:
    """Where a canvas lies on the picture of ``image_size``: each crop's square of the canvas shows its crop of the
    picture, ``ceil(side / n)`` pixels along the long side, the last one shorter (the processor's
    ``pan_and_scan``); without crops, the picture squashed onto the one square image."""
    rows, cols = canvas_crops(canvas, tile)
    if rows * cols == 1:
        return ImageFrame.resized(image_size, canvas)
    (h0, w0), n = image_size, rows * cols
    along_width = cols > 1
    step = math.ceil((w0 if along_width else h0) / n)
    pieces = []
    for i in range(n):
        length = min(step, (w0 if along_width else h0) - i * step)
        if along_width:
            pieces.append(Piece((0, i * tile, tile, tile), (0, i * step, h0, length)))
        else:
            pieces.append(Piece((i * tile, 0, tile, tile), (i * step, 0, length, w0)))
    return ImageFrame(tuple(image_size), tuple(canvas), tuple(pieces))


def image_grids(tokens: torch.Tensor, layout: Gemma3Layout) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(B, images, side * side, C)`` rows (tokens, or an encoder's patches) to the whole picture's
    ``(B, C, side, side)`` grid and the crops' ``(B, C, rows * side, cols * side)`` grid (``None`` without crops)."""
    b, _, count, channels = tokens.shape
    side = math.isqrt(count)
    grids = tokens.reshape(b, layout.image_count, side, side, channels)
    whole = grids[:, 0].permute(0, 3, 1, 2)
    return whole, tile_grids(grids[:, 1:], layout.crops)[0] if layout.has_crops else None
