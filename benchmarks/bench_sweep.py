"""One-pass layer sweep against one layer and against a loop over layers, on the mid-size benchmark model.

Mid-size benchmark model: a random Qwen2.5-VL with 8 decoder layers of width 512 and a vision encoder of 8 blocks of
width 256 (windows of 112 px, blocks 3 and 7 global), one 448x448 image (256 image tokens). The 7 usable decoder
layers are 0..6 (the last layer's image positions get no gradient). Each round, after a warm-up, times in turn:

- the forward pass alone (no gradient);
- one layer: a single-layer call at each usable layer;
- the sweep: ``layer_sweep(method)`` on the 7 layers at once (one forward, one backward);

and the loop over the 7 layers is that round's sum of single-layer calls. Each call is timed twice: wall-clock time
and the CPU time of this process (all its threads), which other processes on a shared machine disturb much less.
Every figure is the minimum over ``--rounds`` rounds, and interleaving keeps a slow spell from favouring one side.
About 30 calls of the model: 1-2 minutes on 2 idle CPU cores.

    python benchmarks/bench_sweep.py            # GradCAM, 3 rounds, 2 threads
    python benchmarks/bench_sweep.py --method SmoothGradCAM --n-samples 4
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import numpy as np
import torch
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from pytorch_grad_cam_vlm import QwenVLWrapper, build_tiny_model
from pytorch_grad_cam_vlm.methods.catalog import is_smooth, resolve_method
from pytorch_grad_cam_vlm.methods.sweep import layer_sweep, select_layers

MID_SIZE = dict(text_layers=8, text_width=512, vision_blocks=8, vision_width=256, window_size=112,
                fullatt_block_indexes=(3, 7), heads=8, vision_heads=4)
IMAGE_SIZE = 448  # the tiny processor's max_pixels is 28*28*256 = 448*448


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def seconds(run) -> dict:
    """Wall-clock and CPU seconds of ``run()``."""
    start = {name: clock() for name, clock in CLOCKS.items()}
    run()
    return {name: clock() - start[name] for name, clock in CLOCKS.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="GradCAM")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-samples", type=int, default=4, help="noisy copies, for Smooth methods")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    method = resolve_method(args.method)
    options = {"n_samples": args.n_samples, "seed": 0} if is_smooth(method) else {}

    model, processor = build_tiny_model(tempfile.mkdtemp(prefix="bench_sweep_"), seed=0, **MID_SIZE)
    wrapper = QwenVLWrapper(model, processor, prompt="What color is the circle?")
    image = (np.random.RandomState(0).rand(IMAGE_SIZE, IMAGE_SIZE, 3) * 255).astype(np.uint8)
    x = wrapper.preprocess(image)
    with torch.no_grad():
        targets = [ClassifierOutputTarget(int(wrapper(x).argmax()))]
    layers = select_layers(len(wrapper.decoder_layers), "all")
    sweep_cls = layer_sweep(method)

    def call(cls, indices):
        with cls(model=wrapper, target_layers=[wrapper.decoder_layers[i] for i in indices],
                 reshape_transform=wrapper.reshape_transform, **options) as cam:
            return cam(x, targets)

    call(sweep_cls, layers)  # warm-up
    rounds = []
    for _ in range(args.rounds):
        with torch.no_grad():
            forward = seconds(lambda: wrapper(x))
        one = {i: seconds(lambda: call(method, [i])) for i in layers}
        rounds.append(dict(forward=forward, one=one, sweep=seconds(lambda: call(sweep_cls, layers))))

    print(f"{method.__name__} on a random Qwen2.5-VL (8 decoder layers x 512, 8 vision blocks x 256), one "
          f"{x.shape[2]}x{x.shape[3]} image, CPU with {torch.get_num_threads()} threads, min of {args.rounds} rounds:")
    for clock in CLOCKS:
        forward = min(r["forward"][clock] for r in rounds)
        one = {i: min(r["one"][i][clock] for r in rounds) for i in layers}
        sweep = min(r["sweep"][clock] for r in rounds)
        loop = min(sum(r["one"][i][clock] for i in layers) for r in rounds)
        typical = statistics.median(one.values())
        print(f"{clock} time, seconds: forward pass alone (no grad) {forward:.2f}; one layer "
              + ", ".join(f"L{i} {t:.2f}" for i, t in one.items()) + f"; sweep of {len(layers)} layers {sweep:.2f}; "
              f"loop over {len(layers)} layers {loop:.2f}")
        print(f"  sweep / one layer: {sweep / typical:.2f}x (median layer), {sweep / one[layers[0]]:.2f}x "
              f"(L{layers[0]}, the sweep's backward depth); loop / one layer: {loop / typical:.2f}x; "
              f"loop / sweep: {loop / sweep:.2f}x")


if __name__ == "__main__":
    main()
