"""Where LLaVA's image tokens lie on the input: one square image (LLaVA 1.5), or a base image and tiles on a canvas
("anyres": LLaVA-NeXT, LLaVA-OneVision), and how :class:`~pytorch_grad_cam_vlm.LlavaWrapper` puts their hidden
states back on the pixel plane.

The anyres layout, as the processor and the model build it (transformers 5.x):

- The processor picks the best-fitting resolution among ``image_grid_pinpoints`` (``select_best_resolution``),
  resizes the picture into it keeping its aspect ratio (``get_patch_output_size``), pads it black and centered to
  that size (the *canvas*), and cuts the canvas into square tiles of the vision tower's ``image_size``, in raster
  order. The *base image* is the whole picture resized (squashed) to the tower's size.
- The model encodes the base image and the tiles as one batch, lays the tiles' patch tokens out as one grid of
  ``(H / patch, W / patch)`` tokens, removes the rows or columns over the letterbox (``unpad_image``, from the
  picture's original size), OneVision downsamples the rest bilinearly when it holds more than ``anyres_max_N``
  tiles' worth of tokens (``vision_aspect_ratio``), and appends one ``image_newline`` token to each row. The
  language model sees the base image's tokens first, then that grid row by row.

The maps lie on the canvas's grid of tile tokens, the view's tokens placed there (:func:`place_views`):

- ``"tiles"`` (fine): the tile tokens, newline tokens dropped, put back where the unpadding took them from; the
  letterbox cells are 0; OneVision's downsampled grid is first spread back over the unpadded grid by the weights
  the model mixed the cells with (:func:`unmix`, the transpose of its bilinear downsampling), not upsampled;
- ``"base"`` (coarse): the base image's tokens, resized (bilinear) onto the same unpadded region, the picture;
- ``"combined"``: both, stacked as channels ``(B, 2C, h, w)``. grad-cam sums a map over channels, so the combined
  map is the sum of the tile map and the resized base map before grad-cam's ReLU and scaling: for GradCAM,
  ``relu(cam_tiles + cam_base)``, each part with its own channel weights, twice their mean (HiResCAM and LayerCAM
  likewise sum the two views' per-cell contributions; Eigen methods take the principal component of both). Where the
  two views disagree in sign they cancel: look at ``"tiles"`` and ``"base"`` apart then. Which view localises best on
  trained models is not measured here.

Vision blocks and the projector map the same way from the encoder's batch (one row per image: the base image, then
the tiles), the tile grid cropped to the unpadded region, so that the letterbox tokens, which the language model
never sees, are 0.

Several pictures in one prompt (:mod:`pytorch_grad_cam_vlm.models.multi_image`): the layout holds each picture's own
layout (:attr:`LlavaLayout.pictures`, its tokens' positions in the prompt) and its box on the input; each picture's
view is placed as above on its own part of the grid (:func:`place_pictures`). LLaVA 1.5 gives each picture its
square, LLaVA-NeXT its base image and tiles; OneVision tiles only a lone image: with several, the processor pads each
picture to a square (the mean colour) and resizes it to the encoder's size, and the model appends one newline token
to its base image's tokens, so every view draws those tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from pytorch_grad_cam_vlm.models.multi_image import ImageBoxes, place_padded

VIEWS = ("tiles", "base", "combined")


@dataclass
class LlavaLayout:
    """Where the image sits in one prompt and how its tokens cover the input, for one input size."""

    text_inputs: Dict[str, torch.Tensor]  # input_ids, attention_mask for batch 1, without pixel values
    image_positions: torch.Tensor  # sequence positions of every image token: the base image's, then the tiles'
    base_grid: int  # the base image's tokens per side, image_size / patch_size
    base_prefix: int  # 1 when the base image's tokens start with the class token (strategy "full" on CLIP)
    canvas: Tuple[int, int]  # (H, W) of the input in pixels
    source_size: Tuple[int, int]  # (h, w) of the picture the input was made from
    tiles: Tuple[int, int] = (0, 0)  # rows and columns of tiles (anyres)
    unpadded: Tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, height, width on the canvas token grid (anyres)
    packed: Tuple[int, int] = (0, 0)  # rows, columns of tile tokens the decoder sees, each row + newline (anyres)
    content_box: Tuple[int, int, int, int] = (0, 0, 0, 0)  # y, x, height, width in pixels of the picture (anyres)
    answer_ids: Optional[torch.Tensor] = None  # the teacher-forced answer's token ids, the last tokens of input_ids
    boxes: Optional[ImageBoxes] = None  # several pictures in one prompt: each one's part of the input
    pictures: Tuple["LlavaLayout", ...] = ()  # several pictures: each one's layout, its tokens' positions in the prompt

    @property
    def anyres(self) -> bool:
        """Whether tile tokens draw the map (of several pictures: any picture's)."""
        return any(p.anyres for p in self.pictures) if self.pictures else self.tiles != (0, 0)

    @property
    def image_tiles(self) -> Tuple[Tuple[int, int], ...]:
        """Several pictures: each one's rows and columns of tiles, ``(0, 0)`` for a square of the encoder's size."""
        return tuple(p.tiles for p in self.pictures)

    @property
    def sequence_length(self) -> int:
        return int(self.text_inputs["input_ids"].shape[1])

    @property
    def base_count(self) -> int:
        return self.base_prefix + self.base_grid ** 2

    @property
    def image_count(self) -> int:
        """Images the vision tower encodes per sample: the base image and the tiles, or the one image (of several
        pictures: all of theirs)."""
        if self.pictures:
            return sum(p.image_count for p in self.pictures)
        return 1 + self.tiles[0] * self.tiles[1]

    @property
    def expected_tokens(self) -> int:
        """Image tokens in the prompt: the base image's, then each packed row and its newline token."""
        return self.base_count + self.packed[0] * (self.packed[1] + 1)

    @property
    def base_positions(self) -> torch.Tensor:
        """Positions of the base image's patch tokens in raster order (the class token left out; of several
        pictures: each one's in turn)."""
        if self.pictures:
            return torch.cat([p.base_positions for p in self.pictures])
        return self.image_positions[self.base_prefix:self.base_count]

    @property
    def tile_positions(self) -> torch.Tensor:
        """Positions of the tile tokens in raster order of the packed grid (newline tokens left out; of several
        pictures: each tiled one's in turn)."""
        if self.pictures:
            return torch.cat([p.tile_positions for p in self.pictures if p.anyres] or [self.image_positions[:0]])
        rows, cols = self.packed
        return self.image_positions[self.base_count:].reshape(rows, cols + 1)[:, :cols].flatten()

    @property
    def token_grid(self) -> Tuple[int, int]:
        """The grid the maps lie on: the canvas's tile tokens (anyres), or the image's patch tokens."""
        if not self.anyres:
            return self.base_grid, self.base_grid
        return self.tiles[0] * self.base_grid, self.tiles[1] * self.base_grid


def content_box(source_size: Tuple[int, int], canvas: Tuple[int, int]) -> Tuple[int, int, int, int]:
    """``(y, x, height, width)`` of the picture in the canvas: the image processors' ``get_patch_output_size`` (the
    picture resized to fit, keeping its aspect ratio) and centered padding."""
    (h0, w0), (height, width) = source_size, canvas
    if width / w0 < height / h0:
        content = (min(math.ceil(h0 * width / w0), height), width)
    else:
        content = (height, min(math.ceil(w0 * height / h0), width))
    return ((height - content[0]) // 2, (width - content[1]) // 2) + content


def input_boxes(boxes, source_size: Tuple[int, int], canvas: Optional[Tuple[int, int]],
                tile_size: int) -> List[Tuple[int, int, int, int]]:
    """Boxes ``(x0, y0, x1, y1)`` on a picture of ``source_size`` ``(height, width)`` to whole pixels of the LLaVA
    input made of it, rounded outwards: an anyres ``canvas`` holds the resized picture in its content box (exact);
    without one (LLaVA 1.5) the processor resizes the shorter side to ``tile_size`` and crops the center (to within a
    pixel of its rounding), boxes clipped to the crop."""
    h0, w0 = source_size
    if canvas is not None:
        y, x, height, width = content_box((h0, w0), canvas)
        limit_x, limit_y = x + width, y + height
    else:
        scale, side = tile_size / min(h0, w0), tile_size
        height, width = round(h0 * scale), round(w0 * scale)
        y, x, limit_x, limit_y = -round((height - side) / 2), -round((width - side) / 2), side, side
    sx, sy = width / w0, height / h0
    return [(max(math.floor(x + x0 * sx), max(x, 0)), max(math.floor(y + y0 * sy), max(y, 0)),
             min(math.ceil(x + x1 * sx), limit_x), min(math.ceil(y + y1 * sy), limit_y))
            for x0, y0, x1, y1 in boxes]


def feature_blocks(feature_layer, n_blocks: int) -> List[int]:
    """The vision blocks whose outputs are feature layers: hidden state ``k`` (``k`` may be negative; an int or a
    list) is the output of block ``k - 1``; hidden state 0, the embeddings, is none."""
    layers = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
    return sorted({k % (n_blocks + 1) - 1 for k in layers} - {-1})


def set_anyres_geometry(layout: LlavaLayout, config, modeling) -> None:
    """Tiles, unpadded region and packed grid as the model computes them (``modeling``, the family's modeling
    module: its own ``get_anyres_image_grid_shape`` and ``unpad_image``; OneVision's downsampling), and where the
    processor pastes the picture in the canvas."""
    g, s = layout.base_grid, int(config.vision_config.image_size)
    (h0, w0) = layout.source_size
    rows, cols = modeling.get_anyres_image_grid_shape((h0, w0), config.image_grid_pinpoints, s)
    index = torch.arange(rows * g * cols * g).reshape(1, rows * g, cols * g)
    kept = modeling.unpad_image(index, (h0, w0))[0]
    top, left = int(kept[0, 0]) // (cols * g), int(kept[0, 0]) % (cols * g)
    unpadded = (top, left, kept.shape[0], kept.shape[1])
    packed = unpadded[2:]
    ratio_spec = getattr(config, "vision_aspect_ratio", None)
    if config.model_type == "llava_onevision" and ratio_spec:
        max_tiles = int(ratio_spec.strip("anyres_max_"))
        ratio = math.sqrt(packed[0] * packed[1] / (max_tiles * g ** 2))
        if ratio > 1.1:
            packed = (int(packed[0] // ratio), int(packed[1] // ratio))
    layout.tiles, layout.unpadded, layout.packed = (int(rows), int(cols)), unpadded, packed
    layout.content_box = content_box((h0, w0), layout.canvas)


def pictures_layout(pictures: Sequence[LlavaLayout], boxes: ImageBoxes, text_inputs: Dict[str, torch.Tensor],
                    positions: torch.Tensor, answer_ids: Optional[torch.Tensor], newline: bool) -> LlavaLayout:
    """The layout of several pictures in one prompt: each picture's geometry (``pictures``, layouts without text)
    given its tokens' positions, in turn, each followed by one newline token where ``newline`` (OneVision's untiled
    pictures)."""
    placed, start = [], 0
    for picture in pictures:
        placed.append(replace(picture, image_positions=positions[start:start + picture.expected_tokens]))
        start += picture.expected_tokens + int(newline)
    if start != len(positions):
        raise RuntimeError(f"The processor placed {len(positions)} image tokens for {len(pictures)} pictures where the "
                           f"wrapper expects {start}: this transformers version packs several images differently.")
    first = pictures[0]
    return LlavaLayout(text_inputs, positions, first.base_grid, first.base_prefix, boxes.canvas_size,
                       boxes.canvas_size, answer_ids=answer_ids, boxes=boxes, pictures=tuple(placed))


def decoder_grids(hidden: torch.Tensor, layout: LlavaLayout):
    """The base image's ``(B, C, g, g)`` and the packed tiles' ``(B, C, rows, cols)`` (``None`` for LLaVA 1.5)
    grids of a decoder layer's hidden state ``(B, seq, C)``."""
    b, g = hidden.shape[0], layout.base_grid
    tokens = hidden[:, layout.image_positions.to(hidden.device)]
    base = tokens[:, layout.base_prefix:layout.base_count].reshape(b, g, g, -1).permute(0, 3, 1, 2)
    if not layout.anyres:
        return base, None
    rows, cols = layout.packed
    tiles = tokens[:, layout.base_count:].reshape(b, rows, cols + 1, -1)[:, :, :cols]
    return base, tiles.permute(0, 3, 1, 2)


def vision_grids(hidden: torch.Tensor, layout: LlavaLayout):
    """The base image's and the unpadded tiles' grids of a vision block's or the projector's output
    ``(B x images, [class token +] patches, C)``."""
    g, channels = layout.base_grid, hidden.shape[-1]
    patches = hidden[:, hidden.shape[1] - g * g:]  # the class token, where there is one, comes first
    if not layout.anyres:
        return patches.reshape(-1, g, g, channels).permute(0, 3, 1, 2), None
    (rows, cols), (top, left, h, w) = layout.tiles, layout.unpadded
    per_image = patches.reshape(-1, layout.image_count, g, g, channels)
    base = per_image[:, 0].permute(0, 3, 1, 2)
    tiles = per_image[:, 1:].reshape(-1, rows, cols, g, g, channels).permute(0, 5, 1, 3, 2, 4)
    tiles = tiles.reshape(-1, channels, rows * g, cols * g)[:, :, top:top + h, left:left + w]
    return base, tiles


def unmix(grid: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """A grid ``(B, C, h', w')`` that the model made from one of ``size`` ``(h, w)`` by bilinear downsampling
    (OneVision's ``anyres_max``: ``F.interpolate(..., mode="bilinear")``, no antialiasing) spread back over that
    grid: cell ``k`` gets ``sum_t W[t, k] grid[t]``, the interpolation's transpose, so each token's relevance goes
    to the cells it was mixed from, by the weights it was mixed with (cells it skipped get none). Separable: the
    bilinear weights are the product of the 1-D linear weights along each axis."""
    weights = [F.interpolate(torch.eye(n, dtype=grid.dtype, device=grid.device)[None], size=m, mode="linear",
                             align_corners=False)[0] for n, m in zip(size, grid.shape[2:])]  # (n, m): W transposed
    return torch.einsum("ht,bcts,ws->bchw", weights[0], grid, weights[1])


def on_canvas(grid: torch.Tensor, layout: LlavaLayout, mixed: bool = False) -> torch.Tensor:
    """A grid over the picture put in its place on the canvas's token grid, zero elsewhere: brought to the unpadded
    region's size where needed, by :func:`unmix` when the model ``mixed`` it down from there (OneVision's tiles),
    else resized (bilinear: the base image, a coarser picture of the same region)."""
    top, left, h, w = layout.unpadded
    grid_h, grid_w = layout.token_grid
    if tuple(grid.shape[2:]) != (h, w):
        grid = unmix(grid, (h, w)) if mixed else F.interpolate(grid, size=(h, w), mode="bilinear",
                                                               align_corners=False)
    return F.pad(grid, (left, grid_w - left - w, top, grid_h - top - h))


def place_pictures(hidden: torch.Tensor, layout: LlavaLayout, view: str, vision: bool, cell: int) -> torch.Tensor:
    """Several pictures' views (:func:`place_views`), each on its box of the input's grid of ``cell`` pixels: from a
    decoder layer's ``(B, seq, C)`` at each picture's positions, or (``vision``) from the encoder's rows
    ``(B x images, [class token +] patches, C)``, each picture's base image and tiles in turn."""
    if vision:
        parts = hidden.reshape(-1, layout.image_count, *hidden.shape[1:])
        parts = parts.split([p.image_count for p in layout.pictures], dim=1)
        grids = [vision_grids(part.flatten(0, 1), p) for part, p in zip(parts, layout.pictures)]
    else:
        grids = [decoder_grids(hidden, p) for p in layout.pictures]
    return place_padded([place_views(base, tiles, p, view) for (base, tiles), p in zip(grids, layout.pictures)],
                        layout.boxes, cell)


def place_views(base: torch.Tensor, tiles: Optional[torch.Tensor], layout: LlavaLayout, view: str) -> torch.Tensor:
    """The map grid of ``view``: LLaVA 1.5's one grid, or the anyres view's grids on the canvas, stacked as
    channels."""
    if not layout.anyres:
        return base
    grids = {"tiles": [(tiles, True)], "base": [(base, False)], "combined": [(tiles, True), (base, False)]}[view]
    return torch.cat([on_canvas(grid, layout, mixed) for grid, mixed in grids], dim=1)
