"""The embedded demo: a tiny Qwen2.5-VL trained on a synthetic task whose evidence is known, shipped with its processor.

The task: three objects of the same size lie on a noisy grey canvas, each inside one 28-pixel token cell (jittered
within it), with at least one free cell between them. Each is a circle, a square or a triangle, drawn independently,
so shapes repeat. The asked object is red, the two distractors take two other colours out of five. The question is
"What shape is the red object?" and the answer its shape, one word. The red object is the evidence; the distractors
look alike (same size, often the same shape), and since shapes repeat, no answer follows by elimination.
``usage_examples/train_demo_model.py`` retrains the model deterministically on the CPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Sequence, Tuple

import numpy as np
import torch

from pytorch_grad_cam_vlm.models.tiny.qwen_vl import DEFAULT_WORDS

DEMO_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model")
# Model names every subcommand accepts: the shipped development models (demo/crosses.py describes the second,
# demo/tiled.py the LLaVA-OneVision and InternVL ones, demo/pairs.py the two-object one, make_colors_samples the one
# that reads its colour word; docs/development_models.md all of them).
EMBEDDED_MODELS = {"demo": DEMO_MODEL_DIR, **{name: os.path.join(os.path.dirname(DEMO_MODEL_DIR), f"{name}_model")
                                                for name in ("crosses", "onevision", "internvl", "pairs", "colors")}}
CANVAS = 112  # pixels: 8x8 patches of 14 px, 4x4 image tokens of 28 px, 2x2 attention windows of 56 px
SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (40, 60, 230), "yellow": (235, 220, 30),
          "white": (250, 250, 250), "black": (10, 10, 10)}
WORDS = tuple(dict.fromkeys(DEFAULT_WORDS + list(SHAPES) + list(COLORS)))
N_OBJECTS = 3
# Colours a question may name; the distractors take the others. One colour makes the search one-hop (find the red
# object, read its shape), which a model this small learns within the CPU budget of the recipe.
ASKED_COLORS = ("red",)
CELL = 28  # pixels of one image token
OBJECT_SIZE = 24  # side of every object's bounding box in pixels: the objects differ in colour and shape only
MIN_GAP = 28  # pixels between boxes (at least one free cell), so that boxes widened by half a cell never overlap
SPLITS = {"train": 0, "test": 1}

Box = Tuple[int, int, int, int]


@dataclass
class DemoSample:
    """One demo question: ``image`` (uint8 ``H x W x 3``), ``prompt``, one-word ``answer``, the ``evidence_box`` of
    the asked object and the ``distractor_boxes`` of the other objects, as ``(x0, y0, x1, y1)`` pixel boxes with
    ``x1``, ``y1`` exclusive."""

    image: np.ndarray
    prompt: str
    answer: str
    evidence_box: Box
    distractor_boxes: List[Box] = field(default_factory=list)


def prompt_for(color: str) -> str:
    """The question the demo model was trained on for the object of ``color``."""
    return f"What shape is the {color} object?"


def _shape_mask(shape: str, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    c = size / 2
    if shape == "circle":
        return (yy - c) ** 2 + (xx - c) ** 2 <= c ** 2
    if shape == "square":
        return np.ones((size, size), dtype=bool)
    # triangle pointing up: apex at the top centre, base along the bottom edge
    return np.abs(xx - c) <= c * yy / size


def place_boxes(rng: np.random.Generator, size: int, rows: int = CANVAS // CELL, cols: int = CANVAS // CELL,
                count: int = N_OBJECTS, cell: int = CELL) -> List[Box]:
    """``count`` boxes of ``size`` pixels on a grid of ``rows x cols`` cells of ``cell`` pixels (default: 28-pixel
    token cells), each inside its own cell (jittered within it); cells at least one cell apart, also diagonally, so
    that boxes are at least one cell (``MIN_GAP`` pixels for the default) apart."""
    while True:
        chosen: List[Tuple[int, int]] = []
        for index in rng.permutation(rows * cols):
            row, col = divmod(int(index), cols)
            if all(max(abs(row - r), abs(col - c)) >= 2 for r, c in chosen):
                chosen.append((row, col))
            if len(chosen) == count:
                break
        if len(chosen) == count:
            break
    boxes = []
    for row, col in chosen:
        dx, dy = (int(v) for v in rng.integers(0, cell - size + 1, size=2))
        boxes.append((col * cell + dx, row * cell + dy, col * cell + dx + size, row * cell + dy + size))
    return boxes


def make_sample(rng: np.random.Generator, asked_colors: Sequence[str] = ASKED_COLORS) -> DemoSample:
    """One random sample drawn from ``rng``, its question about an object of one of ``asked_colors`` (drawn at
    random); the distractors take other colours, asked ones included, so that a model asked about several colours
    must read the colour word."""
    background = rng.integers(80, 176)
    image = background + rng.normal(0, 28, size=(CANVAS, CANVAS, 3))
    asked_color = asked_colors[int(rng.integers(len(asked_colors)))]
    others = [c for c in COLORS if c != asked_color]
    colors = [asked_color] + [str(c) for c in rng.choice(others, size=N_OBJECTS - 1, replace=False)]
    shapes = [SHAPES[i] for i in rng.integers(len(SHAPES), size=N_OBJECTS)]
    boxes = place_boxes(rng, OBJECT_SIZE)
    for shape, color, (x0, y0, x1, y1) in zip(shapes, colors, boxes):
        mask = _shape_mask(shape, OBJECT_SIZE)
        patch = np.array(COLORS[color], dtype=float) + rng.normal(0, 12, size=(OBJECT_SIZE, OBJECT_SIZE, 3))
        image[y0:y1, x0:x1][mask] = patch[mask]
    asked = 0
    return DemoSample(image=np.clip(image, 0, 255).astype(np.uint8), prompt=prompt_for(str(colors[asked])),
                      answer=shapes[asked], evidence_box=boxes[asked],
                      distractor_boxes=[b for i, b in enumerate(boxes) if i != asked])


def without_asked_object(sample: DemoSample, rng: np.random.Generator) -> np.ndarray:
    """``sample``'s picture with the asked (red) object repainted in another colour drawn from ``rng``: the same
    three objects in the same places and shapes, none of them red (the second image of a two-image prompt in
    ``benchmarks/multi_image_demo.py``)."""
    others = [c for c in COLORS if c not in ASKED_COLORS]
    color = others[int(rng.integers(len(others)))]
    x0, y0, x1, y1 = sample.evidence_box
    mask = _shape_mask(sample.answer, OBJECT_SIZE)
    patch = np.array(COLORS[color], dtype=float) + rng.normal(0, 12, size=(OBJECT_SIZE, OBJECT_SIZE, 3))
    image = sample.image.copy()
    image[y0:y1, x0:x1][mask] = np.clip(patch[mask], 0, 255).astype(np.uint8)
    return image


def make_two_image_prompts(n: int, seed: int = 0) -> List[Tuple[List[np.ndarray], int, DemoSample]]:
    """``n`` two-image prompts of the demo task, only one image holding the red object: held-out sample ``i`` and
    held-out sample ``n + i`` :func:`without_asked_object`, the red image first for even ``i`` and second for odd
    ``i``. Each is ``(images in prompt order, index of the red image, the red image's sample)``."""
    samples = make_demo_samples(2 * n, seed=seed)
    rng = np.random.default_rng([2, seed])
    prompts = []
    for i in range(n):
        red, plain = samples[i], without_asked_object(samples[n + i], rng)
        prompts.append(([red.image, plain] if i % 2 == 0 else [plain, red.image], i % 2, red))
    return prompts


def make_demo_samples(n: int, seed: int = 0, split: str = "test",
                      asked_colors: Sequence[str] = ASKED_COLORS) -> List[DemoSample]:
    """``n`` samples of the demo task (questions about ``asked_colors``). Each ``(split, seed)`` pair is its own
    random stream, so the ``"test"`` split never repeats the ``"train"`` split the demo model was trained on."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}: use one of {sorted(SPLITS)}.")
    rng = np.random.default_rng([SPLITS[split], seed])
    return [make_sample(rng, asked_colors) for _ in range(n)]


def embedded_model_path(name: str) -> str:
    """The folder of an embedded model by its name (``"demo"``), or ``name`` itself (a folder or hub id); a name
    that is neither but close to an embedded one (``"Demo"``) is refused with a hint."""
    import difflib

    from pytorch_grad_cam_vlm.errors import InputError

    if name in EMBEDDED_MODELS:
        return EMBEDDED_MODELS[name]
    close = difflib.get_close_matches(name.lower(), EMBEDDED_MODELS, n=1, cutoff=0.7)
    if close and "/" not in name and not os.path.exists(name):
        raise InputError(f"No model {name!r}: did you mean {close[0]!r} (an embedded demo model; names are "
                         "case-sensitive)?")
    return name


# How the colors model was made (usage_examples/train_demo_model.py, each run from the last one's weights; held-out
# accuracy 0.565, 0.800, then 0.970 on 200 samples).
COLORS_RECIPE = ("train_demo_model.py --asked-colors all --lr 1e-3 --init demo --steps 1000 --out A, then --init A "
                 "--steps 3000 --out B, then --init B --steps 3000")


def make_colors_samples(n: int, seed: int = 0, split: str = "test") -> List[DemoSample]:
    """``n`` samples of the colors model's task: the demo task asked about an object of any colour of
    :data:`COLORS`, so that the answer depends on the question's colour word (:func:`make_demo_samples`)."""
    return make_demo_samples(n, seed, split, asked_colors=tuple(COLORS))


def load_colors_model(dtype: torch.dtype = torch.float32):
    """The shipped colors model (the demo model trained further on questions about every colour, with
    :data:`COLORS_RECIPE`) and its processor, the model in eval mode."""
    return load_trained(EMBEDDED_MODELS["colors"], "Qwen2_5_VLForConditionalGeneration", COLORS_RECIPE, dtype)


def load_trained(path: str, model_class: str, recipe: str, dtype: torch.dtype = torch.float32):
    """A development model (``transformers.<model_class>``) and its processor from ``path`` with
    ``from_pretrained``, the model in eval mode; a missing folder is refused with the recipe that makes it."""
    import transformers

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"No model in {path}: retrain it with `python usage_examples/{recipe}`.")
    model = getattr(transformers, model_class).from_pretrained(path, dtype=dtype)
    return model.eval(), transformers.AutoProcessor.from_pretrained(path)


def load_demo_model(dtype: torch.dtype = torch.float32, path: str = DEMO_MODEL_DIR):
    """The shipped demo model and its processor, loaded with ``from_pretrained`` from the package folder.
    Returns ``(model, processor)``, the model in eval mode."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"No demo model in {path}: retrain it with "
                                "`python usage_examples/train_demo_model.py`.")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype)
    processor = AutoProcessor.from_pretrained(path)
    return model.eval(), processor
