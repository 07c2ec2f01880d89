"""SmoothGradCAM against the loop a user writes today, on a mid-size random Qwen2.5-VL (CPU).

Model: 8 decoder layers of width 512, a vision encoder of 8 blocks of width 256 (windows of 112 pixels, blocks 3 and
7 global), one 448x448 image (1024 patches, 256 image tokens), target layer: decoder layer 6 of 8.

  (a)  SmoothGradCAM, n noisy copies, in batches of --batch-sizes (the first one is the reported (a)).
  (b)  the loop a user writes today: n calls of grad-cam's GradCAM on noisy copies, through a wrapper built with
       efficient_gradients=False: parameters requiring grad as loaded, the whole graph built and every weight
       gradient computed.
  (b') the same loop through the default wrapper (efficient_gradients=True: frozen parameters, graph from the layer).
  (c)  one plain GradCAM call through the default wrapper.

Peak memory: the process's peak resident set size (VmHWM) during each run, minus its resident size just before,
read from /proc/self/status; the peak is reset before each run by writing 5 to /proc/self/clear_refs, and glibc is
asked to return freed memory first (malloc_trim). Linux only; it counts everything the process touches (model
activations, autograd buffers, numpy maps).

Usage: python benchmarks/bench_smooth.py [--n-samples 16] [--repeats 2] [--threads N]
"""
from __future__ import annotations

import argparse
import ctypes
import re
import tempfile
import time
from typing import Callable, Tuple

import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from pytorch_grad_cam_vlm import QwenVLWrapper, build_tiny_model
from pytorch_grad_cam_vlm.methods.smooth_grad import SmoothGradCAM

NOISE_LEVEL = 0.15
SEED = 0


def resident_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"{field}:\s+(\d+)", status.read()).group(1))


def measure(run: Callable[[], np.ndarray], repeats: int) -> Tuple[float, float, float, np.ndarray]:
    """Best wall time and best CPU time (all threads) over ``repeats`` runs (seconds), peak extra resident memory
    (MiB), and the map. CPU time is the steadier measure on a machine shared with other work."""
    times, cpu_times, peaks = [], [], []
    for _ in range(repeats):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # reset VmHWM to the current resident size
        before = resident_kib("VmRSS")
        start, cpu_start = time.perf_counter(), time.process_time()
        result = run()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        peaks.append((resident_kib("VmHWM") - before) / 1024)
    return min(times), min(cpu_times), max(peaks), result


def noisy_copies(x: torch.Tensor, n_samples: int) -> list:
    """The noise SmoothGrad draws: std = NOISE_LEVEL x (max - min) of the input, copy after copy from one seed."""
    generator = torch.Generator().manual_seed(SEED)
    spread = NOISE_LEVEL * (x.max() - x.min())
    return [x + spread * torch.randn(x.shape, generator=generator) for _ in range(n_samples)]


def user_loop(wrapper: QwenVLWrapper, layer: torch.nn.Module, x: torch.Tensor, targets, n_samples: int):
    """What a user writes today: GradCAM on each noisy copy, maps averaged."""
    with GradCAM(model=wrapper, target_layers=[layer], reshape_transform=wrapper.reshape_transform) as cam:
        maps = [cam(copy, targets) for copy in noisy_copies(x, n_samples)]
    return scale_cam_image(np.mean(maps, axis=0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-samples", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each measurement; the best time is kept")
    parser.add_argument("--batch-sizes", default="8,1", help="SmoothGradCAM batch sizes; the first is (a)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    n = args.n_samples

    model, processor = build_tiny_model(tempfile.mkdtemp(prefix="bench_smooth_"), seed=0, text_layers=8,
                                        text_width=512, vision_blocks=8, vision_width=256, window_size=112,
                                        fullatt_block_indexes=(3, 7), heads=8, vision_heads=4)
    prompt = "What color is the circle?"
    efficient = QwenVLWrapper(model, processor, prompt=prompt)
    as_loaded = QwenVLWrapper(model, processor, prompt=prompt, efficient_gradients=False)
    image = (np.random.RandomState(0).rand(448, 448, 3) * 255).astype(np.uint8)
    x = efficient.preprocess(image)
    with torch.no_grad():
        targets = [ClassifierOutputTarget(int(efficient(x).argmax()))]
    layer_index = len(efficient.decoder_layers) - 2
    layer = efficient.decoder_layers[layer_index]
    parameters = sum(p.numel() for p in model.parameters())
    print(f"Qwen2.5-VL, random weights: {parameters / 1e6:.1f} M parameters, 8 decoder layers x 512, 8 vision blocks "
          f"x 256; image {tuple(x.shape)}; target: decoder layer {layer_index}; n_samples={n}; "
          f"{torch.get_num_threads()} CPU threads.")

    def smooth(batch_size: int) -> Callable[[], np.ndarray]:
        def run():
            with SmoothGradCAM(model=efficient, target_layers=[layer], reshape_transform=efficient.reshape_transform,
                               n_samples=n, noise_level=NOISE_LEVEL, seed=SEED, batch_size=batch_size) as cam:
                return cam(x, targets)
        return run

    def plain() -> np.ndarray:
        with GradCAM(model=efficient, target_layers=[layer], reshape_transform=efficient.reshape_transform) as cam:
            return cam(x, targets)

    plain()  # warm-up: first-call allocations and the layout cache
    results = {}
    for batch_size in batch_sizes:
        results[f"(a) SmoothGradCAM, batch_size={batch_size}"] = measure(smooth(batch_size), args.repeats)
    results["(b) loop of GradCAM, wrapper efficient_gradients=False"] = measure(
        lambda: user_loop(as_loaded, layer, x, targets, n), args.repeats)
    model.zero_grad(set_to_none=True)  # grad-cam left weight gradients on the parameters
    results["(b') loop of GradCAM, default wrapper"] = measure(lambda: user_loop(efficient, layer, x, targets, n),
                                                               args.repeats)
    results["(c) one GradCAM call, default wrapper"] = measure(plain, args.repeats)

    print(f"\n{'run':56s} {'wall (s)':>9s} {'CPU (s)':>9s} {'peak extra RSS (MiB)':>21s}")
    for name, (seconds, cpu_seconds, peak, _) in results.items():
        print(f"{name:56s} {seconds:9.2f} {cpu_seconds:9.2f} {peak:21.0f}", flush=True)
    names = list(results)
    a, b, b_efficient, c = (results[k] for k in (names[0], names[-3], names[-2], names[-1]))
    for label, i in (("wall", 0), ("CPU", 1)):
        print(f"\n{label} time: (b)/(a) = {b[i] / a[i]:.2f} (target >= 2.5: vs the loop with parameters as loaded), "
              f"(b')/(a) = {b_efficient[i] / a[i]:.2f} (vs the loop through the default, efficient wrapper), "
              f"(a)/(c) = {a[i] / c[i]:.2f} (vs one GradCAM call)")
    print(f"\nmax |(a) - (b')| = {np.abs(a[3] - b_efficient[3]).max():.4f} (same noisy copies; the loop averages "
          "final maps, which grad-cam renormalises once more after its resize)")


if __name__ == "__main__":
    main()
