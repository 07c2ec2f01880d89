"""The cost of ``explain``'s default (``auto``: every candidate method x layer, the maps checked by the staged choice),
its ``full`` and ``peak`` (``--fast``) choices, against one GradCAM call at a middle decoder layer and one forward pass
(and occlusion, 28-pixel windows every 14 pixels, with ``--occlusion``), on one 448x448 image, in the same run, with
the forward images per call (counted by a hook on the wrapper). Writes benchmarks/bench_auto.csv.

Models: the mid-size random Qwen2.5-VL of bench_smooth.py (8 decoder layers of width 512, 8 vision blocks of width
256) and the trained development models, whose processors are widened to keep 448x448 (they were trained at their
own canvas size; the cost does not depend on the weights): the Qwen ones (demo, crosses, pairs) take it as it is, the
tiled ones (onevision, internvl) as a 448x448 canvas of their 32-pixel tiles (:func:`tiled_at_size`).

    python benchmarks/bench_auto.py [--repeats 3] [--threads N] [--models "mid-size random,3b"] [--occlusion]
    python benchmarks/bench_auto.py --repeats 1 --models 3b --choices staged,peak --out benchmarks/bench_auto_3b.csv
    python benchmarks/bench_auto.py --repeats 1 --occlusion \
        --models "mid-size random,demo,crosses,pairs,onevision,internvl"
    python benchmarks/bench_auto.py --repeats 1 --occlusion --fallback --choices staged \
        --models "mid-size random,demo,crosses,pairs,onevision,internvl" --out benchmarks/bench_auto_fallback.csv
"""
from __future__ import annotations

import argparse
import copy
import csv
import os
import tempfile
import time

import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from auto_layer import tasks, tiled_tasks, wrap
from pytorch_grad_cam_vlm import QwenVLWrapper, build_tiny_model, occlusion_map
from pytorch_grad_cam_vlm.methods.auto import explain
from pytorch_grad_cam_vlm.methods.choice import occlusion_fallback

SIZE = 448
PROMPT = "What shape is the red object?"


def at_size(processor, size: int):
    """A copy of ``processor`` whose resize keeps ``size x size`` images as they are."""
    processor = copy.deepcopy(processor)
    processor.image_processor.size = {"shortest_edge": size * size, "longest_edge": size * size}
    return processor


def tiled_at_size(model, processor, size: int):
    """A copy of a tiled development model's ``processor`` that lays a ``size x size`` image on a ``size x size``
    canvas of its 32-pixel tiles: LLaVA-OneVision's one grid pinpoint (``model``'s config follows, as the model reads
    it there), InternVL's tiling up to ``(size / 32) ** 2`` tiles (it keeps its thumbnail)."""
    processor = copy.deepcopy(processor)
    image_processor = processor.image_processor
    if hasattr(image_processor, "image_grid_pinpoints"):
        image_processor.image_grid_pinpoints = model.config.image_grid_pinpoints = [[size, size]]
    else:
        image_processor.crop_to_patches, image_processor.min_patches = True, 1
        image_processor.max_patches = (size // image_processor.size["height"]) ** 2
    return processor


def best_time(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def forward_images(wrapper, run) -> int:
    """Images through ``wrapper`` during ``run()``, counted by a forward pre-hook."""
    counted = []
    hook = wrapper.register_forward_pre_hook(lambda module, args: counted.append(len(args[0])))
    try:
        run()
    finally:
        hook.remove()
    return sum(counted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--models", default="mid-size random,demo,crosses",
                        help="comma-separated: mid-size random, demo, crosses, 3b (Qwen2.5-VL-3B's published config, "
                             "random bf16 weights: about 9 GB, 4.6 s per forward image and 8.5 minutes per default "
                             "explain on the 2-core CPU, benchmarks/auto_cost.md)")
    parser.add_argument("--occlusion", action="store_true", help="also time occlusion (slow)")
    parser.add_argument("--fallback", action="store_true",
                        help="also time the occlusion fallback on the staged choice's map, as explain runs it where "
                             "that map fails (the dearest an image can cost)")
    parser.add_argument("--choices", default="staged,full,peak",
                        help="comma-separated explain choices to time (full costs the 3b model about 12 more minutes)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_auto.csv"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    image = (np.random.RandomState(0).rand(SIZE, SIZE, 3) * 255).astype(np.uint8)
    rows = []
    for name in args.models.split(","):
        model, processor = load(name)
        if name in tiled_tasks():  # a canvas of tiles, widened as the Qwen processors are to keep 448x448
            wrapper = wrap(model, tiled_at_size(model, processor, SIZE), PROMPT)
        else:
            wrapper = QwenVLWrapper(model, at_size(processor, SIZE), prompt=PROMPT)
        x = wrapper.preprocess(image)
        assert x.shape[2:] == (SIZE, SIZE), x.shape
        with torch.no_grad():
            token = int(wrapper(x).argmax())
        target = [ClassifierOutputTarget(token)]
        layer = wrapper.decoder_layers[len(wrapper.decoder_layers) // 2]
        row = dict(model=name, decoder_layers=len(wrapper.decoder_layers), threads=torch.get_num_threads(),
                   canvas=f"{x.shape[2]}x{x.shape[3]}")

        def forward():
            with torch.no_grad():
                wrapper(x)

        def gradcam():
            with GradCAM(model=wrapper, target_layers=[layer], reshape_transform=wrapper.reshape_transform) as cam:
                cam(input_tensor=x, targets=target)

        row["forward_s"] = best_time(forward, args.repeats)
        row["gradcam_s"] = best_time(gradcam, args.repeats)
        for choice in args.choices.split(","):
            run = lambda: explain(wrapper, x, target, choice=choice)  # noqa: E731
            # the first timed call also counts the images (a hook costs nothing next to a forward pass)
            start = time.perf_counter()
            row[f"{choice}_images"] = forward_images(wrapper, run)
            first = time.perf_counter() - start
            row[f"{choice}_s"] = min(first, best_time(run, args.repeats - 1)) if args.repeats > 1 else first
            row[f"{choice}_per_gradcam"] = row[f"{choice}_s"] / row["gradcam_s"]
            row[f"{choice}_per_forward"] = row[f"{choice}_s"] / row["forward_s"]
        if args.fallback:
            kept = explain(wrapper, x, target).checks[0]
            run = lambda: occlusion_fallback(wrapper, x, target[0], kept)  # noqa: E731
            row["fallback_images"] = forward_images(wrapper, run)
            row["fallback_s"] = best_time(run, args.repeats)
        if args.occlusion:
            row["occlusion_s"] = best_time(lambda: occlusion_map(wrapper, x, token, window=28, stride=14), 1)
            row["staged_per_occlusion"] = row["staged_s"] / row["occlusion_s"]
            if args.fallback:
                row["staged_with_fallback_per_occlusion"] = (row["staged_s"] + row["fallback_s"]) / row["occlusion_s"]
        rows.append(row)
        print(row, flush=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out}")


def load(name: str):
    """(model, processor) of a benchmark model by name."""
    if name == "mid-size random":
        return build_tiny_model(tempfile.mkdtemp(prefix="bench_auto_"), seed=0, text_layers=8, text_width=512,
                                vision_blocks=8, vision_width=256, window_size=112, fullatt_block_indexes=(3, 7),
                                heads=8, vision_heads=4)
    if name == "3b":
        from bench_gpu import build_model

        return build_model("3b", torch.device("cpu"), torch.bfloat16)
    load_model, _ = {**tasks(), **tiled_tasks()}[name]
    return load_model()


if __name__ == "__main__":
    main()
