"""How far Gemma 3's pan-and-scan logits lie from the processor path (issue 27 §2): the wrapper resizes the whole
image from the canvas of crops (differentiable), the processor from the picture. Tiny random models (seeds 0 and 1,
logits of standard deviation ~0.16), 10 picture sizes of 2 to 4 crops, a picture of discs and a photo-like gradient
with a red disc each, with the processor's default crops (>= 256 px) and with small crops (>= 16 px, crops of 14 to
44 px resized to the tiny encoder's 32 px). Prints the largest difference per setting (models/gemma3.py states them).

    python benchmarks/gemma3_whole_image.py      # about a minute on 2 CPU cores
"""
import tempfile
import warnings

import numpy as np
import torch
from PIL import Image, ImageDraw

from pytorch_grad_cam_vlm import Gemma3Wrapper, build_tiny_gemma3

SIZES = [(40, 130), (90, 40), (260, 600), (1100, 280), (260, 1030), (300, 700), (120, 400), (400, 90), (60, 700),
         (56, 140)]


def discs(height, width, seed=1):
    rs = np.random.RandomState(seed)
    image = Image.new("RGB", (width, height), tuple(int(v) for v in rs.randint(0, 255, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x, y, r = rs.randint(0, width), rs.randint(0, height), rs.randint(3, max(4, min(height, width) // 2))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rs.randint(0, 255, 3)))
    return np.asarray(image).copy()


def photo(height, width):
    """tests/test_photos.py's photo-like picture: a colour gradient, mild noise, a red disc."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    rgb = np.stack([90 + 60 * xx, 110 + 50 * yy, 140 - 40 * xx * yy], -1) + rng.normal(0, 6, (height, width, 3))
    disc = (yy * height - 0.35 * height) ** 2 + (xx * width - 0.6 * width) ** 2 <= (0.18 * min(height, width)) ** 2
    rgb[disc] = (220, 30, 30)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def main():
    warnings.simplefilter("ignore")
    for seed in (0, 1):
        model, processor = build_tiny_gemma3(tempfile.mkdtemp(), seed=seed)
        for options in ({}, {"pan_and_scan_min_crop_size": 16}):
            wrapper = Gemma3Wrapper(model, processor, prompt="What color is the circle?", pan_and_scan=True,
                                    pan_and_scan_options=options)
            differences = []
            for size in SIZES:
                for kind, image in (("discs", discs(*size)), ("photo", photo(*size))):
                    x = wrapper.preprocess(image)
                    if x.shape[2] == x.shape[3]:  # too square for crops: the processor's own pixels, exact
                        continue
                    inputs = processor(text=[wrapper.chat_text()], images=[image], return_tensors="pt",
                                       **wrapper.processor_kwargs)
                    with torch.no_grad():
                        difference = float((wrapper(x)[0] - model(**inputs).logits[0, -1]).abs().max())
                    differences.append((difference, size, kind))
            worst = max(differences)
            print(f"seed {seed} {options or 'processor defaults'}: {len(differences)} pictures with crops, largest "
                  f"difference {worst[0]:.2g} ({worst[2]} of {worst[1][0]}x{worst[1][1]}), median "
                  f"{np.median([d for d, _, _ in differences]):.2g}")


if __name__ == "__main__":
    main()
