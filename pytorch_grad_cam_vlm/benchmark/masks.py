"""Evidence masks of benchmark rows: binary PNG files, COCO run-length encodings (compressed strings or count
lists) and COCO polygons, decoded with numpy and PIL (no pycocotools).

A mask is given as a *spec*: a path to a PNG (any non-zero pixel is inside), a COCO RLE ``{"size": [h, w],
"counts": ...}``, or COCO polygons ``[[x1, y1, x2, y2, ...], ...]`` (rasterised by PIL's polygon fill, outline
included; its edge pixels may differ from pycocotools' by one pixel).
"""
from __future__ import annotations

import os
from typing import List, Sequence, Tuple, Union

import numpy as np

from pytorch_grad_cam_vlm.errors import InputError

MaskSpec = Union[str, dict, list]


def rle_counts(text: Union[str, bytes]) -> List[int]:
    """The run lengths of pycocotools' compressed RLE string (``rleFrString``): 5-bit groups with a continuation
    bit, sign-extended, each count from the third on stored as the difference to the count two before."""
    text = text.decode() if isinstance(text, bytes) else text
    counts: List[int] = []
    position = 0
    while position < len(text):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(text):
                raise ValueError("compressed RLE string ends inside a number")
            c = ord(text[position]) - 48
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            position += 1
            shift += 5
            if not more and c & 0x10:
                value |= -1 << shift
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def rle_string(counts: Sequence[int]) -> str:
    """pycocotools' compressed RLE string of ``counts`` (``rleToString``), the inverse of :func:`rle_counts`."""
    characters = []
    for i, count in enumerate(counts):
        value = int(count) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            c = value & 0x1F
            value >>= 5
            more = not ((c & 0x10) == 0 and value == 0 or (c & 0x10) != 0 and value == -1)
            if more:
                c |= 0x20
            characters.append(chr(c + 48))
    return "".join(characters)


def encode_rle(mask: np.ndarray) -> dict:
    """The COCO RLE of a binary mask ``(h, w)``: runs in column-major order, starting with a run of zeros."""
    flat = np.asarray(mask, dtype=bool).T.ravel()
    changes = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": list(mask.shape), "counts": rle_string(counts)}


def decode_rle(rle: dict) -> np.ndarray:
    """The binary mask ``(h, w)`` of a COCO RLE (``counts`` a compressed string or a list of run lengths)."""
    height, width = (int(v) for v in rle["size"])
    counts = rle["counts"]
    counts = rle_counts(counts) if isinstance(counts, (str, bytes)) else [int(c) for c in counts]
    if any(c < 0 for c in counts) or sum(counts) != height * width:
        raise ValueError(f"its run lengths add up to {sum(counts)} pixels, not {height}x{width}")
    values = np.repeat(np.arange(len(counts)) % 2 == 1, counts)
    return values.reshape(width, height).T


def polygon_mask(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """The binary mask ``(height, width)`` of COCO polygons (flat ``[x1, y1, x2, y2, ...]`` lists, pixels)."""
    from PIL import Image, ImageDraw

    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for polygon in polygons:
        if len(polygon) < 6 or len(polygon) % 2:
            raise ValueError(f"a polygon needs at least 3 (x, y) points, got {len(polygon)} numbers")
        draw.polygon([(float(polygon[i]), float(polygon[i + 1])) for i in range(0, len(polygon), 2)], fill=1,
                     outline=1)
    return np.asarray(canvas, dtype=bool)


def load_mask(spec: MaskSpec, height: int, width: int, where: str) -> np.ndarray:
    """The binary mask ``(height, width)`` of ``spec``, checked to have the image's size and a pixel set; errors
    name ``where``."""
    from PIL import Image

    try:
        if isinstance(spec, str):
            if not os.path.isfile(spec):
                raise InputError(f"{where}: mask file not found: {spec}")
            with Image.open(spec) as image:
                mask = np.asarray(image.convert("L")) > 0
            name = os.path.basename(spec)
        elif isinstance(spec, dict) and {"size", "counts"} <= set(spec):
            mask, name = decode_rle(spec), "the RLE mask"
        elif isinstance(spec, list) and all(isinstance(p, list) for p in spec):
            mask, name = polygon_mask(spec, height, width), "the polygon mask"
        else:
            raise InputError(f"{where}: a mask must be a PNG path, a COCO RLE {{size, counts}} or COCO polygons, "
                             f"got {str(spec)[:60]!r}.")
    except (ValueError, TypeError, OSError) as error:
        raise InputError(f"{where}: unreadable mask ({error}).") from error
    if mask.shape != (height, width):
        raise InputError(f"{where}: {name} is {mask.shape[1]}x{mask.shape[0]}, the image {width}x{height} "
                         "(width x height).")
    if not mask.any():
        raise InputError(f"{where}: {name} is empty (no pixel set).")
    return mask


def pixel_mask(specs: Sequence[MaskSpec], image_size: Tuple[int, int], shape: Tuple[int, int],
               where: str) -> np.ndarray:
    """The union of the masks ``specs`` of an image of ``image_size`` (width, height), resized (nearest pixel)
    to the model's image ``shape`` (height, width)."""
    from PIL import Image

    width, height = image_size
    union = np.zeros((height, width), dtype=bool)
    for k, spec in enumerate(specs):
        union |= load_mask(spec, height, width, f"{where}: masks[{k}]")
    if union.shape != tuple(shape):
        union = np.asarray(Image.fromarray(union).resize((shape[1], shape[0]), Image.NEAREST), dtype=bool)
    return union
