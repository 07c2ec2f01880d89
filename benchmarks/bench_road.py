"""ROAD's cost at Qwen's resolutions: grad-cam's NoisyLinearImputer against this package's FastNoisyLinearImputer,
and the model forward passes that ROAD runs alongside.

    python benchmarks/bench_road.py            # prints a markdown table (benchmarks/road_imputation.md)
    python benchmarks/bench_road.py --orders --sizes 112x112,448x448   # the solver's order and panel size

Each image is imputed at the 9 percentiles of ROAD (10..90) with the mask MoRF makes from a CAM-like map (a random
token-grid map upsampled bilinearly, as a decoder-layer map is); LeRF removes the same pixel counts, so it costs the
same. Both imputers run with the same torch seed, and the table shows the largest difference of their outputs.

``--orders``: CPU seconds to assemble, order, factor and solve one map's 18 systems (MoRF and LeRF at ROAD's
percentiles), for a smooth map and a token-grid map (ties broken at random, as the benchmark does): each mask
ordered by its own nested dissection (leaf 64, the solver before issue 13), against the whole grid's order
(``dissection_rank``, computed once per size and not counted) by nested-dissection leaf size and SuperLU panel size.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import cv2
import numpy as np
import torch
from pytorch_grad_cam.metrics.road import NoisyLinearImputer

from pytorch_grad_cam_vlm.metrics.deletion_check import ranked_map
from pytorch_grad_cam_vlm.metrics.perturbation import road_masks
from pytorch_grad_cam_vlm.metrics.road import (PERCENTILES, FastNoisyLinearImputer, dissection_rank,
                                              nested_dissection_order, sparse_system)


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


def time_orders(height: int, width: int, leaves, panels, repeats: int) -> None:
    """Print the ``--orders`` table's rows for one image size."""
    from scipy.sparse.linalg import splu

    rng = np.random.default_rng(2)
    image = rng.normal(size=(3, height, width))
    maps = {"smooth": cam_like_map(height, width),
            "token grid": np.kron(rng.random((height // 28, width // 28)), np.ones((28, 28)))}
    for kind, cam in maps.items():
        masks = road_masks(ranked_map(cam, rng), PERCENTILES)

        def seconds(solve) -> float:
            start = time.process_time()
            for _ in range(repeats):
                for mask in masks:
                    solve(mask)
            return (time.process_time() - start) / repeats

        def per_mask(mask):
            a, b, pixels = sparse_system(mask, image)
            perm = nested_dissection_order(*np.divmod(pixels, width), 64)
            splu(a[perm][:, perm].tocsc(), permc_spec="NATURAL", diag_pivot_thresh=0.0).solve(b[perm])
        reference = seconds(per_mask)
        print(f"| {height}x{width} | {kind} | each mask's own, leaf 64 | SuperLU's | {reference:.3f} | 1.00x |")
        for leaf in leaves:
            rank = dissection_rank(height, width, leaf)
            for panel in panels:
                options = dict(panel_size=panel) if panel else {}

                def grid(mask):
                    a, b, _ = sparse_system(mask, image, rank=rank)
                    splu(a, permc_spec="NATURAL", diag_pivot_thresh=0.0, **options).solve(b)
                value = seconds(grid)
                panel_name = panel or "SuperLU's"
                print(f"| {height}x{width} | {kind} | the grid's, leaf {leaf} | {panel_name} | {value:.3f} | "
                      f"{reference / value:.2f}x |", flush=True)


def main() -> None:
    from pytorch_grad_cam_vlm.models.tiny.qwen_vl import build_tiny_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="448x448,700x1008", help="HxW image sizes, multiples of 28")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--orders", action="store_true", help="time the solver's orders and panel sizes instead")
    parser.add_argument("--leaves", default="4,8,16,64", help="--orders: nested-dissection leaf sizes")
    parser.add_argument("--panels", default="0,1", help="--orders: SuperLU panel sizes (0: SuperLU's default)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [tuple(int(v) for v in size.split("x")) for size in args.sizes.split(",")]
    if args.orders:
        print("CPU seconds per map (18 systems), one thread\n\n| image | map | order | panel size | seconds | "
              "speed-up |\n|---|---|---|---|---|---|")
        for height, width in sizes:
            time_orders(height, width, [int(v) for v in args.leaves.split(",")],
                        [int(v) for v in args.panels.split(",")], 3 if height * width < 100_000 else 1)
        return
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
