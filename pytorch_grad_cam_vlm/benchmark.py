"""Faithfulness benchmark: which method and which decoder layer to trust, with numbers.

    pytorch-grad-cam-vlm benchmark --model PATH_OR_ID --data samples.jsonl --methods GradCAM,HiResCAM \\
        --layers auto --out bench/
    accelerate launch -m pytorch_grad_cam_vlm.benchmark --model ... --data ... --out bench/   # samples sharded

Every method x layer is scored on every sample against RandomCAM (always added as the baseline):

- ROAD (Rong et al. 2022, grad-cam's metric with this package's faster imputer, ``road.py``): the change of the
  target's logit when the most (MoRF) or least (LeRF) relevant pixels are removed and imputed, at each percentile;
  ``road_combined = (mean LeRF - mean MoRF) / 2``, as grad-cam's ``ROADCombined``: higher is better. Pixels of
  equal map value are removed in random order (``--road-ties``, :func:`ranked_map`).
- Pointing game (the map's maximum in an evidence box, widened by ``--tolerance`` pixels), the same on the
  distractor boxes, and the share of the map's positive mass in the evidence boxes, where a sample has boxes.
- Model-parameter randomization (Adebayo et al. 2018): the Spearman rank correlation between the map of the trained
  model and the map, same method, layer, image and target, of a copy whose decoder layers and ``lm_head`` are
  re-initialised (:func:`randomized_copy`). Lower means the map depends more on what the model learned.

The target is the first token of the sample's answer, or without an answer the model's next token on the clean image.

Rows of ``per_sample.csv`` are appended as they finish; a run started again with the same ``--out`` skips the rows
there (and refuses other settings). Each process of an ``accelerate launch`` takes the samples whose index modulo
the process count is its rank and appends to its own part file; the main process merges them. Random numbers
(RandomCAM's weights, ROAD's imputation noise) are seeded from ``--seed``, the sample's index, the method and the
layer, so results do not depend on the sharding or on which rows a resumed run still had to compute.
"""
from __future__ import annotations

import argparse
import copy
import csv
import io
import json
import math
import os
import random
import sys
import zlib
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from pytorch_grad_cam_vlm.cli import (EXIT_BAD_INPUT, PROG, QWEN_MODEL_CLASSES, InputError, cam_options,
                                      check_question, layer_count, load_model, make_subject, model_config,
                                      resolve_dtype, resolve_method, skip_last)
from pytorch_grad_cam_vlm.localization import energy_in_box, pointing_hit
from pytorch_grad_cam_vlm.road import PERCENTILES, FastROADLeastRelevantFirst, FastROADMostRelevantFirst
from pytorch_grad_cam_vlm.sweep import LAYER_PRESETS, select_layers

Box = Tuple[float, float, float, float]
BASELINE = "RandomCAM"
PER_SAMPLE = "per_sample.csv"
SETTINGS = "settings.json"
KEY = ("sample", "method", "layer")
SCORES = ("road_combined", "road_morf", "road_lerf", "pointing", "distractor", "energy", "sanity")
PHASES = {"map": 0, "road": 1}


# ------------------------------------------------------------------------------------------------ data
@dataclass
class Sample:
    """One benchmark question. Boxes are ``(x0, y0, x1, y1)`` in the pixels of the image file (``x1``, ``y1``
    exclusive); ``where`` names the data row in error messages."""

    index: int
    where: str
    image: str
    prompt: Optional[str]  # None for CLIP models, which score the run's --texts
    answer: Optional[str] = None
    boxes: List[Box] = field(default_factory=list)
    distractor_boxes: List[Box] = field(default_factory=list)


def load_samples(path: str, limit: Optional[int] = None,
                 coco_prompt: str = "Is there a {category} in this image?", needs_prompt: bool = True) -> List[Sample]:
    """The samples of a data file, each checked (image readable, boxes inside it) with an error naming its row.

    JSONL (``.jsonl``): one object per line with ``image`` (a path, relative to the data file's folder),
    ``prompt``, and optionally ``answer``, ``boxes`` (evidence, a list of ``[x0, y0, x1, y1]``) and
    ``distractor_boxes``. COCO (``.json`` with ``images``, ``annotations``, ``categories``): one sample per image and
    category present, asked ``coco_prompt`` with ``{category}`` filled in; that category's boxes are the evidence,
    the other categories' boxes the distractors. ``limit`` keeps the first samples. CLIP models
    (``needs_prompt=False``) take no prompt: a row's ``answer`` names the text to explain."""
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
        rows = _coco_rows(document, name, coco_prompt)
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


def _coco_rows(document, name: str, prompt: str) -> List[Tuple[str, dict]]:
    if not isinstance(document, dict) or not {"images", "annotations", "categories"} <= set(document):
        raise InputError(f"{name}: a .json data file must be COCO-style, with images, annotations and categories "
                         "(or use JSONL, .jsonl).")
    try:
        categories = {c["id"]: c["name"] for c in document["categories"]}
        boxes: Dict[object, Dict[object, List[Box]]] = {}
        for k, annotation in enumerate(document["annotations"]):
            x, y, w, h = annotation["bbox"]
            boxes.setdefault(annotation["image_id"], {}).setdefault(annotation["category_id"], []).append(
                (x, y, x + w, y + h))
            if annotation["category_id"] not in categories:
                raise InputError(f"{name} annotations[{k}]: unknown category_id {annotation['category_id']}.")
        rows = []
        for k, image in enumerate(document["images"]):
            by_category = boxes.get(image["id"], {})
            for category in sorted(by_category, key=str):
                rows.append((f"{name} images[{k}] (id {image['id']}, category {categories[category]!r})",
                             dict(image=image["file_name"], prompt=prompt.format(category=categories[category]),
                                  boxes=by_category[category],
                                  distractor_boxes=[b for c, bs in by_category.items() if c != category for b in bs])))
    except (KeyError, TypeError, ValueError) as error:
        raise InputError(f"{name}: not a COCO-style file ({type(error).__name__}: {error}); images need id and "
                         "file_name, annotations image_id, category_id and bbox [x, y, width, height].") from error
    return rows


def _check_row(index: int, where: str, row: dict, folder: str, needs_prompt: bool = True) -> Sample:
    from pytorch_grad_cam_vlm.image import load_rgb

    for key in ("image", "prompt") if needs_prompt else ("image",):
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise InputError(f"{where}: missing {key!r} (a non-empty string).")
    unknown = sorted(set(row) - {"image", "prompt", "answer", "boxes", "distractor_boxes", "id"})
    if unknown:
        raise InputError(f"{where}: unknown keys {unknown}; use image, prompt, answer, boxes, distractor_boxes.")
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
    prompt = row.get("prompt") if needs_prompt else None
    return Sample(index, where, image, prompt, answer, boxes["boxes"], boxes["distractor_boxes"])


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


# ------------------------------------------------------------------------------------------------ scores
def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps' pixels (average ranks for ties); NaN when either map is flat."""
    from scipy.stats import rankdata

    ra, rb = rankdata(np.ravel(a)), rankdata(np.ravel(b))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def energy_in_boxes(cam: np.ndarray, boxes: Sequence[Box]) -> float:
    """:func:`~pytorch_grad_cam_vlm.localization.energy_in_box` of the union of ``boxes`` (integer pixel boxes):
    the mass of the union counted once. The union's pixels are gathered into one strip, so the strip's box holds
    exactly their mass."""
    inside = np.zeros(cam.shape, dtype=bool)
    for x0, y0, x1, y1 in boxes:
        inside[y0:y1, x0:x1] = True
    strip = np.concatenate([cam[inside], cam[~inside]])[None]
    return energy_in_box(strip, (0, 0, int(inside.sum()), 1))


def pixel_boxes(boxes: Sequence[Box], scale_x: float, scale_y: float) -> List[Tuple[int, int, int, int]]:
    """Boxes in the image file's pixels to whole pixels of the model's (resized) image, rounded outwards."""
    return [(int(math.floor(x0 * scale_x)), int(math.floor(y0 * scale_y)), int(math.ceil(x1 * scale_x)),
             int(math.ceil(y1 * scale_y))) for x0, y0, x1, y1 in boxes]


def ranked_map(cam: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The map's pixel ranks scaled to [0, 1], ties in random order. grad-cam's ROAD keeps the pixels below the
    p-th percentile (``cam < percentile``): on a map that is 0 (after the ReLU) over more than p% of the image the
    percentile is 0, and MoRF removes every pixel instead of the most relevant (100 - p)%. Ranks keep the map's
    order and make every removed share exact."""
    order = np.lexsort((rng.random(cam.size), np.ravel(cam)))
    ranks = np.empty(cam.size)
    ranks[order] = np.arange(cam.size)
    return (ranks / max(1, cam.size - 1)).reshape(cam.shape).astype(np.float32)


def randomized_copy(model: torch.nn.Module, layers: Sequence[torch.nn.Module], seed: int) -> torch.nn.Module:
    """The sanity check's model: a deep copy of ``model`` whose ``layers`` (Qwen: the decoder layers; CLIP: the
    vision layers) and output embeddings (``lm_head``, where there is one) are re-initialised as the config
    initialises a fresh model (linear weights ``N(0, initializer_range)``, biases 0, norm weights 1), from a
    generator seeded with ``seed``. Everything else keeps its trained weights (Qwen's token embeddings too, unless
    the model ties them to ``lm_head``, as Qwen2.5-VL-3B does)."""
    names = [name for name, module in model.named_modules() if any(module is layer for layer in layers)]
    randomized = copy.deepcopy(model)
    config = getattr(randomized.config, "text_config", randomized.config)
    std = getattr(config, "initializer_range", 0.02)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head = randomized.get_output_embeddings()  # None for CLIP models
        for module in [randomized.get_submodule(name) for name in names] + ([head] if head is not None else []):
            for name, parameter in module.named_parameters():
                if parameter.dim() >= 2:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
                elif name.endswith("bias"):
                    parameter.zero_()
                else:
                    parameter.fill_(1.0)
    return randomized


def seed_everything(seed: int, sample: int, method: str, layer: int, phase: str) -> None:
    """Seed torch, numpy and random from the run's seed and one (sample, method, layer, phase): the same numbers
    whichever process computes the row and whatever ran before it."""
    entropy = [seed, sample, zlib.crc32(method.encode()), layer, PHASES[phase]]
    value = int(np.random.SeedSequence(entropy).generate_state(1)[0])
    torch.manual_seed(value)
    np.random.seed(value)
    random.seed(value)


# ------------------------------------------------------------------------------------------------ scoring
class Scorer:
    """Scores the rows of one sample: builds the wrappers of its prompt (trained and randomized model), its image
    and target once, then each (method, layer)."""

    def __init__(self, family: str, model, processor, methods: Dict[str, type], percentiles: Sequence[float],
                 seed: int, tolerance_px: Optional[float], randomized: Optional[torch.nn.Module],
                 road_ties: str = "random", texts: Optional[Sequence[str]] = None) -> None:
        self.family, self.model, self.processor, self.methods = family, model, processor, methods
        self.texts = texts
        self.percentiles, self.seed, self.tolerance_px = list(percentiles), seed, tolerance_px
        self.randomized, self.road_ties = randomized, road_ties
        self._subjects: Dict[Tuple[str, bool], object] = {}

    def subject(self, prompt: Optional[str], randomized: bool = False):
        """The CLI's wrapped model (:class:`pytorch_grad_cam_vlm.cli.Subject`) of ``prompt`` (CLIP: of the texts),
        one per prompt."""
        key = (prompt, randomized)
        if key not in self._subjects:
            model = self.randomized if randomized else self.model
            self._subjects[key] = make_subject(self.family, model, self.processor, prompt, self.texts)
        return self._subjects[key]

    def target_token(self, sample: Sample, wrapper, x: torch.Tensor) -> int:
        """The first token of the answer (CLIP: the answer's index among the texts), or the class the model predicts
        on the clean image."""
        if sample.answer is not None:
            return answer_token(self.processor.tokenizer, sample, self.texts)
        with torch.no_grad():
            return int(wrapper(x)[0].argmax())

    def rows(self, sample: Sample, units: Sequence[Tuple[str, int]]) -> Iterable[dict]:
        """One row of scores per ``(method, layer)`` of ``units``, as each finishes."""
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
        from pytorch_grad_cam_vlm.image import load_rgb

        subject = self.subject(sample.prompt)
        wrapper = subject.wrapper
        image = load_rgb(sample.image)
        x = wrapper.preprocess(image)
        cropped = getattr(self.processor.image_processor, "do_center_crop", False) and image.size[0] != image.size[1]
        if cropped and (sample.boxes or sample.distractor_boxes):
            raise InputError(f"{sample.where}: the processor center-crops this {image.size[0]}x{image.size[1]} image, "
                             "so its boxes cannot be mapped onto the map; use square images for CLIP models.")
        scale_x, scale_y = x.shape[3] / image.size[0], x.shape[2] / image.size[1]
        boxes = pixel_boxes(sample.boxes, scale_x, scale_y)
        distractors = pixel_boxes(sample.distractor_boxes, scale_x, scale_y)
        tolerance = self.tolerance_px if self.tolerance_px is not None else wrapper.token_cell / 2
        token = self.target_token(sample, wrapper, x)
        targets = [ClassifierOutputTarget(token)]
        with torch.no_grad():
            clean = np.float32(targets[0](wrapper(x)[0]).cpu().numpy())
        for method, layer in units:
            cam = self.cam(subject, method, layer, x, targets, sample.index)
            seed_everything(self.seed, sample.index, method, layer, "road")
            road_cam = ranked_map(cam, np.random.default_rng(np.random.randint(2 ** 31))) \
                if self.road_ties == "random" else cam
            morf = [FastROADMostRelevantFirst(p)(x, road_cam[None], targets, wrapper, return_diff=False)[0] - clean
                    for p in self.percentiles]
            lerf = [FastROADLeastRelevantFirst(p)(x, road_cam[None], targets, wrapper, return_diff=False)[0] - clean
                    for p in self.percentiles]
            row = dict(sample=sample.index, method=method, layer=layer, target_token=token,
                       road_combined=(np.mean(lerf) - np.mean(morf)) / 2, road_morf=np.mean(morf),
                       road_lerf=np.mean(lerf), pointing=None, distractor=None, energy=None, sanity=None)
            if boxes:
                row.update(pointing=any(pointing_hit(cam, box, tolerance) for box in boxes),
                           energy=energy_in_boxes(cam, boxes))
            if distractors:
                row["distractor"] = any(pointing_hit(cam, box, tolerance) for box in distractors)
            if self.randomized is not None:
                random_cam = self.cam(self.subject(sample.prompt, True), method, layer, x, targets, sample.index)
                row["sanity"] = spearman(cam, random_cam)
            row.update({f"morf_{p:g}": v for p, v in zip(self.percentiles, morf)})
            row.update({f"lerf_{p:g}": v for p, v in zip(self.percentiles, lerf)})
            yield row

    def cam(self, subject, method: str, layer: int, x: torch.Tensor, targets, sample: int) -> np.ndarray:
        """The map of ``method`` at decoder layer ``layer`` for one image, ``(H, W)``. Seeded alike for the trained
        and the randomized model, so that RandomCAM draws the same weights for both."""
        method_cls = self.methods[method]
        seed_everything(self.seed, sample, method, layer, "map")
        with method_cls(model=subject.wrapper, target_layers=[subject.layers[layer]],
                        **cam_options(method_cls, subject, {})) as cam:
            return cam(input_tensor=x, targets=targets)[0]


def answer_token(tokenizer, sample: Sample, texts: Optional[Sequence[str]] = None) -> int:
    """The first token of the sample's answer, checked to be known to the tokenizer; for CLIP models (``texts``
    given) the answer's index among the texts."""
    if texts is not None:
        if sample.answer not in texts:
            raise InputError(f"{sample.where}: the answer {sample.answer!r} is not one of --texts {list(texts)}.")
        return list(texts).index(sample.answer)
    ids = tokenizer.encode(sample.answer, add_special_tokens=False)
    if not ids or (tokenizer.unk_token_id is not None and ids[0] == tokenizer.unk_token_id):
        raise InputError(f"{sample.where}: the tokenizer does not know the start of the answer {sample.answer!r}.")
    return int(ids[0])


# ------------------------------------------------------------------------------------------------ rows on disk
def row_fields(percentiles: Sequence[float]) -> List[str]:
    """Columns of ``per_sample.csv``."""
    return (list(KEY) + ["target_token"] + list(SCORES) + [f"morf_{p:g}" for p in percentiles]
            + [f"lerf_{p:g}" for p in percentiles])


def format_value(value) -> str:
    """A CSV cell: empty for a score that does not apply, 0/1 for hits, 6 significant digits for numbers."""
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (int, np.integer, str)):
        return str(value)
    return f"{float(value):.6g}"


def read_rows(path: str) -> List[Dict[str, str]]:
    """The complete rows of a per-sample CSV (a last line cut off by a killed run is left out); [] if absent."""
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        text = f.read()
    return list(csv.DictReader(io.StringIO(text[:text.rfind("\n") + 1])))


def part_files(out_dir: str) -> List[str]:
    return sorted(os.path.join(out_dir, name) for name in os.listdir(out_dir)
                  if name.startswith("per_sample.part") and name.endswith(".csv"))


def row_key(row: Dict[str, str]) -> Tuple[int, str, int]:
    return int(row["sample"]), row["method"], int(row["layer"])


def consolidate(out_dir: str, fields: Sequence[str]) -> List[Dict[str, str]]:
    """Merge the part files of every process into ``per_sample.csv`` (rows sorted by sample, method, layer; each
    key once), remove them, and return the rows."""
    rows: Dict[Tuple[int, str, int], Dict[str, str]] = {}
    parts = part_files(out_dir)
    for path in [os.path.join(out_dir, PER_SAMPLE)] + parts:
        for row in read_rows(path):
            rows.setdefault(row_key(row), row)
    merged = [rows[key] for key in sorted(rows)]
    staging = os.path.join(out_dir, PER_SAMPLE + ".tmp")
    with open(staging, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows(merged)
    os.replace(staging, os.path.join(out_dir, PER_SAMPLE))
    for path in parts:
        os.remove(path)
    return merged


class RowWriter:
    """Appends finished rows to one process's part file, flushed row by row."""

    def __init__(self, path: str, fields: Sequence[str]) -> None:
        new = not os.path.isfile(path) or os.path.getsize(path) == 0
        self.file = open(path, "a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=list(fields))
        if new:
            self.writer.writeheader()

    def write(self, row: dict) -> None:
        self.writer.writerow({k: format_value(v) for k, v in row.items()})
        self.file.flush()

    def close(self) -> None:
        self.file.close()


# ------------------------------------------------------------------------------------------------ tables
def _mean(values: Iterable[str]) -> Optional[float]:
    """Mean of the non-empty cells, NaN cells left out; None when no cell applies, NaN when all are NaN."""
    numbers = [float(v) for v in values if v != ""]
    if not numbers:
        return None
    finite = [v for v in numbers if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def summarize(rows: Sequence[Dict[str, str]], methods: Sequence[str], layers: Sequence[int],
              percentiles: Sequence[float]) -> List[dict]:
    """Mean scores per (method, layer) over the samples: ``method, layer, n``, the scores of :data:`SCORES` and the
    ROAD curves ``morf_P`` / ``lerf_P``."""
    columns = list(SCORES) + [f"{curve}_{p:g}" for curve in ("morf", "lerf") for p in percentiles]
    summary = []
    for method in methods:
        for layer in layers:
            chosen = [r for r in rows if r["method"] == method and int(r["layer"]) == layer]
            summary.append(dict(method=method, layer=layer, n=len(chosen),
                                **{c: _mean(r[c] for r in chosen) for c in columns}))
    return summary


def best_layers(summary: Sequence[dict]) -> Dict[str, dict]:
    """Each method's row at its best layer: the highest ROAD combined (the lower layer on ties)."""
    best: Dict[str, dict] = {}
    for row in summary:
        score = row["road_combined"]
        current = best.get(row["method"])
        if current is None or (score is not None and not math.isnan(score)
                               and (current["road_combined"] is None or math.isnan(current["road_combined"])
                                    or score > current["road_combined"])):
            best[row["method"]] = row
    return best


def _cell(value: Optional[float], signed: bool = False) -> str:
    if value is None or math.isnan(value):
        return "–"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _versus(row: dict, baseline: Optional[dict], score: str) -> str:
    if baseline is None or row[score] is None or baseline[score] is None:
        return "–"
    return _cell(row[score] - baseline[score], signed=True)


def markdown_tables(summary: Sequence[dict], header: str) -> str:
    """The best-layer table of every method against RandomCAM at the same layer, then the full method x layer
    table."""
    by_key = {(r["method"], r["layer"]): r for r in summary}
    lines = [header, "",
             "Each method at its best layer (highest ROAD combined); \"vs RandomCAM\" is the difference with RandomCAM "
             "at the same layer. ROAD: change of the target logit when pixels are removed (MoRF: most relevant "
             "first, lower is better; LeRF: least relevant first, higher is better; combined = (LeRF - MoRF) / 2, "
             "higher is better). Pointing / distractor: share of maps whose maximum lies in an evidence / "
             "distractor box. Sanity: rank correlation with the map of the randomized model (lower is better).", "",
             "| method | layer | ROAD combined | vs RandomCAM | MoRF | LeRF | pointing | vs RandomCAM | distractor "
             "| energy in box | sanity |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, row in best_layers(summary).items():
        baseline = by_key.get((BASELINE, row["layer"])) if method != BASELINE else None
        lines.append(f"| {method} | {row['layer']} | {_cell(row['road_combined'])} | "
                     f"{_versus(row, baseline, 'road_combined')} | {_cell(row['road_morf'])} | "
                     f"{_cell(row['road_lerf'])} | {_cell(row['pointing'])} | {_versus(row, baseline, 'pointing')} | "
                     f"{_cell(row['distractor'])} | {_cell(row['energy'])} | {_cell(row['sanity'])} |")
    lines += ["", "Every method and layer:", "",
              "| method | layer | samples | ROAD combined | MoRF | LeRF | pointing | distractor | energy in box | "
              "sanity |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in summary:
        lines.append(f"| {row['method']} | {row['layer']} | {row['n']} | {_cell(row['road_combined'])} | "
                     f"{_cell(row['road_morf'])} | {_cell(row['road_lerf'])} | {_cell(row['pointing'])} | "
                     f"{_cell(row['distractor'])} | {_cell(row['energy'])} | {_cell(row['sanity'])} |")
    return "\n".join(lines) + "\n"


def plot_road_curves(summary: Sequence[dict], percentiles: Sequence[float], path: str) -> None:
    """MoRF and LeRF curves (mean change of the target logit against the share of pixels removed) of each method
    at its best layer."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), layout="constrained")
    removed = [100 - p for p in percentiles]  # ROAD at percentile p removes the other 100 - p percent
    for axes, curve, title in zip(figure.subplots(1, 2), ("morf", "lerf"),
                                  ("MoRF: most relevant removed first (lower is better)",
                                   "LeRF: least relevant removed first (higher is better)")):
        for method, row in best_layers(summary).items():
            axes.plot(removed, [row[f"{curve}_{p:g}"] for p in percentiles], marker="o",
                      linestyle="--" if method == BASELINE else "-", label=f"{method} (layer {row['layer']})")
        axes.set(title=title, xlabel="pixels removed (%)", ylabel="change of the target logit")
        axes.grid(alpha=0.3)
    figure.axes[0].legend(fontsize=8)
    figure.savefig(path, dpi=120)


def plot_heat_table(summary: Sequence[dict], methods: Sequence[str], layers: Sequence[int], path: str) -> None:
    """ROAD combined of every method x layer as a coloured, annotated table."""
    from matplotlib.figure import Figure

    by_key = {(r["method"], r["layer"]): r["road_combined"] for r in summary}
    values = np.array([[by_key[(m, l)] if by_key[(m, l)] is not None else np.nan for l in layers] for m in methods])
    figure = Figure(figsize=(1.2 + 0.9 * len(layers), 1.0 + 0.5 * len(methods)), layout="constrained")
    axes = figure.subplots()
    image = axes.imshow(values, cmap="viridis", aspect="auto")
    for i in range(len(methods)):
        for j in range(len(layers)):
            axes.text(j, i, _cell(values[i, j]), ha="center", va="center", color="white", fontsize=8)
    axes.set_xticks(range(len(layers)), [str(l) for l in layers])
    axes.set_yticks(range(len(methods)), list(methods))
    axes.set(xlabel="decoder layer", title="ROAD combined (higher is better)")
    figure.colorbar(image, ax=axes)
    figure.savefig(path, dpi=120)


def write_outputs(out_dir: str, rows: Sequence[Dict[str, str]], methods: Sequence[str], layers: Sequence[int],
                  percentiles: Sequence[float], header: str) -> List[str]:
    """``summary.csv``, ``benchmark.md``, ``road_curves.png`` and ``heat_table.png`` from the per-sample rows."""
    summary = summarize(rows, methods, layers, percentiles)
    paths = [os.path.join(out_dir, name) for name in ("summary.csv", "benchmark.md", "road_curves.png",
                                                      "heat_table.png")]
    with open(paths[0], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows({k: format_value(v) for k, v in row.items()} for row in summary)
    with open(paths[1], "w") as f:
        f.write(markdown_tables(summary, header))
    plot_road_curves(summary, percentiles, paths[2])
    plot_heat_table(summary, methods, layers, paths[3])
    return paths


# ------------------------------------------------------------------------------------------------ command
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``benchmark`` options, and ``run`` as the parser's ``run`` default (as the CLI's subcommands have)."""
    parser.add_argument("--model", required=True, help="Qwen2.5-VL / Qwen2-VL / CLIP / SigLIP folder or hub id; "
                                                       "'demo' for the embedded demo model")
    parser.add_argument("--texts", nargs="+", help="CLIP / SigLIP: the captions to score (a row's answer names "
                                                   "the one to explain; default the best-scoring)")
    parser.add_argument("--data", required=True, help="JSONL (image, prompt, answer, boxes, distractor_boxes per "
                                                      "line) or COCO-style .json with boxes")
    parser.add_argument("--methods", default="GradCAM", help="comma-separated grad-cam method names; RandomCAM is "
                                                              "always added as the baseline")
    parser.add_argument("--layers", default="auto", help=f"decoder layers (CLIP: vision layers): "
                                                         f"{'|'.join(LAYER_PRESETS)} or indices like 3,5,7")
    parser.add_argument("--out", required=True, help="output folder; a run started again there resumes")
    parser.add_argument("--percentiles", default=",".join(map(str, PERCENTILES)),
                        help="ROAD percentiles (default 10..90)")
    parser.add_argument("--tolerance", type=float, help="pointing-game tolerance in pixels (default: half a token "
                                                        "cell, 14 px for Qwen)")
    parser.add_argument("--limit", type=int, help="score only the first N samples")
    parser.add_argument("--seed", type=int, default=0, help="seed of RandomCAM, ROAD's noise and the randomized "
                                                            "model")
    parser.add_argument("--sanity", action=argparse.BooleanOptionalAction, default=True,
                        help="run the model-parameter randomization check (needs a second copy of the model)")
    parser.add_argument("--road-ties", choices=("random", "threshold"), default="random",
                        help="ROAD's removal order among equal map values: random (seeded; every percentile removes "
                             "its exact share) or threshold (grad-cam's: a map that is 0 over more than p%% of the "
                             "image loses every pixel at percentile p)")
    parser.add_argument("--coco-prompt", default="Is there a {category} in this image?",
                        help="question asked of COCO-style data, {category} filled in")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="model dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--device", default="auto", help="auto (the process's device under accelerate), cpu, cuda:N")
    parser.set_defaults(run=run)
    return parser


def _percentiles(text: str) -> List[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError as error:
        raise InputError(f"--percentiles {text}: expected numbers like 10,20,30.") from error
    if not values or any(not 0 < v < 100 for v in values) or len(set(values)) != len(values):
        raise InputError(f"--percentiles {text}: expected distinct numbers between 0 and 100 (exclusive).")
    return values


def _settings(args: argparse.Namespace, model: str, percentiles: Sequence[float]) -> dict:
    """What each per-sample row depends on beyond its key: a resumed run must match."""
    return dict(model=os.path.abspath(model) if os.path.exists(model) else model,
                data=os.path.abspath(args.data), percentiles=list(percentiles), seed=args.seed,
                tolerance=args.tolerance, sanity=args.sanity, coco_prompt=args.coco_prompt, dtype=args.dtype,
                road_ties=args.road_ties)


def _check_resume(out_dir: str, settings: dict) -> None:
    path = os.path.join(out_dir, SETTINGS)
    if not os.path.isfile(path):
        return
    with open(path) as f:
        previous = json.load(f)
    changed = [f"{k} {previous.get(k)!r} there, {v!r} here" for k, v in settings.items() if previous.get(k) != v]
    if changed:
        raise InputError(f"--out {out_dir} holds a benchmark run with other settings ({'; '.join(changed)}): run "
                         "again with the same settings to resume, or use another --out.")


def run(args: argparse.Namespace, after_row: Optional[Callable[[dict], None]] = None) -> int:
    """Run the benchmark of ``args`` (see :func:`add_arguments`); ``after_row`` is called with each finished row.
    Every process checks every input alike before the first barrier, so bad input fails everywhere at once."""
    from accelerate import PartialState
    from tqdm import tqdm

    from pytorch_grad_cam_vlm.cli import resolve_device

    state = PartialState()
    percentiles = _percentiles(args.percentiles)
    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit {args.limit}: expected a number of samples >= 1.")
    names = [name.strip() for name in args.methods.split(",") if name.strip()]
    methods = {cls.__name__: cls for cls in map(resolve_method, names + [BASELINE])}
    model_name = _demo_model_dir() if args.model == "demo" else args.model
    config, family = model_config(model_name)
    qwen = family in QWEN_MODEL_CLASSES
    if qwen and args.texts:
        raise InputError("--texts is for CLIP and SigLIP models; a Qwen model takes the prompts of the data.")
    if not qwen:
        check_question(family, None, args.texts)
    samples = load_samples(args.data, args.limit, args.coco_prompt, needs_prompt=qwen)
    try:
        layers = select_layers(layer_count(config, family), args.layers, skip_last=skip_last(family, True))
    except ValueError as error:
        raise InputError(f"--layers {args.layers}: {error}") from error
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise InputError(f"--out {args.out} is a file, not a folder.")
    settings = _settings(args, model_name, percentiles)
    _check_resume(args.out, settings)
    fields = row_fields(percentiles)

    state.wait_for_everyone()
    if state.is_main_process:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, SETTINGS), "w") as f:
            json.dump(settings, f, indent=2)
        consolidate(args.out, fields)  # rows a killed run left in part files
    state.wait_for_everyone()

    device = state.device if args.device == "auto" else resolve_device(args.device)
    model, processor = load_model(model_name, family, resolve_dtype(args.dtype, device), device)
    for sample in samples:
        if sample.answer is not None:
            answer_token(processor.tokenizer, sample, args.texts)
    randomized = None
    if args.sanity:
        layers_to_randomize = make_subject(family, model, processor, samples[0].prompt, args.texts).layers
        randomized = randomized_copy(model, layers_to_randomize, args.seed)
    scorer = Scorer(family, model, processor, methods, percentiles, args.seed, args.tolerance, randomized,
                    args.road_ties, args.texts)

    done = {row_key(row) for row in read_rows(os.path.join(args.out, PER_SAMPLE))}
    work = [(sample, [(m, l) for m in methods for l in layers if (sample.index, m, l) not in done])
            for sample in samples if sample.index % state.num_processes == state.process_index]
    work = [(sample, units) for sample, units in work if units]
    writer = RowWriter(os.path.join(args.out, f"per_sample.part{state.process_index}.csv"), fields)
    progress = tqdm(total=sum(len(units) for _, units in work), desc=f"{PROG} benchmark", unit="map",
                    disable=not state.is_main_process)
    try:
        for sample, units in work:
            for row in scorer.rows(sample, units):
                writer.write(row)
                progress.update()
                if after_row is not None:
                    after_row(row)
    finally:
        writer.close()
        progress.close()
    state.wait_for_everyone()
    if state.is_main_process:
        rows = consolidate(args.out, fields)
        wanted = {s.index for s in samples}
        rows = [r for r in rows if int(r["sample"]) in wanted]
        header = (f"Faithfulness benchmark of {args.model} on {len(samples)} samples of {args.data} (seed "
                  f"{args.seed}; ROAD percentiles {', '.join(f'{p:g}' for p in percentiles)}).")
        paths = write_outputs(args.out, rows, list(methods), layers, percentiles, header)
        with open(paths[1]) as f:
            print(f.read())
        print(f"Wrote {os.path.join(args.out, PER_SAMPLE)}, " + ", ".join(paths) + ".")
    return 0


def _demo_model_dir() -> str:
    from pytorch_grad_cam_vlm.demo import DEMO_MODEL_DIR

    return DEMO_MODEL_DIR


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m pytorch_grad_cam_vlm.benchmark``."""
    return add_arguments(argparse.ArgumentParser(prog=f"{PROG} benchmark", description=__doc__.split("\n\n")[0]))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m pytorch_grad_cam_vlm.benchmark``; returns the exit code (2 for bad input, with one line)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return args.run(args)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else EXIT_BAD_INPUT
    except (InputError, ValueError, FileNotFoundError) as error:
        print(f"{PROG} benchmark: error: {str(error).splitlines()[0]}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
