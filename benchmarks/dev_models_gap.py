"""The gap between today's default ``explain`` (auto) and occlusion on the development models, scored on the user's
picture: how often each map's maximum lies on the evidence (for the pairs model: on either of the two objects), how
often on a distractor, and the share of its positive mass in the evidence boxes (for the pairs model: both boxes).

    python benchmarks/dev_models_gap.py --models pairs,onevision,internvl --n 200   # writes dev_models_gap.md/.csv

Occlusion greys out windows of one token cell's object size on the model's input (28 px for the Qwen2.5-VL models,
16 px on the canvases of the tiled ones; stride half a window) and is carried onto the picture by the wrapper's
frame, as ``explain`` carries its maps (``Explanation.maps``). The pointing tolerance is half a cell (14 px, 8 px).
Also written: ``dev_models_gap_samples.csv``, one row per sample (the default's chosen method and layer, hits).
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Dict, List

import numpy as np
import torch
from tqdm import tqdm

from auto_layer import geometry, held_out, markdown, sample_case, tasks, tiled_tasks, write_csv
from pytorch_grad_cam_vlm import explain, occlusion_map, pointing_hit
from pytorch_grad_cam_vlm.metrics.localization import energy_in_boxes


def score(cam: np.ndarray, sample, tolerance: float) -> Dict[str, float]:
    """Pointing on the evidence (any of its boxes), on a distractor, and the energy in the evidence boxes, of a map
    on ``sample``'s picture."""
    boxes = getattr(sample, "evidence_boxes", None) or [sample.evidence_box]
    return dict(pointing=float(any(pointing_hit(cam, b, tolerance) for b in boxes)),
                distractor=float(any(pointing_hit(cam, b, tolerance) for b in sample.distractor_boxes)),
                energy=energy_in_boxes(np.nan_to_num(cam), boxes))


def measure(name: str, n: int, seed: int) -> List[dict]:
    """One row per held-out sample of model ``name``: the answer's correctness, occlusion's and the default's
    scores, the default's chosen method and layer."""
    model, processor, samples = held_out(name, n, seed)
    window, tolerance = geometry(name)
    rows = []
    for i, sample in enumerate(tqdm(samples, desc=name, unit="sample")):
        wrapper, x, target = sample_case(model, processor, sample)
        size = sample.image.shape[:2]
        with torch.no_grad():
            correct = int(wrapper(x)[0].argmax()) == target.category
        start = time.perf_counter()
        reference = wrapper.image_frame(size, tuple(x.shape[2:])).to_image(
            occlusion_map(wrapper, x, target.category, window=window))
        occlusion_s = time.perf_counter() - start
        start = time.perf_counter()
        explanation = explain(wrapper, x, [target], image_size=size)
        default_s = time.perf_counter() - start
        row = dict(model=name, sample=i, correct=int(correct), method=explanation.methods[0],
                   layer=explanation.layers[0])
        row.update({f"occlusion_{k}": v for k, v in score(reference, sample, tolerance).items()})
        row.update({f"default_{k}": v for k, v in score(explanation.maps[0], sample, tolerance).items()})
        row.update(occlusion_s=occlusion_s, default_s=default_s)
        rows.append(row)
    return rows


def summary(rows: List[dict]) -> dict:
    """Means over one model's sample rows, and the default's gaps to occlusion."""
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k not in ("model", "sample", "method",
                                                                                  "layer")}
    out = dict(model=rows[0]["model"], n=len(rows), accuracy=mean["correct"])
    for k in ("pointing", "distractor", "energy"):
        out[f"occlusion_{k}"] = mean[f"occlusion_{k}"]
        out[f"default_{k}"] = mean[f"default_{k}"]
    out.update(pointing_gap=out["default_pointing"] - out["occlusion_pointing"],
               distractor_gap=out["default_distractor"] - out["occlusion_distractor"],
               energy_gap=out["default_energy"] - out["occlusion_energy"])
    choices: Dict[str, int] = {}
    for r in rows:
        key = f"{r['method']}@{r['layer']}"
        choices[key] = choices.get(key, 0) + 1
    out["default_choices"] = ", ".join(f"{k} {v}" for k, v in sorted(choices.items(), key=lambda kv: -kv[1])[:4])
    out.update(occlusion_s=mean["occlusion_s"], default_s=mean["default_s"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(m for m in {**tasks(), **tiled_tasks()} if m != "demo"
                                                     and m != "crosses"))
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    samples = [measure(name, args.n, args.seed) for name in args.models.split(",")]
    table = [summary(rows) for rows in samples]
    os.makedirs(args.out, exist_ok=True)
    write_csv(os.path.join(args.out, "dev_models_gap.csv"), table)
    write_csv(os.path.join(args.out, "dev_models_gap_samples.csv"), sum(samples, []))
    header = (f"Today's default `explain` (auto) against occlusion on {args.n} held-out samples per model (seed "
              f"{args.seed}), scored on the picture: `pointing` the map's maximum on the evidence (pairs: either "
              "object), `distractor` on a distractor, `energy` the share of positive mass in the evidence boxes "
              "(pairs: both); `*_gap` default minus occlusion; `default_choices` the most chosen method@layer; "
              "seconds per sample on a shared CPU (not timings to report). Written by "
              f"`python benchmarks/dev_models_gap.py --models {args.models} --n {args.n} --seed {args.seed}`.")
    with open(os.path.join(args.out, "dev_models_gap.md"), "w") as f:
        f.write(markdown(table, header))
    print(markdown(table, header))


if __name__ == "__main__":
    main()
