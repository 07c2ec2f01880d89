"""Which method and layer to trust, measured on the trained demo models: the pointing game of every method at the
projector and every decoder layer, of occlusion, and of choosing per image by the deletion check's total (``auto``)
over several candidate method lists; and how well the check flags blank, inverted and the default's own maps.

    python benchmarks/auto_layer.py --models demo,crosses --n 200      # writes benchmarks/auto_layer.md and .csv

Every method's maps of every layer come from one sweep pass per sample (equal to single-layer calls, tested in
tests/methods/test_sweep.py), and every map is checked once; the ``auto`` rows take, per image, the map of the
highest check total among a candidate list, so each candidate list is scored on the same maps.
"""
from __future__ import annotations

import argparse
import csv
import os
import time
from itertools import combinations
from typing import Dict, Iterator, List, Tuple

import numpy as np
import torch
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from tqdm import tqdm

from pytorch_grad_cam_vlm import QwenVLWrapper, occlusion_map, pointing_hit
from pytorch_grad_cam_vlm.layers import PROJECTOR, Layer, layer_modules
from pytorch_grad_cam_vlm.methods.auto import AUTO_METHODS, candidate_layers
from pytorch_grad_cam_vlm.methods.catalog import resolve_method
from pytorch_grad_cam_vlm.methods.sweep import layer_sweep
from pytorch_grad_cam_vlm.metrics.deletion_check import DEFAULT_FRACTIONS, check_maps

METHODS = ("GradCAM", "HiResCAM", "GradCAMPlusPlus", "LayerCAM", "XGradCAM", "GradCAMElementWise")


def tasks() -> Dict[str, tuple]:
    """name -> (model loader, sample maker) of the trained Qwen2.5-VL development models that are installed (the
    sweep of :func:`measure` scores maps on the model's input, which is the picture for these)."""
    from pytorch_grad_cam_vlm import demo
    from pytorch_grad_cam_vlm.demo import crosses, pairs

    found = {"demo": (demo.load_demo_model, demo.make_demo_samples),
             "crosses": (crosses.load_crosses_model, crosses.make_crosses_samples),
             "pairs": (pairs.load_pairs_model, pairs.make_pairs_samples),
             "colors": (demo.load_colors_model, demo.make_colors_samples)}
    return {name: task for name, task in found.items() if installed(name)}


def tiled_tasks() -> Dict[str, tuple]:
    """name -> (model loader, sample maker) of the installed development models of the tiling families
    (LLaVA-OneVision, InternVL), whose inputs are canvases, not the picture: score their maps on the picture
    (``benchmarks/dev_models_gap.py``)."""
    from pytorch_grad_cam_vlm.demo import tiled

    found = {"onevision": (tiled.load_onevision_model, tiled.make_onevision_samples),
             "internvl": (tiled.load_internvl_model, tiled.make_internvl_samples)}
    return {name: task for name, task in found.items() if installed(name)}


def installed(name: str) -> bool:
    """Whether the development model ``name``'s weights are in the package."""
    from pytorch_grad_cam_vlm.demo import DEMO_MODEL_DIR

    folder = DEMO_MODEL_DIR if name == "demo" else os.path.join(os.path.dirname(DEMO_MODEL_DIR), f"{name}_model")
    return os.path.isfile(os.path.join(folder, "config.json"))


def geometry(name: str) -> Tuple[int, float]:
    """``(occlusion window in pixels of the model's input, pointing tolerance in pixels of the picture)`` of the
    development model ``name``: a 28-pixel token cell and half of it, or the tiled tasks' 16-pixel cell and half."""
    if name in ("onevision", "internvl"):
        from pytorch_grad_cam_vlm.demo import tiled

        return tiled.OCCLUSION_WINDOW, tiled.TOLERANCE
    return 28, 14


def held_out(name: str, n: int, seed: int = 0):
    """``(model, processor, samples)``: the trained model ``name`` and ``n`` of its held-out samples."""
    load, make = {**tasks(), **tiled_tasks()}[name]
    model, processor = load()
    return model, processor, make(n, seed=seed, split="test")


def wrap(model, processor, prompt: str):
    """The family's wrapper of ``model`` for ``prompt`` (what the CLI builds)."""
    from pytorch_grad_cam_vlm.models.registry import make_subject

    return make_subject(model.config.model_type, model, processor, prompt, None).wrapper


def sample_case(model, processor, sample):
    """``(wrapper, x, target)`` of one sample: its prompt's wrapper (the model family's), its image as the model's
    input and the logit of its answer."""
    wrapper = wrap(model, processor, sample.prompt)
    target = ClassifierOutputTarget(processor.tokenizer.convert_tokens_to_ids(sample.answer))
    return wrapper, wrapper.preprocess(sample.image), target


def held_out_cases(name: str, n: int, seed: int = 0) -> Iterator[tuple]:
    """``(index, sample, wrapper, x, target)`` of each of ``n`` held-out samples of the development model ``name``
    (:func:`held_out`, :func:`sample_case`), under a progress bar."""
    model, processor, samples = held_out(name, n, seed)
    for i, sample in enumerate(tqdm(samples, desc=name, unit="sample")):
        yield (i, sample) + sample_case(model, processor, sample)


def method_maps(wrapper: QwenVLWrapper, x: torch.Tensor, target, method: str, layers: List[Layer]) -> np.ndarray:
    """``method``'s maps of ``x`` ``(1, 3, H, W)`` for ``target`` at each layer of ``layers`` (decoder layer indices
    and the projector), ``(L, H, W)``, from one sweep pass."""
    with layer_sweep(resolve_method(method))(model=wrapper, target_layers=layer_modules(wrapper, layers),
                                             reshape_transform=wrapper.reshape_transform) as cam:
        return cam(input_tensor=x, targets=[target])[0]


def measure(name: str, n: int, seed: int, fractions=DEFAULT_FRACTIONS, fill: str = "mean",
            occlusion: bool = True) -> List[dict]:
    load, make = tasks()[name]
    model, processor = load()
    samples = make(n, seed=seed, split="test")
    wrappers: Dict[str, QwenVLWrapper] = {}
    layers = candidate_layers(len(QwenVLWrapper(model, processor, samples[0].prompt).decoder_layers), projector=True)
    decoder = [k for k in layers if k != PROJECTOR]
    tolerance = 14
    rows: Dict[tuple, dict] = {}

    def add(method, layer, hit, distractor, flagged, seconds=0.0):
        row = rows.setdefault((method, layer), dict(model=name, method=method, layer=layer, n=0, pointing=0,
                                                     distractor=0, flagged=0, hit_when_flagged=0,
                                                     hit_when_passed=0, seconds=0.0))
        row["n"] += 1
        row["pointing"] += hit
        row["distractor"] += distractor
        row["flagged"] += flagged
        row["hit_when_flagged" if flagged else "hit_when_passed"] += hit
        row["seconds"] += seconds

    inverted_flagged = blank_flagged = 0
    for sample in tqdm(samples, desc=name, unit="sample"):
        wrapper = wrappers.setdefault(sample.prompt, QwenVLWrapper(model, processor, sample.prompt))
        x = wrapper.preprocess(sample.image)
        token = processor.tokenizer.convert_tokens_to_ids(sample.answer)
        target = ClassifierOutputTarget(token)
        scored = {}
        for method in METHODS:
            start = time.perf_counter()
            maps = method_maps(wrapper, x, target, method, layers)
            checks = check_maps(wrapper, x, maps, target, fractions, fill)
            per_map = (time.perf_counter() - start) / len(layers)
            for k, cam_map, check in zip(layers, maps, checks):
                scored[(method, k)] = (cam_map, check)
                hit = pointing_hit(cam_map, sample.evidence_box, tolerance)
                add(method, k, hit, any(pointing_hit(cam_map, b, tolerance) for b in sample.distractor_boxes),
                    check.failed, per_map)
        if occlusion:
            start = time.perf_counter()
            reference = occlusion_map(wrapper, x, token)
            add("Occlusion", None, pointing_hit(reference, sample.evidence_box, tolerance),
                any(pointing_hit(reference, b, tolerance) for b in sample.distractor_boxes), False,
                time.perf_counter() - start)
        rules = [("auto: " + "+".join(subset), subset, layers) for size in (1, 2, 3, 4)
                 for subset in combinations(METHODS, size)]
        # The default's list without the projector: round 1's candidate layers.
        rules.append(("auto: " + "+".join(AUTO_METHODS) + ", decoder layers only", AUTO_METHODS, decoder))
        for label, subset, rule_layers in rules:
            candidates = [(m, k) for m in subset for k in rule_layers]
            totals = np.array([scored[c][1].total for c in candidates])
            best = candidates[int(np.nanargmax(totals))] if not np.all(np.isnan(totals)) else candidates[0]
            cam_map, check = scored[best]
            add(label, None, pointing_hit(cam_map, sample.evidence_box, tolerance),
                any(pointing_hit(cam_map, b, tolerance) for b in sample.distractor_boxes), check.failed)
        # The default's map (AUTO_METHODS) inverted must fail; a flat map must be blank.
        default = [(m, k) for m in AUTO_METHODS for k in layers]
        totals = np.array([scored[c][1].total for c in default])
        good = scored[default[int(np.nanargmax(totals))]][0]
        inverted, blank = check_maps(wrapper, x, np.stack([1 - good, np.full_like(good, 0.3)]), target, fractions,
                                     fill)
        inverted_flagged += inverted.failed
        blank_flagged += blank.blank
    table = []
    for row in rows.values():
        count = row["n"]
        flagged = row["flagged"]
        table.append(dict(model=name, method=row["method"], layer="" if row["layer"] is None else row["layer"],
                          n=count, pointing=row["pointing"] / count, distractor=row["distractor"] / count,
                          flagged=flagged / count,
                          pointing_when_flagged=row["hit_when_flagged"] / flagged if flagged else "",
                          pointing_when_passed=row["hit_when_passed"] / (count - flagged) if count > flagged else "",
                          ms_per_map=1000 * row["seconds"] / count if row["seconds"] else ""))
    table.append(dict(model=name, method="inverted default maps flagged", layer="", n=len(samples),
                      pointing="", distractor="", flagged=inverted_flagged / len(samples), pointing_when_flagged="",
                      pointing_when_passed="", ms_per_map=""))
    table.append(dict(model=name, method="blank maps flagged", layer="", n=len(samples), pointing="",
                      distractor="", flagged=blank_flagged / len(samples), pointing_when_flagged="",
                      pointing_when_passed="", ms_per_map=""))
    return table


def cell(value) -> str:
    return value if isinstance(value, str) else f"{value:.3f}" if isinstance(value, float) else str(value)


def write_csv(path: str, table: List[dict]) -> None:
    """``table`` (rows of one set of keys) as a CSV file, its keys the header."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)


def markdown(table: List[dict], header: str) -> str:
    columns = list(table[0])
    lines = [header, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in table]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(tasks()))
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument("--fractions", default=",".join(map(str, DEFAULT_FRACTIONS)), help="the check's fractions")
    parser.add_argument("--fill", default="mean", choices=("mean", "blur"), help="the check's fill")
    parser.add_argument("--no-occlusion", action="store_true", help="leave out the occlusion reference (faster)")
    args = parser.parse_args()
    fractions = [float(f) for f in args.fractions.split(",")]
    table = sum((measure(name, args.n, args.seed, fractions, args.fill, not args.no_occlusion)
                 for name in args.models.split(",")), [])
    os.makedirs(args.out, exist_ok=True)
    write_csv(os.path.join(args.out, "auto_layer.csv"), table)
    header = (f"Pointing game (tolerance 14 px) on {args.n} held-out samples per model (seed {args.seed}); "
              "`flagged`: share of maps that fail the deletion check (blank or inverted; fractions "
              f"{args.fractions}, {args.fill} fill); `auto: A+B`: per image, the map of the highest check total "
              "(score + peak drop) among methods A, B at every candidate layer (the projector and the decoder "
              "layers); CPU, "
              f"{torch.get_num_threads()} thread(s). Written by "
              f"`python benchmarks/auto_layer.py --n {args.n} --fractions {args.fractions} --fill {args.fill}`.")
    with open(os.path.join(args.out, "auto_layer.md"), "w") as f:
        f.write(markdown(table, header))
    print(markdown(table, header))


if __name__ == "__main__":
    main()
