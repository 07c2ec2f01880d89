"""Where a model's input lies on the user's image, and maps carried from one to the other.

A wrapper's ``preprocess`` turns the user's image (``H0 x W0``) into the model's input (``H x W``, the tensor that
grad-cam's maps cover): a plain resize (Qwen's ``smart_resize``, InternVL's and Idefics3's tile canvases), a resize
into a letterboxed canvas (LLaVA-NeXT, LLaVA-OneVision), a resize and a center crop (CLIP, LLaVA 1.5, ImageNet
classifiers), or crops resized side by side (Gemma 3's pan-and-scan). An :class:`ImageFrame` holds that geometry as
*pieces*: each an axis-aligned rectangle of the input that shows an axis-aligned rectangle of the image, stretched
to fit. ``frame.to_image(maps)`` carries maps from the input onto the image: each image pixel takes the (bilinear)
value at the input point its centre was resized to; image pixels that no piece covers (what a center crop cut off)
are NaN, since the model never saw them. Input pixels outside every piece (a letterbox) are dropped.

Each wrapper says how its ``preprocess`` lays the image out with ``wrapper.image_frame(image_size, input_size)``
(:meth:`~pytorch_grad_cam_vlm.models.base.ModelWrapper.image_frame`); the frame logic of a family lives there, beside
its preprocessing, and nowhere else.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch

from pytorch_grad_cam_vlm.image import load_rgb

Size = Tuple[int, int]  # (height, width) in pixels
Box = Tuple[float, float, float, float]  # (y, x, height, width) in pixels; pixel k spans [k, k + 1)


@dataclass(frozen=True)
class Piece:
    """``input_box`` of the model's input shows ``image_box`` of the user's image, each stretched onto the other."""

    input_box: Box
    image_box: Box


@dataclass(frozen=True)
class ImageFrame:
    """How an input of ``input_size`` was made from an image of ``image_size`` (both ``(height, width)``): the
    :class:`Piece` rectangles of the input that show rectangles of the image. Build one with :meth:`resized`,
    :meth:`letterboxed` or :meth:`cropped`, or from pieces (Gemma 3's pan-and-scan crops)."""

    image_size: Size
    input_size: Size
    pieces: Tuple[Piece, ...]

    @classmethod
    def resized(cls, image_size: Size, input_size: Size) -> "ImageFrame":
        """The whole image stretched onto the whole input (each axis scaled on its own)."""
        return cls(_size(image_size), _size(input_size),
                   (Piece((0, 0) + _size(input_size), (0, 0) + _size(image_size)),))

    @classmethod
    def letterboxed(cls, image_size: Size, input_size: Size, content_box: Box) -> "ImageFrame":
        """The whole image resized into ``content_box`` ``(y, x, height, width)`` of the input, the rest padding."""
        return cls(_size(image_size), _size(input_size), (Piece(tuple(content_box), (0, 0) + _size(image_size)),))

    @classmethod
    def cropped(cls, image_size: Size, resized_size: Size, crop_box: Box) -> "ImageFrame":
        """The image resized to ``resized_size``, then the input cut from it at ``crop_box`` ``(top, left, height,
        width)`` in the resized image's pixels (a center crop). Parts of the crop beyond the resized image (a crop
        larger than the image, padded) are padding; parts of the image beyond the crop are not seen (NaN)."""
        (h0, w0), (rh, rw) = _size(image_size), _size(resized_size)
        top, left, height, width = crop_box
        y0, y1 = max(top, 0), min(top + height, rh)
        x0, x1 = max(left, 0), min(left + width, rw)
        sy, sx = rh / h0, rw / w0
        return cls((h0, w0), (int(height), int(width)),
                   (Piece((y0 - top, x0 - left, y1 - y0, x1 - x0), (y0 / sy, x0 / sx, (y1 - y0) / sy, (x1 - x0) / sx)),))

    # ----------------------------------------------------------------------------------------- maps
    def to_image(self, maps: np.ndarray) -> np.ndarray:
        """Maps ``(..., H, W)`` on the input to ``(..., H0, W0)`` float32 on the image: bilinear within each piece
        (never reading across a piece's edge, so a letterbox's zeros do not bleed in), NaN where the model saw no
        part of the image."""
        maps = np.asarray(maps, dtype=np.float32)
        if maps.shape[-2:] != self.input_size:
            raise ValueError(f"Expected maps on the model's {self.input_size[0]}x{self.input_size[1]} input, got "
                             f"shape {maps.shape}: carry maps of the input this frame was made for.")
        if self.identity:
            return maps.copy()
        flat = maps.reshape(-1, *self.input_size)
        total = np.zeros((len(flat),) + self.image_size, np.float32)
        count = np.zeros(self.image_size, np.float32)
        for piece in self.pieces:
            rows, v = _sample_points(piece.image_box[0], piece.image_box[2], piece.input_box[0], piece.input_box[2],
                                     self.image_size[0])
            cols, u = _sample_points(piece.image_box[1], piece.image_box[3], piece.input_box[1], piece.input_box[3],
                                     self.image_size[1])
            if not (len(rows) and len(cols)):
                continue
            map_x, map_y = np.broadcast_to(u[None, :], (len(rows), len(cols))), np.broadcast_to(v[:, None],
                                                                                                 (len(rows), len(cols)))
            map_x, map_y = np.ascontiguousarray(map_x), np.ascontiguousarray(map_y)
            for k, m in enumerate(flat):
                total[k, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] += cv2.remap(
                    np.ascontiguousarray(m), map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
            count[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] += 1
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.where(count > 0, total / np.maximum(count, 1), np.nan).astype(np.float32)
        return out.reshape(maps.shape[:-2] + self.image_size)

    @property
    def seen(self) -> np.ndarray:
        """``(H0, W0)`` bool: the image pixels the model saw (those :meth:`to_image` does not make NaN)."""
        return ~np.isnan(self.to_image(np.zeros(self.input_size, np.float32)))

    @property
    def identity(self) -> bool:
        """Whether the input is the image itself (maps need no carrying)."""
        return self == ImageFrame.resized(self.input_size, self.input_size)


def center_crop_frame(image_size: Size, shortest_edge: int, crop_size: Size, rounding=math.floor) -> ImageFrame:
    """The frame of a resize of the image's shorter side to ``shortest_edge`` (the longer one to ``int(shortest_edge *
    long / short)``, as transformers' and torchvision's resizes compute it) and a center crop of ``crop_size``,
    its offsets ``rounding((resized - crop) / 2)``: ``math.floor`` in transformers' image processors, ``round`` in
    torchvision's ``CenterCrop``."""
    (h0, w0), (ch, cw) = _size(image_size), _size(crop_size)
    long = int(shortest_edge * max(h0, w0) / min(h0, w0))
    resized = (shortest_edge, long) if h0 <= w0 else (long, shortest_edge)
    top, left = int(rounding((resized[0] - ch) / 2)), int(rounding((resized[1] - cw) / 2))
    return ImageFrame.cropped((h0, w0), resized, (top, left, ch, cw))


def processor_frame(image_processor, image_size: Size, input_size: Size) -> ImageFrame:
    """The frame of a transformers image processor that resizes the image to a fixed size or to a multiple of its
    cells (a plain resize), or its shorter side to ``size["shortest_edge"]`` and then center-crops ``crop_size``
    (CLIP, LLaVA 1.5): the crop when the input has the crop's size, else a plain resize (the caller resized
    otherwise, e.g. ``do_center_crop=False``)."""
    def get(size, key):
        return size.get(key) if isinstance(size, dict) else getattr(size, key, None)

    size, crop = getattr(image_processor, "size", None), getattr(image_processor, "crop_size", None)
    shortest = get(size, "shortest_edge") if size is not None else None
    if getattr(image_processor, "do_center_crop", False) and crop is not None and shortest:
        crop_hw = (int(get(crop, "height")), int(get(crop, "width")))
        if crop_hw == tuple(input_size):
            return center_crop_frame(image_size, int(shortest), crop_hw)
    return ImageFrame.resized(image_size, input_size)


def prepare_images(wrapper: torch.nn.Module, images, image_size: Optional[Union[Size, Sequence[Size]]] = None
                   ) -> Tuple[torch.Tensor, List[ImageFrame]]:
    """The model's input ``(B, 3, H, W)`` and each input's :class:`ImageFrame` from what a user passes to
    :func:`~pytorch_grad_cam_vlm.explain`: an image (path, PIL image, uint8 array) or a list of images of one size,
    preprocessed by ``wrapper.preprocess``; or inputs ``(B, 3, H, W)`` already preprocessed, with ``image_size``
    ``(height, width)`` of the images they were made from (one for all, or one per input; ``None``: the inputs
    are the images)."""
    if isinstance(images, torch.Tensor):
        input_size = tuple(images.shape[-2:])
        if image_size is None:  # the inputs are the images
            return images, [ImageFrame.resized(input_size, input_size)] * len(images)
        if len(image_size) == 2 and all(isinstance(v, (int, np.integer)) for v in image_size):
            sizes = [tuple(image_size)] * len(images)
        else:
            sizes = [tuple(size) for size in image_size]
        if len(sizes) != len(images):
            raise ValueError(f"Got {len(sizes)} image sizes for {len(images)} inputs: give one (height, width) for "
                             "all, or one per input.")
        return images, [wrapper.image_frame(size, input_size) for size in sizes]
    if image_size is not None:
        raise ValueError("image_size goes with preprocessed inputs (a tensor); images passed as such carry their size.")
    if not isinstance(images, (list, tuple)):
        images = [images]
    pictures = [load_rgb(image) for image in images]
    sizes = {picture.size[::-1] for picture in pictures}
    if len(sizes) > 1:
        raise ValueError(f"The images have different sizes ({', '.join(f'{h}x{w}' for h, w in sorted(sizes))}): "
                         "explain them one call at a time.")
    x = torch.cat([wrapper.preprocess(picture) for picture in pictures])
    return x, [wrapper.image_frame(picture.size[::-1], tuple(x.shape[-2:])) for picture in pictures]


def _size(size: Sequence[int]) -> Size:
    height, width = (int(v) for v in size)
    if height < 1 or width < 1:
        raise ValueError(f"Expected a (height, width) of at least 1 pixel, got {tuple(size)}.")
    return height, width


def _sample_points(start: float, length: float, input_start: float, input_length: float,
                   limit: int) -> Tuple[np.ndarray, np.ndarray]:
    """Along one axis: the image pixels whose centres lie in ``[start, start + length)`` and the input coordinates
    (in pixel indices, centres at integers) their centres were resized to, clamped to the input pixels whose centres
    lie in the piece, so that sampling never reaches past its edge."""
    first, stop = max(math.ceil(start - 0.5), 0), min(math.ceil(start + length - 0.5), limit)
    pixels = np.arange(first, stop)
    coords = (pixels + 0.5 - start) * (input_length / length) + input_start - 0.5
    low, high = math.ceil(input_start - 0.5), math.ceil(input_start + input_length - 0.5) - 1
    return pixels, np.clip(coords, low, max(high, low)).astype(np.float32)
