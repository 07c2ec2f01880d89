"""Check the crosses model and its occlusion reference on held-out samples.

Prints the answer accuracy, and for the occlusion map of the answer's logit (28-pixel windows, the causal
reference every other map is compared with): how often its peak lies on the cross (the evidence box widened by half
a token cell, 14 px), how often on a distractor, and its share of positive mass inside the cross's box. The boxes of
the task are "truth" only if occlusion points at the cross nearly always.

    python benchmarks/measure_crosses_occlusion.py                     # the shipped model, 200 test samples
    python benchmarks/measure_crosses_occlusion.py --model DIR --n 100
"""
from __future__ import annotations

import argparse
import time

import torch

from pytorch_grad_cam_vlm import QwenVLWrapper, energy_in_box, occlusion_map, pointing_hit
from pytorch_grad_cam_vlm.demo.crosses import CROSSES_MODEL_DIR, PROMPT, load_crosses_model, make_crosses_samples


def measure(model, processor, n: int = 200, window: int = 28, tolerance_px: float = 14, seed: int = 0) -> dict:
    """Accuracy and occlusion pointing / distractor / energy rates over ``n`` test samples of ``seed``."""
    wrapper = QwenVLWrapper(model, processor, PROMPT)
    token_id = processor.tokenizer.convert_tokens_to_ids
    correct, hits, distractor_hits, energy, hits_if_correct = 0, 0, 0, 0.0, 0
    start = time.time()
    for sample in make_crosses_samples(n, seed=seed, split="test"):
        x = wrapper.preprocess(sample.image)
        answer_id = token_id(sample.answer)
        with torch.no_grad():
            right = int(wrapper(x).argmax(-1)) == answer_id
        cam = occlusion_map(wrapper, x, answer_id, window=window)
        hit = pointing_hit(cam, sample.evidence_box, tolerance_px)
        correct += right
        hits += hit
        hits_if_correct += hit and right
        distractor_hits += any(pointing_hit(cam, box, tolerance_px) for box in sample.distractor_boxes)
        energy += energy_in_box(cam, sample.evidence_box)
    return dict(n=n, accuracy=correct / n, pointing=hits / n, distractor=distractor_hits / n, energy=energy / n,
                pointing_when_correct=hits_if_correct / max(1, correct), seconds=time.time() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=CROSSES_MODEL_DIR)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--window", type=int, default=28)
    parser.add_argument("--tolerance", type=float, default=14)
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out samples")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, processor = load_crosses_model(path=args.model)
    r = measure(model, processor, args.n, args.window, args.tolerance, args.seed)
    print(f"{r['n']} held-out samples: accuracy {r['accuracy']:.3f} | occlusion (window {args.window}) pointing "
          f"{r['pointing']:.3f}, on a distractor {r['distractor']:.3f}, energy in the cross's box "
          f"{r['energy']:.3f} | pointing among correct answers {r['pointing_when_correct']:.3f} "
          f"| {r['seconds']:.0f}s")


if __name__ == "__main__":
    main()
