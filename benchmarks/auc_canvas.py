"""How much of the target's probability each deletion / insertion canvas keeps, on the two development models: the
measurement behind the default ``--auc-protocol`` and the saturation guard's threshold (``auc_canvas.md``).

    python benchmarks/auc_canvas.py --n 32

For each held-out sample: the target's (the answer's first token) softmax probability on the clean image and on
each canvas of :mod:`pytorch_grad_cam_vlm.metrics.auc_protocols`, the share of it the canvas keeps, and whether the
canvas changes the model's top answer.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from auto_layer import held_out, sample_case, tasks  # noqa: E402

from pytorch_grad_cam_vlm.metrics.auc_protocols import CANVASES, canvas  # noqa: E402


def measure(name: str, n: int) -> dict:
    """canvas -> (kept shares, answer kept) over ``n`` held-out samples of model ``name``."""
    model, processor, samples = held_out(name, n)
    kept = {c: [] for c in CANVASES}
    same = {c: [] for c in CANVASES}
    for sample in samples:
        wrapper, x, target = sample_case(model, processor, sample)
        images = torch.cat([x] + [canvas(x, c, wrapper.image_mean, wrapper.image_std) for c in CANVASES])
        with torch.no_grad():
            probabilities = torch.softmax(wrapper(images).float(), -1)
        clean = probabilities[0, target.category]
        top = int(probabilities[0].argmax())
        for i, c in enumerate(CANVASES, 1):
            kept[c].append(float(probabilities[i, target.category] / clean))
            same[c].append(int(probabilities[i].argmax()) == top)
    return {c: (np.array(kept[c]), np.array(same[c])) for c in CANVASES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=32, help="held-out samples per model")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"Share of the target's probability each canvas keeps ({args.n} held-out samples per model; "
          f"`python benchmarks/auc_canvas.py --n {args.n}`).\n")
    print("| model | canvas | median kept | samples keeping < 0.1 | 0.1 to 0.5 | 0.5 to 0.9 | >= 0.9 | "
          "top answer unchanged |")
    print("|---|---|---|---|---|---|---|---|")
    for name in tasks():
        for c, (kept, same) in measure(name, args.n).items():
            bins = np.histogram(kept, [0, 0.1, 0.5, 0.9, np.inf])[0] / len(kept)
            print(f"| {name} | {c} | {np.median(kept):.3f} | " + " | ".join(f"{b:.2f}" for b in bins)
                  + f" | {same.mean():.2f} |")


if __name__ == "__main__":
    main()
