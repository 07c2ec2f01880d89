"""ROAD's cost at Qwen's resolutions: grad-cam's NoisyLinearImputer against this package's FastNoisyLinearImputer,
and the model forward passes that ROAD runs alongside.

    python benchmarks/bench_road.py            # prints a markdown table (benchmarks/road_imputation.md)

Each image is imputed at the 9 percentiles of ROAD (10..90) with the mask MoRF makes from a CAM-like map (a random
token-grid map upsampled bilinearly, as a decoder-layer map is); LeRF removes the same pixel counts, so it costs the
same. Both imputers run with the same torch seed, and the table shows the largest difference of their outputs.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import cv2
import numpy as np
import torch
from pytorch_grad_cam.metrics.road import NoisyLinearImputer

from pytorch_grad_cam_vlm.metrics.road import PERCENTILES, FastNoisyLinearImputer


def cam_like_map(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return cv2.resize(rng.random((height // 28, width // 28)).astype(np.float32), (width, height))


def time_imputers(height: int, width: int):
    """Seconds of each imputer over the 9 percentiles, and the largest output difference."""
    image = torch.from_numpy(np.random.default_rng(1).normal(size=(3, height, width)).astype(np.float32))
    cam = cam_like_map(height, width)
    seconds = {"grad-cam": 0.0, "fast": 0.0}
    difference = 0.0
    for percentile in PERCENTILES:
        mask = torch.from_numpy(np.float32(cam < np.percentile(cam, percentile)))  # RemoveMostRelevantFirst's mask
        outputs = {}
        for name, imputer in (("grad-cam", NoisyLinearImputer()), ("fast", FastNoisyLinearImputer())):
            torch.manual_seed(percentile)
            start = time.perf_counter()
            outputs[name] = imputer(image, mask)
            seconds[name] += time.perf_counter() - start
        difference = max(difference, (outputs["grad-cam"] - outputs["fast"]).abs().max().item())
    return seconds, difference


def time_forward(model, processor, height: int, width: int, repeats: int = 3) -> float:
    """Seconds of one forward pass of the wrapper on one image (the best of ``repeats``)."""
    from pytorch_grad_cam_vlm import QwenVLWrapper

    wrapper = QwenVLWrapper(model, processor, prompt="What color is the circle?")
    x = torch.randn(1, 3, height, width)
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            wrapper(x)
            best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    from pytorch_grad_cam_vlm.models.tiny.qwen_vl import build_tiny_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="448x448,700x1008", help="HxW image sizes, multiples of 28")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [tuple(int(v) for v in size.split("x")) for size in args.sizes.split(",")]
    # A small random Qwen2.5-VL (26M parameters) whose processor keeps these sizes: the forward pass ROAD pays for.
    model, processor = build_tiny_model(tempfile.mkdtemp(), text_layers=8, text_width=512, vision_blocks=8,
                                        vision_width=256, heads=8, vision_heads=4)
    processor.image_processor.size = {"shortest_edge": 56 * 56, "longest_edge": max(h * w for h, w in sizes)}
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"torch threads {torch.get_num_threads()}; forward: random Qwen2.5-VL of {params:.0f}M parameters\n")
    print("| image (HxW) | pixels | grad-cam imputer, 9 percentiles (s) | fast imputer (s) | speed-up | max abs "
          "difference | one forward pass (s) | ROAD forward passes, MoRF+LeRF (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for height, width in sizes:
        seconds, difference = time_imputers(height, width)
        forward = time_forward(model, processor, height, width)
        print(f"| {height}x{width} | {height * width} | {seconds['grad-cam']:.1f} | {seconds['fast']:.1f} | "
              f"{seconds['grad-cam'] / seconds['fast']:.1f}x | {difference:.1e} | {forward:.2f} | "
              f"{2 * len(PERCENTILES) * forward:.1f} |", flush=True)


if __name__ == "__main__":
    main()
