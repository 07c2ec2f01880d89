"""The least ``explain``'s verdict can cost, against one GradCAM call (issue 29's goals: at most 10x on the mid-size
random Qwen2.5-VL, 20x on the Qwen2.5-VL-3B-shaped model, at 448x448 on the CPU).

Whatever chooses the map, the verdict that issue 26 asked for scores forward images: the null's (``NULL_MAPS`` maps x
(2 x fractions + 1) images), the kept map's own check (2 x fractions + 1) and visual reliance (2). This script times,
in one run, a forward pass, the vision tower alone on the same input and one GradCAM call at a middle decoder layer
(as ``bench_auto.py``), and prints the verdict's floor in GradCAM calls twice: with every image a forward pass (today)
and with every image a decoder pass alone (the vision tower's output of each removal taken as free: an upper bound on
what a check at the projector output, with the tower run once, could save). Writes benchmarks/check_floor.csv and
prints the table of benchmarks/check_floor.md.

    OMP_NUM_THREADS=2 python benchmarks/check_floor.py --models "mid-size random,3b"
"""
from __future__ import annotations

import argparse
import csv

import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from bench_auto import PROMPT, SIZE, at_size, best_time, load
from pytorch_grad_cam_vlm import QwenVLWrapper
from pytorch_grad_cam_vlm.metrics.deletion_check import DEFAULT_FRACTIONS, FILLS
from pytorch_grad_cam_vlm.metrics.null import NULL_MAPS

GOALS = {"mid-size random": 10, "3b": 20}


def verdict_images() -> dict:
    """The verdict's forward images per image, from the package's constants."""
    per_map = 2 * len(DEFAULT_FRACTIONS) + 1  # top and bottom at each fraction, and the peak window
    return {"null": NULL_MAPS * per_map, "kept_check": per_map, "reliance": len(FILLS)}  # the whole image filled, then blurred


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mid-size random,3b")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/check_floor.csv")
    args = parser.parse_args()
    images = verdict_images()
    count = sum(images.values())
    rows = []
    for name in args.models.split(","):
        model, processor = load(name)
        wrapper = QwenVLWrapper(model, at_size(processor, SIZE), prompt=PROMPT)
        x = wrapper.preprocess((np.random.RandomState(0).rand(SIZE, SIZE, 3) * 255).astype(np.uint8))
        inputs = wrapper.model_inputs(x)
        with torch.no_grad():
            target = [ClassifierOutputTarget(int(wrapper(x).argmax()))]
        layer = wrapper.decoder_layers[len(wrapper.decoder_layers) // 2]

        def forward():
            with torch.no_grad():
                wrapper(x)

        def vision():
            with torch.no_grad():  # the tower, merger included: what the decoder reads
                wrapper.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])

        def gradcam():
            with GradCAM(model=wrapper, target_layers=[layer], reshape_transform=wrapper.reshape_transform) as cam:
                cam(input_tensor=x, targets=target)

        forward_s, vision_s, gradcam_s = (best_time(run, args.repeats) for run in (forward, vision, gradcam))
        row = dict(model=name, forward_s=round(forward_s, 4), vision_tower_s=round(vision_s, 4),
                   gradcam_s=round(gradcam_s, 4), vision_share=round(vision_s / forward_s, 3),
                   verdict_images=count, **{f"{k}_images": v for k, v in images.items()},
                   floor_per_gradcam=round(count * forward_s / gradcam_s, 1),
                   floor_decoder_only_per_gradcam=round(count * (forward_s - vision_s) / gradcam_s, 1),
                   goal_per_gradcam=GOALS.get(name, ""))
        rows.append(row)
        print(row, flush=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print("| model | forward s | vision tower s (share) | GradCAM s | verdict images | floor / GradCAM | "
          "decoder-only floor / GradCAM | goal |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['forward_s']} | {r['vision_tower_s']} ({r['vision_share']}) | {r['gradcam_s']} | "
              f"{r['verdict_images']} | {r['floor_per_gradcam']} | {r['floor_decoder_only_per_gradcam']} | "
              f"{r['goal_per_gradcam']} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
