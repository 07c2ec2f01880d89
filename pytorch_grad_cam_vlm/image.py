"""Loading images the way users hand them over: a path, a PIL image or an ``HxW[x3|x4]`` uint8 array."""
from __future__ import annotations

import os
from typing import Union

import numpy as np
from PIL import Image, ImageOps

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]


def load_rgb(image: ImageInput) -> Image.Image:
    """Return ``image`` as an RGB PIL image; L, LA, RGBA, P, CMYK and 16-bit modes are converted, a file is turned
    as its EXIF orientation says and an animation gives its first frame (:func:`frame_count` tells), bad input is
    refused with a message that says what is accepted."""
    if isinstance(image, (str, os.PathLike)):
        if not os.path.isfile(image):
            raise FileNotFoundError(f"Image file not found: {image}")
        try:
            with Image.open(image) as opened:
                # The orientation a viewer shows (EXIF), and the first frame of an animation.
                return to_8bit(ImageOps.exif_transpose(opened)).convert("RGB")
        except OSError as error:
            raise ValueError(f"Cannot read {image} as an image: {error}") from error
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"Expected a uint8 image array with values in 0..255, got dtype {image.dtype}; "
                             "convert with (array * 255).astype(np.uint8) if it holds floats in [0, 1].")
        if image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3, 4)):
            image = Image.fromarray(image.squeeze(2) if image.ndim == 3 and image.shape[2] == 1 else image)
        else:
            raise ValueError(f"Expected an HxW, HxWx3 or HxWx4 image array, got shape {image.shape}.")
    if not isinstance(image, Image.Image):
        raise TypeError(f"Expected a path, a PIL image or a uint8 numpy array, got {type(image).__name__}.")
    image = to_8bit(image)
    return image if image.mode == "RGB" else image.convert("RGB")


def to_8bit(image: Image.Image) -> Image.Image:
    """Images of more than 8 bits per channel scaled to 8 bits: PIL's own conversion clips 16-bit and 32-bit integer
    values at 255 (a 16-bit photo turns white), so ``I;16``/``I`` images are divided by 257 (65535 -> 255) and
    float (``F``) images taken as [0, 1] when their values lie there, else as 0..255."""
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image, dtype=np.float64) / 257.0
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if not np.isfinite(values).all():
            raise ValueError(f"The image holds {int((~np.isfinite(values)).sum())} NaN or infinite pixel values: "
                             "replace them (e.g. numpy.nan_to_num) before explaining it.")
        values = values * 255 if values.max(initial=0) <= 1 else values
    else:
        return image
    return Image.fromarray(np.clip(values, 0, 255).round().astype(np.uint8), mode="L")


def frame_count(path: str) -> int:
    """How many frames the image file holds (1 for a still image)."""
    with Image.open(path) as opened:
        return int(getattr(opened, "n_frames", 1))


MAX_UPSCALE = 8  # times per side (geometric mean) beyond which the model's input is mostly interpolation


def upscale_warning(name: str, image_size, input_size) -> str:
    """A warning when the model sees the image, of ``image_size`` ``(h, w)``, upscaled more than
    :data:`MAX_UPSCALE` times per side to its input of ``input_size`` (a 5x5 icon made 112x112); ``""`` otherwise."""
    (h, w), (height, width) = image_size, input_size
    scale = (height * width / (h * w)) ** 0.5
    if scale <= MAX_UPSCALE:
        return ""
    return (f"{name} is {w}x{h} pixels; the model sees it upscaled {scale:.0f} times to {width}x{height}, the "
            "least its processor makes: the map shows where it looked on a blown-up copy.")
