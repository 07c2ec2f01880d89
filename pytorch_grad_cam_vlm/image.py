"""Loading images the way users hand them over: a path, a PIL image or an ``HxW[x3|x4]`` uint8 array."""
from __future__ import annotations

import os
from typing import Union

import numpy as np
from PIL import Image

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]


def load_rgb(image: ImageInput) -> Image.Image:
    """Return ``image`` as an RGB PIL image; L, LA, RGBA, P and other modes are converted, bad input is refused
    with a message that says what is accepted."""
    if isinstance(image, (str, os.PathLike)):
        if not os.path.isfile(image):
            raise FileNotFoundError(f"Image file not found: {image}")
        try:
            with Image.open(image) as opened:
                image = opened.convert("RGB")
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
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image
