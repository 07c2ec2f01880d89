"""The deletion check's batch size: time per checked map for batch sizes 1..32 on the two trained demo models and
the mid-size random model at 448x448, as ratios to batch size 1 measured in the same run.

    python benchmarks/bench_check_batch.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from auto_layer import tasks
from bench_auto import at_size
from pytorch_grad_cam_vlm import QwenVLWrapper, build_tiny_model, check_maps

BATCH_SIZES = (1, 4, 8, 16, 32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    subjects = {}
    for name, (load, make) in tasks().items():
        model, processor = load()
        sample = make(1, seed=0, split="test")[0]
        wrapper = QwenVLWrapper(model, processor, sample.prompt)
        subjects[name] = (wrapper, wrapper.preprocess(sample.image))
    model, processor = build_tiny_model(tempfile.mkdtemp(), seed=0, text_layers=8, text_width=512, vision_blocks=8,
                                        vision_width=256, window_size=112, fullatt_block_indexes=(3, 7), heads=8,
                                        vision_heads=4)
    wrapper = QwenVLWrapper(model, at_size(processor, 448), prompt="What shape is the red object?")
    subjects["mid-size random, 448x448"] = (wrapper, wrapper.preprocess(
        (np.random.RandomState(0).rand(448, 448, 3) * 255).astype(np.uint8)))
    print("| model | " + " | ".join(f"batch {b}" for b in BATCH_SIZES) + " |")
    print("|---|" + "---|" * len(BATCH_SIZES))
    for name, (wrapper, x) in subjects.items():
        maps = np.random.RandomState(0).rand(8, *x.shape[2:]).astype(np.float32)
        target = ClassifierOutputTarget(1)
        times = []
        for batch_size in BATCH_SIZES:
            best = float("inf")
            for _ in range(args.repeats):
                start = time.perf_counter()
                check_maps(wrapper, x, maps, target, batch_size=batch_size)
                best = min(best, time.perf_counter() - start)
            times.append(best / len(maps))
        print(f"| {name} | " + " | ".join(f"{1000 * t:.1f} ms ({times[0] / t:.2f}x)" for t in times) + " |",
              flush=True)


if __name__ == "__main__":
    main()
