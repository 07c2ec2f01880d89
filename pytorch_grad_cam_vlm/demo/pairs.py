"""A development task with two pieces of evidence: "Which shape do the red one and the blue one share?".

The task: four objects of the same size lie on a noisy grey canvas of 112x168 pixels (a 4x6 grid of 28-pixel image
tokens), each inside one token cell (jittered within it), with at least one free cell between them. One is red, one
blue, and two distractors take two other colours. Every object is a circle, a square or a triangle; the red and the
blue one have the same shape half of the time, the distractors' shapes are drawn independently (so a distractor
often shares the shape of the red or the blue one, and only those two decide the answer). The answer compares the
two: the shape they share ("circle", "square" or "triangle") when they have the same shape, "no" when they differ,
one word. The evidence is the red and the blue object together (:attr:`PairSample.evidence_boxes`); the distractors
have the same size and differ from them in colour only.

The first version of the question was "Are the red one and the blue one the same shape?" ("yes" or "no"): the
same recipe stayed near chance (held-out accuracy 0.575 after 2000 steps). An equality answered yes or no is a
XOR-like function of the two shapes; naming the shared shape is linear in them (a shape's answer wins when both
objects have it), and the same recipe learns it (docs/development_models.md).

The model also saw canvases where the red or the blue object is missing (one in eight, a distractor of another
colour in its place, answer "none"). Without them, hiding one object of a pair leaves the model free to keep its
answer (a missing shape is as good as a different one for "no"), and occlusion finds only one object. Its recipe
also asks the demo's question about the red or the blue object on one training batch in four (a curriculum).
Held-out samples always ask the comparison and have both objects.

The model is a tiny Qwen2.5-VL like the demo model's (``usage_examples/train_pairs_model.py`` retrains it
deterministically on the CPU; ``benchmarks/dev_models_gap.py --models pairs`` measures occlusion and the default).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from pytorch_grad_cam_vlm.demo import (CELL, COLORS, EMBEDDED_MODELS, OBJECT_SIZE, SHAPES, WORDS as DEMO_WORDS,
                                       DemoSample, _shape_mask, load_trained, place_boxes, prompt_for)

PAIRS_MODEL_DIR = EMBEDDED_MODELS["pairs"]
CANVAS_HEIGHT = 112  # pixels: a 4x6 grid of 28-pixel tokens, as the crosses task's
CANVAS_WIDTH = 168
FIRST, SECOND = "red", "blue"  # the two objects the question compares
DISTRACTOR_COLORS = tuple(c for c in COLORS if c not in (FIRST, SECOND))
N_OBJECTS = 4  # the pair and two distractors
DIFFERENT = "no"  # the answer when the two shapes differ
ANSWERS = SHAPES + (DIFFERENT,)  # the shared shape's name, or "no"
MISSING = "none"  # the answer when the red or the blue object is missing (training only)
MISSING_RATE = 1 / 8  # share of training canvases with one of the pair missing
PROMPT = f"Which shape do the {FIRST} one and the {SECOND} one share?"
WORDS = tuple(dict.fromkeys(DEMO_WORDS + ("and", "do", "share", MISSING)))
SPLITS = {"train": 0, "test": 1}

Box = Tuple[int, int, int, int]


@dataclass
class PairSample(DemoSample):
    """A :class:`~pytorch_grad_cam_vlm.demo.DemoSample` whose answer needs two objects: ``evidence_boxes`` holds
    both (``evidence_box`` is the first's, the red one's)."""

    evidence_boxes: List[Box] = field(default_factory=list)


def paint_scene(rng: np.random.Generator, height: int, width: int, shapes: Sequence[str], colors: Sequence[str],
                boxes: Sequence[Box], mask: Callable[[str, int], np.ndarray] = _shape_mask) -> np.ndarray:
    """A ``height x width`` uint8 canvas of grey noise (the demo's: a random grey level, noise of std 28) with one
    object per box, of ``shapes[i]`` (drawn by ``mask``) and ``colors[i]`` (noise of std 12), boxes of one size."""
    background = rng.integers(80, 176)
    image = background + rng.normal(0, 28, size=(height, width, 3))
    for shape, color, (x0, y0, x1, y1) in zip(shapes, colors, boxes):
        inside = mask(shape, x1 - x0)
        patch = np.array(COLORS[color], dtype=float) + rng.normal(0, 12, size=(y1 - y0, x1 - x0, 3))
        image[y0:y1, x0:x1][inside] = patch[inside]
    return np.clip(image, 0, 255).astype(np.uint8)


def make_pairs_sample(rng: np.random.Generator, complete: bool = True, asked: Optional[str] = None) -> PairSample:
    """One random sample drawn from ``rng``: boxes 0 and 1 are the red and the blue object's; the answer is their
    shared shape or ``DIFFERENT``. With ``complete=False`` (training only) one of them takes a distractor's colour,
    the answer is ``MISSING`` and the evidence boxes are empty. With ``asked`` (``FIRST`` or ``SECOND``; training
    only, a curriculum) the question is the demo's about that object, "What shape is the red object?", and the
    answer its shape."""
    same = bool(rng.random() < 0.5)
    first = int(rng.integers(len(SHAPES)))
    second = first if same else (first + int(rng.integers(1, len(SHAPES)))) % len(SHAPES)
    others = [str(c) for c in rng.permutation(DISTRACTOR_COLORS)]
    colors = [FIRST, SECOND] + others[:N_OBJECTS - 2]
    shapes = [SHAPES[first], SHAPES[second]] + [SHAPES[i] for i in rng.integers(len(SHAPES), size=N_OBJECTS - 2)]
    if not complete:
        colors[int(rng.integers(2))] = others[N_OBJECTS - 2]
    boxes = place_boxes(rng, OBJECT_SIZE, CANVAS_HEIGHT // CELL, CANVAS_WIDTH // CELL, N_OBJECTS)
    image = paint_scene(rng, CANVAS_HEIGHT, CANVAS_WIDTH, shapes, colors, boxes)
    if asked is not None:
        index = (FIRST, SECOND).index(asked)
        return PairSample(image=image, prompt=prompt_for(asked), answer=shapes[index], evidence_box=boxes[index],
                          distractor_boxes=boxes[2:], evidence_boxes=[boxes[index]])
    if not complete:
        return PairSample(image=image, prompt=PROMPT, answer=MISSING, evidence_box=(0, 0, 0, 0),
                          distractor_boxes=boxes)
    return PairSample(image=image, prompt=PROMPT, answer=shapes[0] if same else DIFFERENT, evidence_box=boxes[0],
                      distractor_boxes=boxes[2:], evidence_boxes=boxes[:2])


def held_out_stream(draw: Callable[[np.random.Generator], DemoSample], n: int, seed: int = 0,
                    split: str = "test") -> list:
    """``n`` samples of ``draw`` (a task's sample maker). Each ``(split, seed)`` pair is its own random stream, so
    the ``"test"`` split never repeats the ``"train"`` split a model was trained on."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}: use one of {sorted(SPLITS)}.")
    rng = np.random.default_rng([SPLITS[split], seed])
    return [draw(rng) for _ in range(n)]


def make_pairs_samples(n: int, seed: int = 0, split: str = "test") -> List[PairSample]:
    """``n`` samples of the pairs task (:func:`held_out_stream`), every one with both objects."""
    return held_out_stream(make_pairs_sample, n, seed, split)


def load_pairs_model(dtype: torch.dtype = torch.float32, path: str = PAIRS_MODEL_DIR):
    """The shipped pairs model and its processor (``from_pretrained``), the model in eval mode."""
    return load_trained(path, "Qwen2_5_VLForConditionalGeneration", "train_pairs_model.py", dtype)
