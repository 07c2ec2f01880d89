"""Several images in one prompt, as one input that grad-cam runs on: the images side by side on one canvas.

grad-cam needs one ``(B, 3, H, W)`` tensor: ``get_target_width_height`` reads the map size from it, the ROAD
metrics impute pixels of a ``(3, H, W)`` image, the deletion check removes pixels of it. So the images of a prompt
(each resized as the processor resizes it, whole token cells) are laid left to right, top-aligned, on one canvas;
pixels outside every image hold 0 (the mean colour) and reach nothing. The wrapper's ``forward`` cuts each image back
out of the canvas and gives the model the processor's inputs for that many images (Qwen: each patchified on its own
grid, one ``image_grid_thw`` row each; Gemma 3: one square each; InternVL and Idefics3: each one's tiles and
whole-picture image; LLaVA: each one's square, or base image and tiles);
``reshape_transform`` places each image's token (or patch) grid at its box on the canvas's grid, zeros in
between. Every grad-cam method, the deletion check and ROAD therefore run on the canvas unchanged, and a map of the
canvas holds one map per image, each in its image's frame (:func:`image_maps`); :func:`mass_shares` says how the
relevance splits between them. ``explain(wrapper, MultiImage([a, b]))`` reports that split with a deletion check per
image (:mod:`pytorch_grad_cam_vlm.metrics.image_split`).

A list of images per prompt is a :class:`MultiImage` (a tuple), so that it cannot be taken for a batch of prompts.
The families that take one: :data:`SEVERAL_IMAGES_FAMILIES`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from pytorch_grad_cam_vlm.image import ImageInput, load_rgb
from pytorch_grad_cam_vlm.models.frame import ImageFrame
from pytorch_grad_cam_vlm.models.qwen_patches import patchify, vision_window_index

SEVERAL_IMAGES_FAMILIES = ("Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5, GLM-4V, InternVL, Idefics3 / SmolVLM, LLaVA 1.5, "
                           "LLaVA-NeXT, LLaVA-OneVision and Gemma 3 (without pan-and-scan)")
# Their model types (the registry's keys), for the CLI to refuse another family before loading it.
SEVERAL_IMAGES_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe", "glm4v",
                              "glm4v_moe", "glm46v", "gemma3", "internvl", "idefics3", "smolvlm", "llava",
                              "llava_next", "llava_onevision")

Box = Tuple[int, int, int, int]  # top, left, height, width in pixels


@dataclass(frozen=True)
class ImageBoxes:
    """Where each image of a prompt lies on the canvas: ``boxes[i] = (top, left, height, width)`` in pixels."""

    boxes: Tuple[Box, ...]

    @property
    def canvas_size(self) -> Tuple[int, int]:
        return (max(t + h for t, _, h, _ in self.boxes), max(l + w for _, l, _, w in self.boxes))

    def __len__(self) -> int:
        return len(self.boxes)


def check_count(count: int) -> None:
    """Refuse fewer than two images for one prompt, saying what to pass instead."""
    if count == 0:
        raise ValueError("Several images in one prompt: got none; pass two or more images.")
    if count == 1:
        raise ValueError("Several images in one prompt: got one image; pass it alone (explain(wrapper, image), "
                         "--image) or add the others.")


class MultiImage(tuple):
    """The images (paths, PIL images or uint8 arrays) asked in one prompt, in the prompt's order: at least two.
    ``explain(wrapper, MultiImage([a, b]))`` explains them together; a plain list is a batch of prompts."""

    def __new__(cls, images: Sequence[ImageInput]) -> "MultiImage":
        images = tuple(images)
        check_count(len(images))
        return super().__new__(cls, images)


def side_by_side(sizes: Sequence[Tuple[int, int]]) -> ImageBoxes:
    """Boxes for images of ``sizes`` ``(height, width)``, left to right and top-aligned."""
    check_count(len(sizes))
    lefts = np.cumsum([0] + [w for _, w in sizes[:-1]])
    return ImageBoxes(tuple((0, int(left), int(h), int(w)) for left, (h, w) in zip(lefts, sizes)))


def canvas(images: Sequence[torch.Tensor], boxes: ImageBoxes) -> torch.Tensor:
    """The images ``(1, 3, h_i, w_i)`` on one ``(1, 3, H, W)`` canvas at their boxes, 0 elsewhere."""
    out = images[0].new_zeros((1, 3) + boxes.canvas_size)
    for image, (top, left, height, width) in zip(images, boxes.boxes):
        out[:, :, top:top + height, left:left + width] = image
    return out


def preprocess_several(wrapper: torch.nn.Module, images: Sequence[ImageInput],
                       preprocess_one: Callable[[ImageInput], torch.Tensor]) -> torch.Tensor:
    """The canvas ``(1, 3, H, W)`` of ``images`` asked in one prompt, each read once (``load_rgb``) and made by
    ``preprocess_one`` (the family's one-image preprocessing); ``wrapper.image_boxes`` set to their boxes and
    ``wrapper.source_sizes`` to the pictures' ``(h, w)`` (what tiled families lay each one out by). An image that
    cannot be read or that the processor refuses is named (``image 2 of 3: ...``) and leaves ``wrapper.image_boxes``
    as it was."""
    check_count(len(images))
    before = wrapper.image_boxes
    try:
        pictures = per_image(images, load_rgb)
        inputs = per_image(pictures, preprocess_one)
    finally:
        wrapper.image_boxes = before
    boxes = side_by_side([tuple(one.shape[2:]) for one in inputs])
    wrapper.image_boxes = boxes
    wrapper.source_sizes = tuple(picture.size[::-1] for picture in pictures)
    return canvas(inputs, boxes)


def per_image(images: Sequence[ImageInput], function: Callable) -> list:
    """``function`` of each image, an error naming the image it came from (``image 2 of 3: ...``)."""
    out = []
    for i, image in enumerate(images):
        try:
            out.append(function(image))
        except (ValueError, TypeError, OSError) as error:
            raise type(error)(f"image {i + 1} of {len(images)}: {error}") from error
    return out


def check_canvas(boxes: ImageBoxes, height: int, width: int) -> None:
    """Refuse an input that is not the canvas the images were prepared on."""
    if boxes.canvas_size != (height, width):
        raise ValueError(f"The images were prepared as a canvas of {boxes.canvas_size[0]}x{boxes.canvas_size[1]} "
                         f"pixels (several images in one prompt), got {height}x{width}: preprocess them again.")


def takes_several(wrapper: torch.nn.Module) -> None:
    """Refuse a wrapper whose class does not say ``several_images = True``: its family takes one image per prompt."""
    if not getattr(wrapper, "several_images", False):
        raise ValueError(f"{type(wrapper).__name__} takes one image per prompt; several images in one prompt work "
                         f"with {SEVERAL_IMAGES_FAMILIES}.")


def prepare_several(wrapper: torch.nn.Module, images: MultiImage) -> Tuple[torch.Tensor, List[ImageFrame]]:
    """The canvas ``(1, 3, H, W)`` of the images of one prompt and each image's
    :class:`~pytorch_grad_cam_vlm.models.frame.ImageFrame` on its box (what ``explain`` takes of a
    :class:`MultiImage`)."""
    takes_several(wrapper)
    pictures = per_image(images, load_rgb)
    x = wrapper.preprocess(pictures)
    return x, [wrapper.image_frame(picture.size[::-1], (h, w))
               for picture, (_, _, h, w) in zip(pictures, wrapper.image_boxes.boxes)]


def box_masks(boxes: ImageBoxes) -> np.ndarray:
    """``(N, H, W)`` bool: each image's pixels on the canvas."""
    masks = np.zeros((len(boxes),) + boxes.canvas_size, bool)
    for mask, (top, left, h, w) in zip(masks, boxes.boxes):
        mask[top:top + h, left:left + w] = True
    return masks


def crops(x: torch.Tensor, boxes: ImageBoxes) -> List[torch.Tensor]:
    """Each image ``(B, 3, h_i, w_i)`` cut out of canvases ``x`` ``(B, 3, H, W)``."""
    return [x[:, :, top:top + height, left:left + width] for top, left, height, width in boxes.boxes]


def encode_pictures(x: torch.Tensor, layout, encode: Callable, extras: Optional[Sequence] = None) -> torch.Tensor:
    """A tiled family's encoder images ``(B, n, 3, s, s)`` of canvases ``x``: ``encode(x, tiles, extra)`` on the
    whole canvas, or, when ``layout.boxes`` holds several pictures, on each picture cut out with its own
    ``layout.image_tiles`` and ``extras[i]`` (a thumbnail or global image, ``None`` to resize in torch), in turn."""
    if layout.boxes is None:
        return encode(x, layout.tiles, extras)
    extras = extras or [None] * len(layout.boxes)
    return torch.cat([encode(part, tiles, extra) for part, tiles, extra
                      in zip(crops(x, layout.boxes), layout.image_tiles, extras)], dim=1)


def place(grids: Sequence[torch.Tensor], boxes: ImageBoxes, cell: int) -> torch.Tensor:
    """Per-image grids ``(B, C, h_i / cell, w_i / cell)`` at their boxes on the canvas's grid of ``cell`` pixels,
    ``(B, C, H / cell, W / cell)``, zeros outside every image."""
    height, width = boxes.canvas_size
    out = grids[0].new_zeros(grids[0].shape[:2] + (height // cell, width // cell))
    for grid, (top, left, h, w) in zip(grids, boxes.boxes):
        out[:, :, top // cell:(top + h) // cell, left // cell:(left + w) // cell] = grid
    return out


def place_padded(grids: Sequence[torch.Tensor], boxes: ImageBoxes, cell: int) -> torch.Tensor:
    """:func:`place` for the tiled families' views: a grid with fewer channels than the others (under
    ``"combined"``, a picture of one tile has no whole-picture image to stack) gets zeros for the missing ones, which
    add nothing to grad-cam's channel sum."""
    channels = max(grid.shape[1] for grid in grids)
    return place([torch.nn.functional.pad(grid, (0, 0, 0, 0, 0, channels - grid.shape[1])) for grid in grids], boxes,
                 cell)


def image_maps(maps: np.ndarray, boxes: ImageBoxes) -> List[np.ndarray]:
    """One map per image, in its own frame: ``maps`` ``(B, H, W)`` of canvases cut at the boxes, ``(B, h_i, w_i)``
    each."""
    return [maps[:, top:top + h, left:left + w] for top, left, h, w in boxes.boxes]


def mass_shares(maps: np.ndarray, boxes: ImageBoxes) -> np.ndarray:
    """``(B, N)``: the share of each canvas map's mass (its sum over the images' pixels) that lies in each image;
    NaN for a map without mass."""
    sums = np.stack([m.reshape(len(m), -1).sum(-1) for m in image_maps(np.asarray(maps, dtype=np.float64), boxes)],
                    axis=1)
    total = sums.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, sums / total, np.nan)


# ----------------------------------------------------------------------------------------- Qwen's flat vision rows
def qwen_pixel_values(wrapper, x: torch.Tensor, boxes: ImageBoxes) -> torch.Tensor:
    """Qwen's ``pixel_values`` for canvases ``x`` ``(B, 3, H, W)``: each image patchified on its own grid, in the
    processor's order (sample by sample, image by image)."""
    b = x.shape[0]
    per_image = [patchify(image, wrapper.patch_size, wrapper.merge_size, wrapper.temporal_patch_size).reshape(
        b, -1, wrapper.patch_size ** 2 * 3 * wrapper.temporal_patch_size) for image in crops(x, boxes)]
    return torch.cat(per_image, dim=1).reshape(-1, per_image[0].shape[-1])


def qwen_reshape(wrapper, hidden: torch.Tensor) -> torch.Tensor:
    """:meth:`QwenVLWrapper.reshape_transform` for a canvas of several images: each image's tokens (decoder
    layers, mergers) or patches (vision blocks) on its own grid, placed at its box on the canvas's grid."""
    layout, b, m = wrapper.layout, wrapper.batch_size, wrapper.merge_size
    grids = [(int(h), int(w)) for _, h, w in layout.grid_thw.tolist()]
    tokens = [gh * gw // (m * m) for gh, gw in grids]
    if hidden.dim() == 3:
        rows = hidden[:, layout.vision_positions.to(hidden.device)].split(tokens, dim=1)
        return place([r.reshape(b, gh // m, gw // m, -1).permute(0, 3, 1, 2).float()
                      for r, (gh, gw) in zip(rows, grids)], layout.boxes, wrapper.token_cell)
    order = torch.argsort(vision_window_index(wrapper.visual, layout.grid_thw.repeat(b, 1))).to(hidden.device)
    patches = sum(gh * gw for gh, gw in grids)
    if hidden.dim() == 2 and hidden.shape[0] == b * patches:  # vision block: merge blocks in window order
        per_image = hidden.reshape(-1, m * m, hidden.shape[-1])[order].reshape(b, -1, m * m, hidden.shape[-1])
        out = []
        for chunk, (gh, gw) in zip(per_image.split(tokens, dim=1), grids):
            grid = chunk.reshape(b, gh // m, gw // m, m, m, -1).permute(0, 5, 1, 3, 2, 4)
            out.append(grid.reshape(b, -1, gh, gw).float())
        return place(out, layout.boxes, wrapper.patch_size)
    if hidden.dim() == 2 and hidden.shape[0] == b * sum(tokens):  # merger: one row per merge block
        per_image = hidden[order].reshape(b, sum(tokens), -1).split(tokens, dim=1)
        return place([r.reshape(b, gh // m, gw // m, -1).permute(0, 3, 1, 2).float()
                      for r, (gh, gw) in zip(per_image, grids)], layout.boxes, wrapper.token_cell)
    raise ValueError(f"Cannot map a hidden state of shape {tuple(hidden.shape)} to the {len(grids)} images of the "
                     "latest forward pass.")
