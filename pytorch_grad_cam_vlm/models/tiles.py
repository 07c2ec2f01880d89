"""The canvas of tiles that the tiled families share (LLaVA's anyres, Gemma 3's pan-and-scan crops, InternVL,
Idefics3): a picture's tiles of ``s x s`` pixels put side by side in raster order, cut again for the model, and token
grids of the tiles and of one whole-picture image (a thumbnail, a global image) placed back on it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from pytorch_grad_cam_vlm.models.ablation import ViewAblationLayer
from pytorch_grad_cam_vlm.models.multi_image import ImageBoxes


def canvas_to_tiles(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Canvases ``(B, C, rows * s, cols * s)`` to their tiles ``(B, rows * cols, C, s, s)`` in raster order."""
    b, channels, height, width = x.shape
    s = height // rows
    return x.reshape(b, channels, rows, s, cols, s).permute(0, 2, 4, 1, 3, 5).reshape(b, rows * cols, channels, s, s)


def tiles_to_canvas(tiles: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Tiles ``(rows * cols, C, s, s)`` in raster order, as a processor returns them, to their canvas
    ``(1, C, rows * s, cols * s)``."""
    _, channels, s, _ = tiles.shape
    return tiles.reshape(rows, cols, channels, s, s).permute(2, 0, 3, 1, 4).reshape(1, channels, rows * s, cols * s)


def tile_grids(per_image: torch.Tensor, tiles: Tuple[int, int]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(B, images, n, n, C)`` grids of the tiles (raster order) and, last, of a whole-picture image, to the tiles'
    ``(B, C, rows * n, cols * n)`` grid of the canvas and the whole image's ``(B, C, n, n)`` (``None`` when there is
    none)."""
    b, images, n, _, channels = per_image.shape
    rows, cols = tiles
    canvas = per_image[:, :rows * cols].reshape(b, rows, cols, n, n, channels).permute(0, 5, 1, 3, 2, 4)
    canvas = canvas.reshape(b, channels, rows * n, cols * n)
    whole = per_image[:, -1].permute(0, 3, 1, 2) if images > rows * cols else None
    return canvas, whole


@dataclass
class TiledLayout:
    """Where the pictures sit in one prompt and how their tokens cover the canvas, for one canvas size: each picture
    a grid of tiles and, as the family says (:meth:`whole_images`), one whole-picture image after them."""

    text_inputs: Dict[str, torch.Tensor]  # input_ids, attention_mask for batch 1, without pixel values
    image_positions: torch.Tensor  # sequence positions of every image token: the tiles' in raster order, the whole's
    tiles: Tuple[int, int]  # rows and columns of tiles (of the first picture when there are several)
    grid: int  # tokens per side of one image
    answer_ids: Optional[torch.Tensor] = None  # the teacher-forced answer's token ids, the last tokens of input_ids
    boxes: Optional[ImageBoxes] = None  # several pictures in one prompt: each one's canvas on the input
    image_tiles: Tuple[Tuple[int, int], ...] = ()  # several pictures: each one's rows and columns of tiles

    @staticmethod
    def whole_images(tiles: Tuple[int, int]) -> int:
        """How many whole-picture images the encoder sees beside a picture's ``tiles``: one."""
        return 1

    @property
    def image_counts(self) -> Tuple[int, ...]:
        """Images the vision encoder sees per picture of the prompt: its tiles and its whole-picture images."""
        return tuple(rows * cols + self.whole_images((rows, cols)) for rows, cols in self.image_tiles or (self.tiles,))

    @property
    def image_count(self) -> int:
        """Images the vision encoder sees per sample: every picture's."""
        return sum(self.image_counts)

    @property
    def sequence_length(self) -> int:
        return int(self.text_inputs["input_ids"].shape[1])


class TileViews:
    """The ``view`` option of a tiled family's wrapper: which image tokens draw its maps, one of the class's
    ``views`` (the tiles, the whole-picture image, or ``"combined"``); with one image, the maps are the same under
    each."""

    views: Tuple[str, ...]
    view_positions: Tuple[torch.Tensor, torch.Tensor]  # (a property) the tiles' token positions, the whole image's
    ablation_layer_type = ViewAblationLayer  # ablates the view's tokens (ablation_target)
    several_images = True  # preprocess takes a list of pictures for one prompt (models.multi_image)

    @property
    def view(self) -> str:
        return self._view

    @view.setter
    def view(self, value: str) -> None:
        if value not in self.views:
            raise ValueError(f"view must be one of {', '.join(self.views)}, got {value!r}.")
        self._view = value

    def place_views(self, tiles: Optional[torch.Tensor], whole: Optional[torch.Tensor]) -> torch.Tensor:
        """The map grid of :attr:`view` on the canvas from the tiles' grid ``(B, C, h, w)`` and the whole-picture
        image's ``(B, C, n, n)``: the first of ``views`` the tiles' grid, the second the whole image's resized
        (bilinear) over it, ``"combined"`` both stacked as channels (grad-cam's channel sum adds them before its
        ReLU); with one of them missing (one image), the other under every view."""
        if tiles is None or whole is None:
            return whole if tiles is None else tiles
        if self.view == self.views[0]:
            return tiles
        resized = F.interpolate(whole, size=tuple(tiles.shape[2:]), mode="bilinear", align_corners=False)
        return torch.cat([tiles, resized], dim=1) if self.view == "combined" else resized

    def ablation_target(self, index: int) -> Tuple[torch.Tensor, int]:
        """The sequence positions and channel AblationCAM's channel ``index`` (of ``reshape_transform``'s output)
        stands for: the tiles' tokens under the first of ``views`` and in ``"combined"``'s first ``C`` channels, the
        whole-picture image's in the rest (``view_positions``: a canvas without tiles gives its one image's)."""
        tiles, whole = self.view_positions
        channels = self.model.config.text_config.hidden_size
        if self.view == self.views[0] or (self.view == "combined" and index < channels):
            return tiles, index
        return whole, index % channels

    def image_row_to_grid(self, row: torch.Tensor) -> torch.Tensor:
        """A value per sequence position ``(B, seq)`` (e.g. the query's attention) to ``(B, 1, h, w)`` on the map's
        grid: the view's tokens placed as for hidden states; ``"combined"`` adds the tiles' and the whole image's."""
        return self.reshape_transform(row[..., None]).sum(1, keepdim=True)
