"""The localization table of the demo model on held-out samples (benchmarks/localization_table.md and .csv).

    python benchmarks/localization_table.py --n 200 --out benchmarks/
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

import torch

from pytorch_grad_cam_vlm import QwenVLWrapper, auto_layer, load_demo_model, make_demo_samples
from pytorch_grad_cam_vlm.benchmark.localization import (answer_accuracy, best_gradient_row, default_methods,
                                                         localization_table, write_table)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Localization table of the demo model on held-out samples.")
    parser.add_argument("--n", type=int, default=200, help="held-out samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks")
    parser.add_argument("--methods", nargs="*", help="subset of method names (default: all)")
    parser.add_argument("--smooth-grad-samples", type=int, default=8, help="noisy copies per SmoothGradCAM map")
    args = parser.parse_args(argv)
    model, processor = load_demo_model()
    samples = make_demo_samples(args.n, seed=args.seed, split="test")
    wrapper = QwenVLWrapper(model, processor, samples[0].prompt)
    methods = default_methods(args.smooth_grad_samples)
    if args.methods:
        methods = {k: v for k, v in methods.items() if k in args.methods}
    accuracy = answer_accuracy(wrapper, samples)
    rows = localization_table(wrapper, samples, methods, progress=True)
    best = best_gradient_row(rows)
    occlusion = next(r for r in rows if r["method"] == "Occlusion")
    header = (f"Demo model, {args.n} held-out samples (split 'test', seed {args.seed}), answer accuracy "
              f"{accuracy:.3f}; pointing tolerance half a token cell (14 px); CPU, {torch.get_num_threads()} threads.\n"
              f"Best gradient method: {best['method']} at layer {best['layer']} (pointing {best['pointing']:.3f}, "
              f"distractor {best['distractor']:.3f}, {occlusion['seconds_per_map'] / best['seconds_per_map']:.0f}x "
              f"cheaper than occlusion); auto layer: {auto_layer(wrapper)}.\n\n")
    md_path, csv_path = write_table(rows, args.out, header)
    print(header + f"wrote {md_path} and {csv_path}")


if __name__ == "__main__":
    main()
