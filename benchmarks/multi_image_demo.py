"""Two images in one prompt, only one of which holds the asked object: does the map put more than half of its mass
in that image? Measured on the embedded demo model (Qwen2.5-VL trained on one 112x112 image per prompt, "What shape
is the red object?").

    python benchmarks/multi_image_demo.py --n 200   # writes multi_image_demo.csv, prints multi_image_demo.md's table

Pair ``i`` (:func:`~pytorch_grad_cam_vlm.demo.make_two_image_prompts`): held-out sample ``i`` (its red object) and
held-out sample ``n + i`` with its red object repainted in another colour (the same shapes and places, nothing red),
the red image first for even ``i`` and second for odd ``i``. Each pair is explained as ``explain(wrapper,
MultiImage(...))`` explains it, for the token the model predicts, in two settings: ``auto`` (explain's default) and
``projector`` (GradCAMElementWise at the projector, no null: what ``tests/demo/test_multi_image_demo.py`` pins).
Per pair: the model's answer (right when it names the red object's shape), the red image's share of the chosen
map's mass (``split.shares``), whether the map's peak lies in the red image and on the red object (half a cell of
tolerance), and each image's deletion check verdict (``split.checks``).
"""
from __future__ import annotations

import argparse
import csv
import math
import os
from typing import Dict, List

import numpy as np
import torch

from pytorch_grad_cam_vlm import QwenVLWrapper, explain, load_demo_model, pointing_hit
from pytorch_grad_cam_vlm.demo import make_two_image_prompts
from pytorch_grad_cam_vlm.models.multi_image import MultiImage

HERE = os.path.dirname(os.path.abspath(__file__))
SETTINGS = {"auto": dict(), "projector": dict(method="GradCAMElementWise", layers="projector", null=0)}
SEED = 0


def measure_pair(wrapper: QwenVLWrapper, images: List[np.ndarray], red: int, sample, setting: str
                 ) -> Dict[str, object]:
    """One row: the answer, the red image's share and the checks of one pair in one setting."""
    result = explain(wrapper, MultiImage(images), **SETTINGS[setting])
    split = result.split[0]
    token = wrapper.processor.tokenizer.decode([result.targets[0].category]).strip()
    top, left, _, _ = split.boxes.boxes[red]
    x0, y0, x1, y1 = sample.evidence_box
    canvas_map = result.model_maps[0]
    peak_image = int(np.argmax([part.max() for part in split.maps]))
    return dict(setting=setting, red_image=red + 1, answer=token, right=token == sample.answer,
                method=result.methods[0], layer=str(result.layers[0]), red_share=float(split.shares[red]),
                red_majority=bool(split.shares[red] > 0.5), peak_in_red=peak_image == red,
                peak_on_object=pointing_hit(canvas_map, (left + x0, top + y0, left + x1, top + y1)),
                red_verdict=split.checks[red].verdict, other_verdict=split.checks[1 - red].verdict,
                whole_verdict=result.checks[0].verdict)


def wilson(k: int, n: int, z: float = 1.96) -> str:
    """``k/n`` with its Wilson 95 % interval."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return f"{p:.3f} [{max(0.0, centre - half):.3f}, {min(1.0, centre + half):.3f}]"


def summary(rows: List[dict], n: int) -> str:
    """The markdown table of the rates per setting (all pairs, and by where the red image is)."""
    lines = ["| setting | pairs | answer right | red image > half the mass | mean red share | peak in red image | "
             "peak on the red object | red image's check ok | other image's check ok |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for setting in SETTINGS:
        for label, keep in (("all", None), ("red first", 1), ("red second", 2)):
            part = [r for r in rows if r["setting"] == setting and keep in (None, r["red_image"])]
            m = len(part)
            lines.append(f"| {setting} ({label}) | {m} | {wilson(sum(r['right'] for r in part), m)} | "
                         f"{wilson(sum(r['red_majority'] for r in part), m)} | "
                         f"{np.mean([r['red_share'] for r in part]):.3f} | "
                         f"{wilson(sum(r['peak_in_red'] for r in part), m)} | "
                         f"{wilson(sum(r['peak_on_object'] for r in part), m)} | "
                         f"{wilson(sum(r['red_verdict'] == 'ok' for r in part), m)} | "
                         f"{wilson(sum(r['other_verdict'] == 'ok' for r in part), m)} |")
    return "\n".join(lines) + f"\n\n{n} pairs, seed {SEED}.\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    wrapper = QwenVLWrapper(*load_demo_model(), prompt="What shape is the red object?")
    rows = []
    for i, (images, red, sample) in enumerate(make_two_image_prompts(args.n, SEED)):
        for setting in SETTINGS:
            rows.append(dict(pair=i, **measure_pair(wrapper, images, red, sample, setting)))
        print(i, rows[-2]["red_share"], rows[-1]["red_share"], rows[-1]["answer"], flush=True)
    with open(os.path.join(HERE, "multi_image_demo.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(summary(rows, args.n))  # the table of multi_image_demo.md


if __name__ == "__main__":
    main()
