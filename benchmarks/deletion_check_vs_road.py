"""How often the cheap deletion check (mean fill, 2 images per fraction and map) and ROAD (noisy linear imputation,
18 images per map) agree on the sign of a map's faithfulness, on the demo models.

    python benchmarks/deletion_check_vs_road.py --n 40       # writes benchmarks/deletion_check_vs_road.md

ROAD combined = (mean LeRF - mean MoRF) / 2 over percentiles 10..90, ties of the map broken in a seeded random order
as the benchmark does; the check's score (its default fractions) is positive when removing the map's top share hurts
more than removing its bottom share. Both are positive for a faithful map.
"""
from __future__ import annotations

import argparse
import os

import numpy as np
from tqdm import tqdm

from auto_layer import METHODS, held_out, method_maps, sample_case, tasks
from pytorch_grad_cam_vlm.methods.auto import candidate_layers
from pytorch_grad_cam_vlm.metrics.deletion_check import DEFAULT_FRACTIONS, check_maps, ranked_map
from pytorch_grad_cam_vlm.metrics.road import PERCENTILES, FastROADLeastRelevantFirst, FastROADMostRelevantFirst


def road_combined(wrapper, x, cam, target, rng) -> float:
    ranked = ranked_map(cam, rng)[None]
    morf = [FastROADMostRelevantFirst(p)(x, ranked, [target], wrapper, return_diff=False)[0] for p in PERCENTILES]
    lerf = [FastROADLeastRelevantFirst(p)(x, ranked, [target], wrapper, return_diff=False)[0] for p in PERCENTILES]
    return float(np.mean(lerf) - np.mean(morf)) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(tasks()))
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--fill", default="mean", choices=("mean", "blur"))
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    args = parser.parse_args()
    lines = [f"Sign agreement of the deletion check (fill {args.fill}, fractions "
             f"{', '.join(map(str, DEFAULT_FRACTIONS))}) with ROAD combined "
             f"(percentiles 10..90), {args.n} held-out samples per model, every map of {', '.join(METHODS)} at "
             "every candidate layer. Written by `python benchmarks/deletion_check_vs_road.py`.", "",
             "| model | maps | same sign | check > 0, ROAD > 0 | check < 0, ROAD < 0 | check > 0, ROAD < 0 | "
             "check < 0, ROAD > 0 |", "|---|---|---|---|---|---|---|"]
    for name in args.models.split(","):
        model, processor, samples = held_out(name, args.n)
        counts = np.zeros((2, 2), dtype=int)  # [check > 0][ROAD > 0]
        rng = np.random.default_rng(0)
        for sample in tqdm(samples, desc=name, unit="sample"):
            wrapper, x, target = sample_case(model, processor, sample)
            layers = candidate_layers(len(wrapper.decoder_layers))
            for method in METHODS:
                maps = method_maps(wrapper, x, target, method, layers)
                for cam_map, check in zip(maps, check_maps(wrapper, x, maps, target, fill=args.fill)):
                    if check.blank:
                        continue
                    counts[int(check.score > 0), int(road_combined(wrapper, x, cam_map, target, rng) > 0)] += 1
        total = counts.sum()
        lines.append(f"| {name} | {total} | {(counts[1, 1] + counts[0, 0]) / total:.3f} | {counts[1, 1]} | "
                     f"{counts[0, 0]} | {counts[1, 0]} | {counts[0, 1]} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "deletion_check_vs_road.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
