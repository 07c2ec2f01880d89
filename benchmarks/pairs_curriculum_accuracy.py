"""Accuracy of the shipped pairs model on its training-only questions: the demo's question about the red and the
blue object (the recipe's curriculum) and the canvases with one of the pair missing (answer "none"), on held-out
draws ("test" split, seeds 7 and 8), beside the comparison's held-out accuracy.

    python benchmarks/pairs_curriculum_accuracy.py --n 100     # prints a markdown table
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from pytorch_grad_cam_vlm import QwenVLWrapper
from pytorch_grad_cam_vlm.benchmark.localization import answer_accuracy
from pytorch_grad_cam_vlm.demo import pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, processor = pairs.load_pairs_model()
    test = pairs.SPLITS["test"]
    questions = {
        "comparison (held out)": pairs.make_pairs_samples(args.n, seed=0),
        "red object's shape": [pairs.make_pairs_sample(rng, asked=pairs.FIRST) for rng in
                               [np.random.default_rng([test, 7])] for _ in range(args.n)],
        "blue object's shape": [pairs.make_pairs_sample(rng, asked=pairs.SECOND) for rng in
                                [np.random.default_rng([test, 7])] for _ in range(args.n)],
        "one of the pair missing": [pairs.make_pairs_sample(rng, complete=False) for rng in
                                    [np.random.default_rng([test, 8])] for _ in range(args.n)],
    }
    print("| question | n | accuracy |\n|---|---|---|")
    for name, samples in questions.items():
        accuracy = answer_accuracy(QwenVLWrapper(model, processor, samples[0].prompt), samples)
        print(f"| {name} | {len(samples)} | {accuracy:.3f} |")


if __name__ == "__main__":
    main()
