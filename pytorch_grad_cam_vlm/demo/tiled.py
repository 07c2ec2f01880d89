"""Development tasks and models of two tiling families: a LLaVA-OneVision model on a letterboxed canvas of 2x3 tiles,
and an InternVL model on a portrait canvas of 3x2 tiles with its thumbnail.

Both tasks ask the demo's question on smaller pictures, sized for the tiny towers of
:mod:`pytorch_grad_cam_vlm.models.tiny` (32-pixel tiles, one image token per 8x8 pixels of a tile): objects of
12 pixels, each inside its own 16-pixel cell (jittered within it), at least one free cell between them.

- **onevision** ("What shape is the red object?", the demo's question): a 48x96 picture (a 3x6 grid of cells) with a
  red object and two distractors of other colours, shapes drawn independently. The OneVision processor picks the
  64x96 pinpoint for it (2x3 tiles of 32 px, no downsampling: 6 tiles are within ``anyres_max_9``), pastes the
  picture at its own size between letterbox bars of 8 px above and below, and adds the base image (the whole picture
  squeezed to 32x32). As for internvl, one training canvas in eight has no red object (answer "none"); the model
  first shipped without them pointed occlusion at the red object on 0.935 of 200 held-out samples, this one on
  1.000 (``benchmarks/onevision_missing.md``). ``usage_examples/train_tiled_model.py --model onevision`` retrains it.
- **internvl** ("What shape is the red object?" again): a 96x64 portrait picture (a 6x4 grid of cells) with a red
  object and three distractors of three other colours (all different), shapes drawn independently (they repeat).
  The InternVL processor tiles it 3x2 (32-px tiles) and adds the thumbnail (the whole picture at 32x32). One
  training canvas in eight has no red object (a fourth distractor colour in its place, answer "none"), so that
  hiding the red object changes the answer, as the crosses model's canvases without a cross do; held-out samples
  always have one. ``usage_examples/train_tiled_model.py --model internvl`` retrains it. (The crosses question,
  "What colour is the cross?", was this task's first version: its 12-px crosses have arms of 4 px, one patch of
  the tiny encoder, and the recipe plateaued at 0.56 held-out accuracy.)

Boxes are in the picture's pixels. ``benchmarks/dev_models_gap.py`` measures occlusion and the default on both.
"""
from __future__ import annotations

from typing import List, Tuple

import numpy as np
import torch

from pytorch_grad_cam_vlm.demo import (COLORS, EMBEDDED_MODELS, SHAPES, WORDS as DEMO_WORDS,
                                       DemoSample, load_trained, place_boxes, prompt_for)
from pytorch_grad_cam_vlm.demo.pairs import held_out_stream, paint_scene

CELL = 16  # pixels of one object's cell: 2x2 image tokens of a tile
OBJECT_SIZE = 12
OCCLUSION_WINDOW = 16  # pixels of the canvas: one cell (stride 8, one token)
TOLERANCE = 8  # pointing tolerance in pixels of the picture: half a cell

ONEVISION_MODEL_DIR = EMBEDDED_MODELS["onevision"]
ONEVISION_SIZE = (48, 96)  # (height, width) of the picture; the canvas is 64x96, 2x3 tiles
ONEVISION_PROMPT = prompt_for("red")
ONEVISION_OBJECTS = 3

INTERNVL_MODEL_DIR = EMBEDDED_MODELS["internvl"]
INTERNVL_SIZE = (96, 64)  # portrait: 3x2 tiles and the thumbnail
RED_PROMPT = prompt_for("red")
MISSING = "none"  # the answer on a training canvas without a red object
INTERNVL_PROMPT = RED_PROMPT
INTERNVL_OBJECTS = 4  # the red object and three distractors
INTERNVL_WORDS = tuple(dict.fromkeys(DEMO_WORDS + (MISSING,)))
MISSING_RATE = 1 / 8  # share of internvl training canvases without a red object


def make_red_shape_sample(rng: np.random.Generator, size: Tuple[int, int], count: int,
                          complete: bool = True) -> DemoSample:
    """One sample of the demo's question on a ``size`` ``(height, width)`` picture of 16-pixel cells: a red
    object and ``count - 1`` distractors of other colours (all different), shapes drawn independently; box 0 is the
    red object's. With ``complete=False`` (training only) the red object takes another distractor colour, the answer
    is ``MISSING`` and the evidence box is empty."""
    height, width = size
    others = [str(c) for c in rng.permutation([c for c in COLORS if c != "red"])]
    colors = ["red"] + others[:count - 1]
    if not complete:
        colors[0] = others[count - 1]
    shapes = [SHAPES[i] for i in rng.integers(len(SHAPES), size=count)]
    boxes = place_boxes(rng, OBJECT_SIZE, height // CELL, width // CELL, count, CELL)
    image = paint_scene(rng, height, width, shapes, colors, boxes)
    if not complete:
        return DemoSample(image=image, prompt=RED_PROMPT, answer=MISSING, evidence_box=(0, 0, 0, 0),
                          distractor_boxes=boxes)
    return DemoSample(image=image, prompt=RED_PROMPT, answer=shapes[0], evidence_box=boxes[0],
                      distractor_boxes=boxes[1:])


def make_onevision_sample(rng: np.random.Generator) -> DemoSample:
    """One sample of the onevision task (the demo's question on a 48x96 picture); box 0 is the red object's."""
    height, width = ONEVISION_SIZE
    others = [c for c in COLORS if c != "red"]
    colors = ["red"] + [str(c) for c in rng.choice(others, size=ONEVISION_OBJECTS - 1, replace=False)]
    shapes = [SHAPES[i] for i in rng.integers(len(SHAPES), size=ONEVISION_OBJECTS)]
    boxes = place_boxes(rng, OBJECT_SIZE, height // CELL, width // CELL, ONEVISION_OBJECTS, CELL)
    image = paint_scene(rng, height, width, shapes, colors, boxes)
    return DemoSample(image=image, prompt=ONEVISION_PROMPT, answer=shapes[0], evidence_box=boxes[0],
                      distractor_boxes=boxes[1:])


def make_internvl_sample(rng: np.random.Generator, complete: bool = True) -> DemoSample:
    """One sample of the internvl task: :func:`make_red_shape_sample` on the 96x64 portrait picture with
    ``INTERNVL_OBJECTS`` objects; box 0 is the red object's (``complete=False``: training only, no red object)."""
    return make_red_shape_sample(rng, INTERNVL_SIZE, INTERNVL_OBJECTS, complete)


def make_onevision_samples(n: int, seed: int = 0, split: str = "test") -> List[DemoSample]:
    """``n`` samples of the onevision task; ``(split, seed)`` as in :func:`~pytorch_grad_cam_vlm.demo.
    make_demo_samples`."""
    return held_out_stream(make_onevision_sample, n, seed, split)


def make_internvl_samples(n: int, seed: int = 0, split: str = "test") -> List[DemoSample]:
    """``n`` samples of the internvl task, every one with a red object; ``(split, seed)`` as in
    :func:`~pytorch_grad_cam_vlm.demo.make_demo_samples`."""
    return held_out_stream(make_internvl_sample, n, seed, split)


def load_onevision_model(dtype: torch.dtype = torch.float32, path: str = ONEVISION_MODEL_DIR):
    """The shipped onevision model and its processor (``from_pretrained``), the model in eval mode."""
    return load_trained(path, "LlavaOnevisionForConditionalGeneration", "train_tiled_model.py --model onevision",
                        dtype)


def load_internvl_model(dtype: torch.dtype = torch.float32, path: str = INTERNVL_MODEL_DIR):
    """The shipped internvl model and its processor (``from_pretrained``), the model in eval mode."""
    return load_trained(path, "InternVLForConditionalGeneration", "train_tiled_model.py --model internvl", dtype)
