"""The faithfulness benchmark at full speed against the per-image path, as a ratio measured in the same run.

    python benchmarks/bench_benchmark.py                       # README's example on the demo model, then mid-size
    python benchmarks/bench_benchmark.py --models demo --n 4   # quicker
    python benchmarks/bench_benchmark.py --gil                 # does scipy's SuperLU release the GIL?
    python benchmarks/bench_benchmark.py --batch-sizes 1,4,8,16,32,56   # one row's images per batch size
    python benchmarks/bench_benchmark.py --batch-sizes 1,2,4,8,16 --mid-sizes 112,168,224,336 --mid-images 16

"before": the runner with ``batch_size=1`` and ``imputation_threads=1`` (every perturbed image through the model on
its own, the imputation systems solved one after the other, as grad-cam's metric classes do); "after": the defaults
(batches of ``auto_batch_size``: 16 images of 112x112, 1 of 448x448 on the CPU; one imputation thread per core). Both compute the same table (README's example:
methods GradCAM, HiResCAM, GradCAMPlusPlus, LayerCAM and RandomCAM, every layer, ROAD at the default percentiles,
deletion / insertion in 20 steps, the sanity check on); the script checks that the two per_sample.csv agree.

Models: the demo model on ``--n`` demo samples (112x112), and the mid-size random Qwen2.5-VL of bench_smooth.py
(8 decoder layers of width 512, 8 vision blocks of width 256) on ``--mid-n`` demo samples upscaled to 448x448 (no
answers: its target is its own next token), at ``--mid-layers`` (its 5 x 7 rows per sample at every layer would take
hours on two CPU cores).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from pytorch_grad_cam_vlm.benchmark.data import write_demo_dataset
from pytorch_grad_cam_vlm.benchmark.runner import BenchmarkOptions, run
from pytorch_grad_cam_vlm.metrics.road import impute_linear

METHODS = "GradCAM,HiResCAM,GradCAMPlusPlus,LayerCAM"
MID_SIZE = dict(text_layers=8, text_width=512, vision_blocks=8, vision_width=256, window_size=112,
                fullatt_block_indexes=(3, 7), heads=8, vision_heads=4)


def mid_size_model(folder: str) -> str:
    """The mid-size random model saved in ``folder`` with a processor that keeps 448x448 images as they are."""
    from pytorch_grad_cam_vlm import build_tiny_model

    _, processor = build_tiny_model(folder, seed=0, **MID_SIZE)
    processor.image_processor.size = {"shortest_edge": 448 * 448, "longest_edge": 448 * 448}
    processor.save_pretrained(folder)
    return folder


def upscaled_demo_data(folder: str, n: int, factor: int = 4) -> str:
    """``n`` demo samples at ``factor`` times their size (nearest), boxes scaled, without answers."""
    from PIL import Image

    source = write_demo_dataset(os.path.join(folder, "source"), n)
    path = os.path.join(folder, "data.jsonl")
    with open(source) as f, open(path, "w") as out:
        for line in f:
            row = json.loads(line)
            image = Image.open(os.path.join(folder, "source", row["image"]))
            name = os.path.join(folder, os.path.basename(row["image"]))
            image.resize((image.width * factor, image.height * factor), Image.NEAREST).save(name)
            scale = lambda boxes: [[v * factor for v in box] for box in boxes]
            out.write(json.dumps(dict(image=name, prompt=row["prompt"], boxes=scale(row["boxes"]),
                                      distractor_boxes=scale(row["distractor_boxes"]))) + "\n")
    return path


def timed_run(options: BenchmarkOptions):
    """Wall seconds, CPU seconds (all threads) and the per-sample rows of one benchmark run."""
    sink = io.StringIO()
    start, cpu = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        run(options)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    with open(os.path.join(options.out, "per_sample.csv")) as f:
        return wall, cpu, list(csv.DictReader(f))


def largest_difference(rows_a, rows_b) -> float:
    """The largest absolute difference of the numeric cells of two per-sample tables with the same rows."""
    worst = 0.0
    for a, b in zip(rows_a, rows_b, strict=True):
        for key, value in a.items():
            if key != "method" and value not in ("", "nan"):
                worst = max(worst, abs(float(value) - float(b[key])))
            else:
                assert value == b[key], (key, value, b[key])
    return worst


def speed(args) -> None:
    folder = tempfile.mkdtemp(prefix="bench_benchmark_")
    cases = []
    if "demo" in args.models:
        cases.append((f"demo model, {args.n} samples 112x112, every layer (3)", "demo",
                      write_demo_dataset(os.path.join(folder, "demo"), args.n), "all"))
    if "mid" in args.models:
        cases.append((f"mid-size random, {args.mid_n} sample(s) 448x448, layers {args.mid_layers}",
                      mid_size_model(os.path.join(folder, "mid_model")),
                      upscaled_demo_data(os.path.join(folder, "mid_data"), args.mid_n), args.mid_layers))
    print(f"torch {torch.get_num_threads()} thread(s); {len(os.sched_getaffinity(0))} cores; load average "
          f"{os.getloadavg()[0]:.2f} at the start\n")
    print("| case | before: wall (s) | before: CPU (s) | after: wall (s) | after: CPU (s) | wall ratio | CPU ratio "
          "| largest difference |")
    print("|---|---|---|---|---|---|---|---|")
    for name, model, data, layers in cases:
        results = {}
        for label, batch_size, threads in (("before", 1, 1), ("after", None, None)):
            options = BenchmarkOptions(model=model, data=data, out=os.path.join(folder, f"{name[:4]}_{label}"),
                                       methods=METHODS, layers=layers, batch_size=batch_size,
                                       imputation_threads=threads)
            results[label] = timed_run(options)
        (wall_b, cpu_b, rows_b), (wall_a, cpu_a, rows_a) = results["before"], results["after"]
        print(f"| {name} | {wall_b:.1f} | {cpu_b:.1f} | {wall_a:.1f} | {cpu_a:.1f} | {wall_b / wall_a:.2f}x | "
              f"{cpu_b / cpu_a:.2f}x | {largest_difference(rows_b, rows_a):.1e} |", flush=True)
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")


def gil() -> None:
    """A pure-Python counter thread runs while the main thread factors a 336x336 imputation system (splu), solves
    with it, holds the GIL in a Python loop, or sleeps: a call that held the GIL would stop the counter."""
    from scipy.sparse.linalg import splu

    from pytorch_grad_cam_vlm.metrics.road import nested_dissection_order, sparse_system

    size = 336
    rng = np.random.default_rng(0)
    mask = np.float32(rng.random((size, size)) < 0.1)
    a, b, unknown = sparse_system(mask, rng.normal(size=(3, size, size)))
    perm = nested_dissection_order(*np.divmod(unknown, size))
    system = a[perm][:, perm].tocsc()
    factor = [None]

    def counting(work) -> tuple:
        stop, count = [False], [0]

        def counter() -> None:
            while not stop[0]:
                count[0] += 1
        thread = threading.Thread(target=counter)
        thread.start()
        start = time.perf_counter()
        work()
        seconds = time.perf_counter() - start
        stop[0] = True
        thread.join()
        return seconds, count[0] / seconds

    def spin() -> None:
        end = time.perf_counter() + 1.0
        while time.perf_counter() < end:
            pass
    runs = {"sleep 1 s (releases the GIL)": lambda: time.sleep(1.0),
            "Python loop 1 s (holds the GIL)": spin,
            "splu: factor": lambda: factor.__setitem__(0, splu(system, permc_spec="NATURAL", diag_pivot_thresh=0.0)),
            "SuperLU.solve x 20": lambda: [factor[0].solve(b[perm]) for _ in range(20)]}
    print("| main thread runs | seconds | counter thread (M increments / s) |\n|---|---|---|")
    for name, work in runs.items():
        seconds, rate = counting(work)
        print(f"| {name} | {seconds:.2f} | {rate / 1e6:.2f} |", flush=True)
    print("\nOne row's 18 imputations (ROAD at 9 percentiles, MoRF and LeRF), 112x112 and 448x448:\n")
    print("| image | serial (s) | 2 threads (s) | ratio |\n|---|---|---|---|")
    for size in (112, 448):
        cam = np.kron(rng.random((size // 28, size // 28)), np.ones((28, 28)))
        image = rng.normal(size=(3, size, size)).astype(np.float32)
        masks = [np.float32(cam < np.percentile(cam, p)) for p in range(10, 100, 10)]
        masks += [np.float32(cam > np.percentile(cam, 100 - p)) for p in range(10, 100, 10)]
        start = time.perf_counter()
        for mask in masks:
            impute_linear(mask, image)
        serial = time.perf_counter() - start
        with ThreadPoolExecutor(2) as executor:
            start = time.perf_counter()
            list(executor.map(lambda m: impute_linear(m, image), masks))
            threaded = time.perf_counter() - start
        print(f"| {size}x{size} | {serial:.2f} | {threaded:.2f} | {serial / threaded:.2f}x |", flush=True)


def batch_sizes(sizes, mid_images: int, mid_sizes) -> None:
    """CPU milliseconds per image of one benchmark row's perturbed images through the model, per batch size: the
    demo model at 112x112, the mid-size model at each of ``mid_sizes``."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from pytorch_grad_cam_vlm import QwenVLWrapper
    from pytorch_grad_cam_vlm.demo import load_demo_model
    from pytorch_grad_cam_vlm.metrics.deletion_check import target_scores
    from pytorch_grad_cam_vlm.models.registry import load_model

    cases = [("demo model, 112x112, 56 images (one row)", load_demo_model(), 112, 56)]
    mid = load_model(mid_size_model(tempfile.mkdtemp(prefix="bench_benchmark_mid_")), "qwen2_5_vl", torch.float32,
                     torch.device("cpu"))
    cases += [(f"mid-size random, {size}x{size}, {mid_images} images", mid, size, mid_images) for size in mid_sizes]
    print("| model | " + " | ".join(f"batch {b}" for b in sizes) + " |\n|---|" + "---|" * len(sizes))
    for name, (model, processor), size, count in cases:
        processor.image_processor.size = {"shortest_edge": size * size, "longest_edge": size * size}
        wrapper = QwenVLWrapper(model, processor, "What shape is the red object?")
        images = wrapper.preprocess((np.random.RandomState(0).rand(size, size, 3) * 255).astype(np.uint8))
        images = images.repeat(count, 1, 1, 1) + 0.01 * torch.randn(count, 3, size, size)
        target_scores(wrapper, images[:2], ClassifierOutputTarget(1), 2)  # warm-up
        times = []  # CPU seconds per image (one torch thread: steadier than wall time on a shared machine)
        for batch_size in sizes:
            start = time.process_time()
            target_scores(wrapper, images, ClassifierOutputTarget(1), batch_size)
            times.append((time.process_time() - start) / count)
        print(f"| {name} | " + " | ".join(f"{1000 * t:.1f} ms ({times[0] / t:.2f}x)" for t in times) + " |",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="demo,mid", help="demo, mid or both")
    parser.add_argument("--n", type=int, default=16, help="demo samples (README's example: 16)")
    parser.add_argument("--mid-n", type=int, default=1, help="samples on the mid-size model")
    parser.add_argument("--mid-layers", default="6", help="layers on the mid-size model")
    parser.add_argument("--gil", action="store_true", help="measure whether SuperLU releases the GIL, and exit")
    parser.add_argument("--batch-sizes", help="measure these forward batch sizes, e.g. 1,4,8,16,32,64, and exit")
    parser.add_argument("--mid-images", type=int, default=16, help="images per batch-size measurement, mid-size")
    parser.add_argument("--mid-sizes", default="448", help="image sides of the mid-size batch-size measurement")
    args = parser.parse_args()
    if args.gil:
        gil()
    elif args.batch_sizes:
        batch_sizes([int(b) for b in args.batch_sizes.split(",")], args.mid_images,
                    [int(v) for v in args.mid_sizes.split(",")])
    else:
        speed(args)


if __name__ == "__main__":
    main()
