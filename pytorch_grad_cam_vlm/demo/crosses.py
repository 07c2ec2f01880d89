"""A second development task and model: "What colour is the cross?" on a non-square canvas, with a deeper decoder.

The task: four objects of the same size lie on a noisy grey canvas of 112x168 pixels (a 4x6 grid of 28-pixel image
tokens, which is not square), each inside one token cell (jittered within it), with at least one free cell between
them. One is a cross (a plus sign); the three distractors are circles, squares or triangles. Every object takes one
of six colours independently, so colours repeat (a distractor may share the cross's colour) and no answer follows by
elimination. The question is "What colour is the cross?" and the answer the cross's colour, one word. The cross is
the evidence; the distractors have the same size and the same colours, and differ from it in shape only.

The model also saw canvases without a cross in training (one in eight, four distractors, answer "none"). Without
them it learns one colour as its default answer, given when no other colour is seen on a cross, and hiding a cross
of that colour changes nothing: occlusion would not find it. Held-out samples always have a cross.

The model is a tiny Qwen2.5-VL like the embedded demo model's, with an 8-layer decoder (see
``usage_examples/train_crosses_model.py``, which retrains it deterministically on the CPU, and
``benchmarks/measure_crosses_occlusion.py``, which checks that occlusion points at the cross).
"""
from __future__ import annotations

import os
from typing import List, Tuple

import numpy as np
import torch

from pytorch_grad_cam_vlm.demo import (CELL, COLORS, EMBEDDED_MODELS, OBJECT_SIZE, SHAPES, WORDS as DEMO_WORDS,
                                       DemoSample, _shape_mask, place_boxes)

CROSSES_MODEL_DIR = EMBEDDED_MODELS["crosses"]
CANVAS_HEIGHT = 112  # pixels: 8x12 patches of 14 px, 4x6 image tokens of 28 px, 2x3 attention windows of 56 px
CANVAS_WIDTH = 168
N_OBJECTS = 4  # the cross and three distractors
ASKED_SHAPE = "cross"
DISTRACTOR_SHAPES = SHAPES  # circle, square, triangle
ANSWERS = tuple(COLORS)  # the cross's colour: red, green, blue, yellow, white or black
NO_CROSS = "none"  # the answer on a canvas without a cross (training only)
NO_CROSS_RATE = 1 / 8  # share of training canvases without a cross
PROMPT = f"What colour is the {ASKED_SHAPE}?"
WORDS = tuple(dict.fromkeys(DEMO_WORDS + (ASKED_SHAPE, NO_CROSS)))
SPLITS = {"train": 0, "test": 1}

Box = Tuple[int, int, int, int]


def shape_mask(shape: str, size: int) -> np.ndarray:
    """The demo's shapes, plus ``"cross"``: a plus sign whose arms are a third of ``size`` wide."""
    if shape != "cross":
        return _shape_mask(shape, size)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    half_arm = size / 6
    return (np.abs(yy - size / 2) <= half_arm) | (np.abs(xx - size / 2) <= half_arm)


def make_crosses_sample(rng: np.random.Generator, cross: bool = True,
                        size: Tuple[int, int] = (CANVAS_HEIGHT, CANVAS_WIDTH), cell: int = CELL,
                        object_size: int = OBJECT_SIZE) -> DemoSample:
    """One random sample drawn from ``rng``; the first box drawn is the cross's. With ``cross=False`` (training
    only) that object is one more distractor, the answer is ``NO_CROSS`` and the evidence box is empty. ``size``
    ``(height, width)``, ``cell`` and ``object_size`` (pixels) change the geometry (``demo/tiled.py``'s InternVL
    task)."""
    height, width = size
    background = rng.integers(80, 176)
    image = background + rng.normal(0, 28, size=(height, width, 3))
    colors = [ANSWERS[i] for i in rng.integers(len(ANSWERS), size=N_OBJECTS)]
    shapes = [DISTRACTOR_SHAPES[i] for i in rng.integers(len(DISTRACTOR_SHAPES), size=N_OBJECTS)]
    if cross:
        shapes[0] = ASKED_SHAPE
    boxes = place_boxes(rng, object_size, height // cell, width // cell, N_OBJECTS, cell)
    for shape, color, (x0, y0, x1, y1) in zip(shapes, colors, boxes):
        mask = shape_mask(shape, object_size)
        patch = np.array(COLORS[color], dtype=float) + rng.normal(0, 12, size=(object_size, object_size, 3))
        image[y0:y1, x0:x1][mask] = patch[mask]
    image = np.clip(image, 0, 255).astype(np.uint8)
    if not cross:
        return DemoSample(image=image, prompt=PROMPT, answer=NO_CROSS, evidence_box=(0, 0, 0, 0),
                          distractor_boxes=boxes)
    return DemoSample(image=image, prompt=PROMPT, answer=colors[0], evidence_box=boxes[0],
                      distractor_boxes=boxes[1:])


def make_crosses_samples(n: int, seed: int = 0, split: str = "test") -> List[DemoSample]:
    """``n`` samples of the crosses task. Each ``(split, seed)`` pair is its own random stream, so the ``"test"``
    split never repeats the ``"train"`` split the model was trained on. Every sample has a cross."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}: use one of {sorted(SPLITS)}.")
    rng = np.random.default_rng([SPLITS[split], seed])
    return [make_crosses_sample(rng) for _ in range(n)]


def load_crosses_model(dtype: torch.dtype = torch.float32, path: str = CROSSES_MODEL_DIR):
    """The shipped crosses model and its processor, loaded with ``from_pretrained`` from the package folder.
    Returns ``(model, processor)``, the model in eval mode."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"No crosses model in {path}: retrain it with "
                                "`python usage_examples/train_crosses_model.py`.")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype)
    processor = AutoProcessor.from_pretrained(path)
    return model.eval(), processor
