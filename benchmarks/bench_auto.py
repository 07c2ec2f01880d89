"""The cost of ``auto`` (every candidate method x layer, each map checked) against occlusion (28-pixel windows every
14 pixels, the reference it is meant to replace), on one 448x448 image, as a ratio measured in the same run.

Models: the mid-size random Qwen2.5-VL of bench_smooth.py (8 decoder layers of width 512, 8 vision blocks of width
256) and the trained demo models, whose processors are widened to accept 448x448 (they were trained at their own
canvas size; the cost does not depend on the weights).

    python benchmarks/bench_auto.py [--repeats 3] [--threads N]
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time

import numpy as np
import torch
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from auto_layer import tasks
from pytorch_grad_cam_vlm import QwenVLWrapper, build_tiny_model, occlusion_map
from pytorch_grad_cam_vlm.methods.auto import explain

SIZE = 448


def at_size(processor, size: int):
    """A copy of ``processor`` whose resize keeps ``size x size`` images as they are."""
    processor = copy.deepcopy(processor)
    processor.image_processor.size = {"shortest_edge": size * size, "longest_edge": size * size}
    return processor


def best_time(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = {"mid-size random": build_tiny_model(tempfile.mkdtemp(prefix="bench_auto_"), seed=0, text_layers=8,
                                                  text_width=512, vision_blocks=8, vision_width=256,
                                                  window_size=112, fullatt_block_indexes=(3, 7), heads=8,
                                                  vision_heads=4)}
    for name, (load, make) in tasks().items():
        models[name] = load()
    image = (np.random.RandomState(0).rand(SIZE, SIZE, 3) * 255).astype(np.uint8)
    print("| model | decoder layers | auto: methods x layers | auto s | occlusion s | occlusion / auto |")
    print("|---|---|---|---|---|---|")
    for name, (model, processor) in models.items():
        wrapper = QwenVLWrapper(model, at_size(processor, SIZE), prompt="What shape is the red object?")
        x = wrapper.preprocess(image)
        assert x.shape[2:] == (SIZE, SIZE), x.shape
        with torch.no_grad():
            token = int(wrapper(x).argmax())
        target = [ClassifierOutputTarget(token)]
        result = explain(wrapper, x, target)
        auto = best_time(lambda: explain(wrapper, x, target), args.repeats)
        occlusion = best_time(lambda: occlusion_map(wrapper, x, token, window=28, stride=14), 1)
        print(f"| {name} | {len(wrapper.decoder_layers)} | {len(result.candidate_methods)} x "
              f"{len(result.candidate_layers)} | {auto:.2f} | {occlusion:.2f} | {occlusion / auto:.1f} |", flush=True)


if __name__ == "__main__":
    main()
