"""Benchmark data: JSONL or COCO-style rows, each checked (image readable, boxes inside it) with an error that names
its row, and the demo task written as such a file."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from pytorch_grad_cam_vlm.benchmark.masks import MaskSpec, load_mask
from pytorch_grad_cam_vlm.errors import InputError


Box = Tuple[float, float, float, float]


@dataclass
class Sample:
    """One benchmark question. Boxes are ``(x0, y0, x1, y1)`` in the pixels of the image file (``x1``, ``y1``
    exclusive); ``masks`` are evidence masks of the image's size (:mod:`~pytorch_grad_cam_vlm.benchmark.masks`
    specs, checked); ``where`` names the data row in error messages."""

    index: int
    where: str
    image: str
    prompt: Optional[str]  # None for CLIP models, which score the run's --texts
    answer: Optional[str] = None
    boxes: List[Box] = field(default_factory=list)
    distractor_boxes: List[Box] = field(default_factory=list)
    masks: List[MaskSpec] = field(default_factory=list)


def load_samples(path: str, limit: Optional[int] = None,
                 coco_prompt: str = "Is there a {category} in this image?", needs_prompt: bool = True,
                 coco_answer: Optional[str] = None) -> List[Sample]:
    """The samples of a data file, each checked (image readable, boxes inside it) with an error naming its row.

    JSONL (``.jsonl``): one object per line with ``image`` (a path, relative to the data file's folder),
    ``prompt``, and optionally ``answer``, ``boxes`` (evidence, a list of ``[x0, y0, x1, y1]``),
    ``distractor_boxes`` and ``masks`` (evidence, paths to binary PNGs of the image's size, relative to the data
    file's folder). COCO (``.json`` with ``images``, ``annotations``, ``categories``): one sample per image and
    category present, asked ``coco_prompt`` with ``{category}`` filled in (and answered ``coco_answer``, filled in
    alike, where given: the first token of the category's name, as EAGLE explains a word); that category's boxes (and
    ``segmentation`` RLEs or polygons, as masks) are the evidence, the other categories' boxes the distractors.
    ``limit`` keeps the first samples. CLIP models (``needs_prompt=False``) take no prompt: a row's ``answer`` names
    the text to explain."""
    if not os.path.isfile(path):
        raise InputError(f"Data file not found: {path}")
    with open(path) as f:
        text = f.read()
    folder = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    if path.endswith(".jsonl"):
        rows = _jsonl_rows(text, name)
    else:
        try:
            document = json.loads(text)
        except json.JSONDecodeError as error:
            raise InputError(f"{name}: not valid JSON ({error}); use JSONL (.jsonl) or a COCO-style .json.") from error
        rows = _coco_rows(document, name, coco_prompt, coco_answer)
    rows = rows[:limit] if limit else rows
    if not rows:
        raise InputError(f"{name} holds no samples.")
    return [_check_row(i, where, row, folder, needs_prompt) for i, (where, row) in enumerate(rows)]


def _jsonl_rows(text: str, name: str) -> List[Tuple[str, dict]]:
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{name} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(f"{where}: not valid JSON ({error}).") from error
        if not isinstance(row, dict):
            raise InputError(f"{where}: expected an object with image, prompt and optional answer and boxes.")
        rows.append((where, row))
    return rows


def _coco_rows(document, name: str, prompt: str, answer: Optional[str] = None) -> List[Tuple[str, dict]]:
    if not isinstance(document, dict) or not {"images", "annotations", "categories"} <= set(document):
        raise InputError(f"{name}: a .json data file must be COCO-style, with images, annotations and categories "
                         "(or use JSONL, .jsonl).")
    for option, text in (("--coco-prompt", prompt), ("--coco-answer", answer)):
        try:
            (text or "").format(category="")
        except (KeyError, IndexError, ValueError) as error:
            raise InputError(f"{option} {text!r}: the one placeholder it takes is {{category}} ({error!r}).") from error
    try:
        categories = {c["id"]: c["name"] for c in document["categories"]}
        boxes: Dict[object, Dict[object, List[Box]]] = {}
        masks: Dict[Tuple[object, object], list] = {}
        for k, annotation in enumerate(document["annotations"]):
            x, y, w, h = annotation["bbox"]
            boxes.setdefault(annotation["image_id"], {}).setdefault(annotation["category_id"], []).append(
                (x, y, x + w, y + h))
            if annotation.get("segmentation"):
                masks.setdefault((annotation["image_id"], annotation["category_id"]), []).append(
                    annotation["segmentation"])
            if annotation["category_id"] not in categories:
                raise InputError(f"{name} annotations[{k}]: unknown category_id {annotation['category_id']}.")
        rows = []
        for k, image in enumerate(document["images"]):
            by_category = boxes.get(image["id"], {})
            for category in sorted(by_category, key=str):
                rows.append((f"{name} images[{k}] (id {image['id']}, category {categories[category]!r})",
                             dict(image=image["file_name"], prompt=prompt.format(category=categories[category]),
                                  **({"answer": answer.format(category=categories[category])} if answer else {}),
                                  boxes=by_category[category],
                                  distractor_boxes=[b for c, bs in by_category.items() if c != category for b in bs],
                                  **({"masks": masks[image["id"], category]} if (image["id"], category) in masks
                                     else {}))))
    except (KeyError, TypeError, ValueError) as error:
        raise InputError(f"{name}: not a COCO-style file ({type(error).__name__}: {error}); images need id and "
                         "file_name, annotations image_id, category_id and bbox [x, y, width, height].") from error
    return rows


def _check_row(index: int, where: str, row: dict, folder: str, needs_prompt: bool = True) -> Sample:
    from pytorch_grad_cam_vlm.image import load_rgb

    for key in ("image", "prompt") if needs_prompt else ("image",):
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise InputError(f"{where}: missing {key!r} (a non-empty string).")
    unknown = sorted(set(row) - {"image", "prompt", "answer", "boxes", "distractor_boxes", "masks", "id"})
    if unknown:
        raise InputError(f"{where}: unknown keys {unknown}; use image, prompt, answer, boxes, distractor_boxes, "
                         "masks.")
    answer = row.get("answer")
    if answer is not None and (not isinstance(answer, str) or not answer.strip()):
        raise InputError(f"{where}: 'answer' must be a non-empty string, got {answer!r}.")
    image = os.path.join(folder, os.path.expanduser(row["image"]))
    try:
        width, height = load_rgb(image).size
    except (FileNotFoundError, ValueError) as error:
        raise InputError(f"{where}: {error}") from error
    boxes = {key: [_check_box(box, width, height, f"{where}: {key}") for box in _box_list(row, key, where)]
             for key in ("boxes", "distractor_boxes")}
    masks = row.get("masks", [])
    if not isinstance(masks, list):
        raise InputError(f"{where}: 'masks' must be a list of mask PNG paths, got {masks!r}.")
    masks = [os.path.join(folder, os.path.expanduser(m)) if isinstance(m, str) else m for m in masks]
    for k, mask in enumerate(masks):
        load_mask(mask, height, width, f"{where}: masks[{k}]")
    prompt = row.get("prompt") if needs_prompt else None
    return Sample(index, where, image, prompt, answer, boxes["boxes"], boxes["distractor_boxes"], masks)


def _box_list(row: dict, key: str, where: str) -> list:
    boxes = row.get(key, [])
    if not isinstance(boxes, list):
        raise InputError(f"{where}: {key!r} must be a list of [x0, y0, x1, y1] boxes, got {boxes!r}.")
    return boxes


def _check_box(box, width: int, height: int, where: str) -> Box:
    if (not isinstance(box, (list, tuple)) or len(box) != 4
            or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)):
        raise InputError(f"{where}: a box must be 4 numbers [x0, y0, x1, y1] in pixels, got {box!r}.")
    x0, y0, x1, y1 = box
    if not (x0 < x1 and y0 < y1):
        raise InputError(f"{where}: box {list(box)} is empty or reversed; boxes are [x0, y0, x1, y1] with x0 < x1 "
                         "and y0 < y1.")
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise InputError(f"{where}: box {list(box)} lies outside the {width}x{height} image (width x height).")
    return (float(x0), float(y0), float(x1), float(y1))


def write_demo_dataset(out_dir: str, n: int, seed: int = 0, split: str = "test") -> str:
    """Write ``n`` demo samples (:func:`pytorch_grad_cam_vlm.demo.make_demo_samples`) as PNG files and a
    ``data.jsonl`` with prompt, answer, evidence box and distractor boxes; returns the JSONL path."""
    from PIL import Image

    from pytorch_grad_cam_vlm.demo import make_demo_samples

    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    path = os.path.join(out_dir, "data.jsonl")
    with open(path, "w") as f:
        for i, sample in enumerate(make_demo_samples(n, seed=seed, split=split)):
            image = os.path.join("images", f"{split}_{seed}_{i:05d}.png")
            Image.fromarray(sample.image).save(os.path.join(out_dir, image))
            f.write(json.dumps(dict(image=image, prompt=sample.prompt, answer=sample.answer,
                                    boxes=[list(sample.evidence_box)],
                                    distractor_boxes=[list(b) for b in sample.distractor_boxes])) + "\n")
    return path


def pixel_boxes(boxes: Sequence[Box], scale_x: float, scale_y: float) -> List[Tuple[int, int, int, int]]:
    """Boxes in the image file's pixels to whole pixels of the model's (resized) image, rounded outwards."""
    return [(int(math.floor(x0 * scale_x)), int(math.floor(y0 * scale_y)), int(math.ceil(x1 * scale_x)),
             int(math.ceil(y1 * scale_y))) for x0, y0, x1, y1 in boxes]
