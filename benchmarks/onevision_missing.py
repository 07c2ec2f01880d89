"""Occlusion's reference on the OneVision development task, for the shipped model and for one retrained with
canvases without a red object (``usage_examples/train_tiled_model.py --model onevision --missing-rate 0.125``,
answer "none"), on the same held-out samples (``make_onevision_samples(n, seed)``): held-out accuracy, how often
occlusion's maximum lies on the red object and on a distractor, and its energy in the red object's box, scored as
``dev_models_gap.py`` scores them.

    python usage_examples/train_tiled_model.py --model onevision --missing-rate 0.125 --out /tmp/onevision_missing
    python benchmarks/onevision_missing.py --models shipped,/tmp/onevision_missing --n 200  # onevision_missing.md
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from auto_layer import sample_case
from dev_models_gap import score
from pytorch_grad_cam_vlm import occlusion_map
from pytorch_grad_cam_vlm.demo import tiled


def measure(path: str, n: int, seed: int) -> dict:
    """Accuracy and occlusion's scores of the OneVision model at ``path`` on ``n`` held-out samples."""
    model, processor = tiled.load_onevision_model(path=path)
    rows = []
    for sample in tiled.make_onevision_samples(n, seed=seed, split="test"):
        wrapper, x, target = sample_case(model, processor, sample)
        with torch.no_grad():
            correct = float(int(wrapper(x)[0].argmax()) == target.category)
        cam = wrapper.image_frame(sample.image.shape[:2], tuple(x.shape[2:])).to_image(
            occlusion_map(wrapper, x, target.category, window=tiled.OCCLUSION_WINDOW))
        rows.append(dict(accuracy=correct, **score(cam, sample, tiled.TOLERANCE)))
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="shipped", help="comma-separated folders; 'shipped': the package's")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                      "onevision_missing.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    lines = [f"OneVision development task, {args.n} held-out samples (seed {args.seed}); occlusion with 16-px "
             "windows, stride 8, scored on the picture (tolerance 8 px). Written by `python "
             f"benchmarks/onevision_missing.py --models {args.models} --n {args.n} --seed {args.seed}`.", "",
             "| model | accuracy | occlusion pointing | occlusion distractor | occlusion energy |",
             "|---|---|---|---|---|"]
    for name in args.models.split(","):
        path = tiled.ONEVISION_MODEL_DIR if name == "shipped" else name
        m = measure(path, args.n, args.seed)
        lines.append(f"| {name} | {m['accuracy']:.3f} | {m['pointing']:.3f} | {m['distractor']:.3f} | "
                     f"{m['energy']:.3f} |")
        print(lines[-1], flush=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
