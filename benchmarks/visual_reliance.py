"""Visual reliance (:mod:`pytorch_grad_cam_vlm.metrics.reliance`) on the trained development models, to set its threshold:
the share of the answer's logit lost when the whole image is replaced by its mean colour (and, reported, blurred), on
held-out samples; on the same samples with the image tokens zeroed at the projector's output (a model that answers
from the prompt alone); and on an all-black image.

    python benchmarks/visual_reliance.py 100           # held-out samples per model; writes visual_reliance.md
    python benchmarks/visual_reliance.py 100 demo,crosses,pairs,onevision,internvl,colors   # the models (default: all)
"""
from __future__ import annotations

import os
import sys

import numpy as np
import torch

from auto_layer import held_out, markdown, sample_case
from pytorch_grad_cam_vlm.layers import PROJECTOR, layer_modules
from pytorch_grad_cam_vlm.metrics.reliance import RELIANCE_THRESHOLD, visual_reliance

MODELS = "demo,crosses,pairs,onevision,internvl,colors"


def zero_projector(wrapper):
    """A hook that zeroes the projector's output: the decoder sees no image. Returns its handle."""
    projector, = layer_modules(wrapper, [PROJECTOR])
    return projector.register_forward_hook(lambda module, args, output: output * 0)


def main() -> None:
    n = int(sys.argv[1])
    models = sys.argv[2] if len(sys.argv) > 2 else MODELS
    torch.set_num_threads(1)
    rows = []
    for name in models.split(","):
        model, processor, samples = held_out(name, n)
        shares = {"held-out images": [], "image tokens zeroed": [], "all-black image": []}
        for sample in samples:
            wrapper, x, target = sample_case(model, processor, sample)
            shares["held-out images"].append(visual_reliance(wrapper, x, target))
            handle = zero_projector(wrapper)
            try:
                shares["image tokens zeroed"].append(visual_reliance(wrapper, x, target))
            finally:
                handle.remove()
            black = wrapper.preprocess(np.zeros((*x.shape[2:], 3), np.uint8))
            shares["all-black image"].append(visual_reliance(wrapper, black, target))
        for case, reliances in shares.items():
            values = np.array([abs(r.share) for r in reliances])
            rows.append(dict(model=name, images=case, n=len(values), min=float(values.min()),
                             p05=float(np.percentile(values, 5)), median=float(np.median(values)),
                             blur_median=float(np.median([abs(r.blur_share) for r in reliances])),
                             warned=float(np.mean(values < RELIANCE_THRESHOLD))))
    header = ("# Visual reliance on the trained development models\n\n"
              "|drop| / |clean logit| when the whole image is replaced by its mean colour, for the answer's logit "
              "(min, p05, median; `blur_median`: the same when the image is blurred, reported, not part of the rule); "
              f"`warned`: share below the threshold {RELIANCE_THRESHOLD}, before the deletion check's parts (explain "
              "warns only where none of them moves the target by as much either). Written "
              f"by `python benchmarks/visual_reliance.py {n} {models}` (CPU, 1 thread).")
    text = markdown(rows, header)
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "visual_reliance.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
