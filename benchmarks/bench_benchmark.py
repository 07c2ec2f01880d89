"""The faithfulness benchmark at full speed against the per-image path, as a ratio measured in the same run.

    python benchmarks/bench_benchmark.py                       # README's example on the demo model, then mid-size
    python benchmarks/bench_benchmark.py --models demo --n 4   # quicker
    python benchmarks/bench_benchmark.py --models demo --whole-processes    # each run as a command of its own
    python benchmarks/bench_benchmark.py --gil                 # does scipy's SuperLU release the GIL?
    python benchmarks/bench_benchmark.py --overlap             # imputation beside the model: threads, processes
    python benchmarks/bench_benchmark.py --batch-sizes 1,4,8,16,32,56   # one row's images per batch size
    python benchmarks/bench_benchmark.py --batch-sizes 1,2,4,8,16 --mid-sizes 112,168,224,336 --mid-images 16
    python benchmarks/bench_benchmark.py --gpu 3b --rows 100   # on CUDA: GPU imputation, 100 rows of a 3B model
    python benchmarks/bench_benchmark.py --gpu tiny --device cpu --rows 10 --before-rows 5   # that, checked on a CPU
    python benchmarks/bench_benchmark.py --against 824a007      # README's example here against another commit

"before": the runner with ``batch_size=1`` and ``imputation_threads=1`` (every perturbed image through the model on
its own, the imputation systems solved one after the other, as grad-cam's metric classes do); "after": the defaults
(batches of ``auto_batch_size``: 16 images of 112x112, 1 of 448x448 on the CPU; one imputation thread per core,
solving while the model runs). Both compute the same table (README's example: methods GradCAM, HiResCAM,
GradCAMPlusPlus, LayerCAM and RandomCAM, every layer, ROAD at the default percentiles, deletion / insertion in 20
steps, the sanity check on); the script checks that the two per_sample.csv agree.

Models: the demo model on ``--n`` demo samples (112x112), and the mid-size random Qwen2.5-VL of bench_smooth.py
(8 decoder layers of width 512, 8 vision blocks of width 256) on ``--mid-n`` demo samples upscaled to 448x448 (no
answers: its target is its own next token), at ``--mid-layers`` (its 5 x 7 rows per sample at every layer would take
hours on two CPU cores).

``--against REV``: README's example (the demo model, ``--n`` samples, the defaults) at this checkout and at commit
``REV`` (a git worktree), each as its own process importing its own package, taking turns ``--repeats`` times; the
wall seconds of each ``run`` (model load included, imports not) and this checkout's cost as a share of REV's, from the
medians. It answers "how much did a change add?" within one run.

``--gpu 3b`` (or 7b; tiny checks the script on a CPU) measures on ``--device``:
1. ROAD's imputation of one row (9 percentiles, MoRF and LeRF: 18 masks of a token-grid map) at each of ``--sizes``:
   the CPU's direct solver (sparse LU, one thread, and one thread per core) against batched conjugate gradients on
   the device (:func:`~pytorch_grad_cam_vlm.metrics.road_cg.impute_cg`), and the largest difference of the
   noise-free solutions.
2. ``--rows`` benchmark rows (4 methods + RandomCAM at the middle decoder layer, ROAD, deletion / insertion, the
   sanity check) of bench_gpu.py's random bf16 model of that config, saved and loaded back as a checkpoint, on demo
   samples upscaled to 448x448: "before" (``--before-rows`` rows, one image per forward pass, the direct solver on one
   thread, as grad-cam's metric classes run) against "after" (the defaults: batches of 16 on CUDA, conjugate
   gradients on the GPU), as seconds per row, and the largest difference of the rows the two share.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import csv
import io
import json
import os
import pstats
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


def timed_process(options: BenchmarkOptions):
    """:func:`timed_run` as a whole process: the ``benchmark`` command with ``options``, the model load and the
    imports included (CPU seconds: the child's)."""
    import resource
    import subprocess
    import sys

    command = [sys.executable, "-m", "pytorch_grad_cam_vlm", "benchmark", "--model", options.model, "--data",
               options.data, "--out", options.out, "--methods", options.methods, "--layers", options.layers]
    for flag, value in (("--batch-size", options.batch_size), ("--imputation-threads", options.imputation_threads)):
        command += [flag, str(value)] if value is not None else []
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(os.path.join(options.out, "per_sample.csv")) as f:
        return wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, list(csv.DictReader(f))


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
            results[label] = timed_process(options) if args.whole_processes else timed_run(options)
        (wall_b, cpu_b, rows_b), (wall_a, cpu_a, rows_a) = results["before"], results["after"]
        print(f"| {name} | {wall_b:.1f} | {cpu_b:.1f} | {wall_a:.1f} | {cpu_a:.1f} | {wall_b / wall_a:.2f}x | "
              f"{cpu_b / cpu_a:.2f}x | {largest_difference(rows_b, rows_a):.1e} |", flush=True)
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")


def against(args) -> None:
    """README's example at this checkout and at ``args.against``, alternately, each a process of its own."""
    import statistics
    import subprocess
    import sys

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    folder = tempfile.mkdtemp(prefix="bench_against_")
    other = os.path.join(folder, "checkout")
    subprocess.run(["git", "-C", here, "worktree", "add", "--detach", other, args.against], check=True,
                   capture_output=True)
    data = write_demo_dataset(os.path.join(folder, "demo"), args.n)
    checkouts = {"this checkout": here, args.against: other}
    seconds = {label: [] for label in checkouts}
    print(f"README's example: demo model, {args.n} samples, methods {METHODS}, every layer, the defaults; load average "
          f"{os.getloadavg()[0]:.2f} at the start\n\n| run | checkout | package | wall (s) |\n|---|---|---|---|")
    try:
        for repeat in range(args.repeats):
            for label, root in checkouts.items():
                worker = ("import json, os, sys, time; import pytorch_grad_cam_vlm as p; "
                          "from pytorch_grad_cam_vlm.benchmark.runner import BenchmarkOptions, run; "
                          "o = BenchmarkOptions(model='demo', data=sys.argv[1], out=sys.argv[2], methods=sys.argv[3], "
                          "layers='all'); t = time.perf_counter(); run(o); "
                          "print(json.dumps([time.perf_counter() - t, os.path.dirname(p.__file__)]))")
                out = os.path.join(folder, f"out_{repeat}_{len(seconds[label])}_{label.replace(' ', '_')}")
                done = subprocess.run([sys.executable, "-c", worker, data, out, METHODS], capture_output=True,
                                      text=True, check=True, env=dict(os.environ, PYTHONPATH=root), cwd=root)
                wall, package = json.loads(done.stdout.strip().splitlines()[-1])
                if not package.startswith(root):
                    raise RuntimeError(f"{label} imported the package from {package}, not from {root}.")
                seconds[label].append(wall)
                print(f"| {repeat + 1} | {label} | {os.path.relpath(package, folder)} | {wall:.1f} |", flush=True)
    finally:
        subprocess.run(["git", "-C", here, "worktree", "remove", "--force", other], capture_output=True)
    mine, theirs = (statistics.median(seconds[label]) for label in checkouts)
    print(f"\nmedians: this checkout {mine:.1f} s, {args.against} {theirs:.1f} s: this checkout costs "
          f"{mine / theirs:.3f}x ({100 * (mine / theirs - 1):+.1f} %); load average {os.getloadavg()[0]:.2f} at the "
          "end")


def gil() -> None:
    """A pure-Python counter thread runs while the main thread factors a 336x336 imputation system (splu), solves
    with it, holds the GIL in a Python loop, or sleeps: a call that held the GIL would stop the counter."""
    from scipy.sparse.linalg import splu

    from pytorch_grad_cam_vlm.metrics.road import dissection_rank, sparse_system

    size = 336
    rng = np.random.default_rng(0)
    mask = np.float32(rng.random((size, size)) < 0.1)
    system, b, _ = sparse_system(mask, rng.normal(size=(3, size, size)), rank=dissection_rank(size, size))
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
            "SuperLU.solve x 20": lambda: [factor[0].solve(b) for _ in range(20)]}
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


def overlap(repeats: int = 5) -> None:
    """One row of the demo model at 112x112: its 56 perturbed images through the model (batches of 16) and its 18
    imputation systems, alone and side by side, the systems solved on 2 threads or in 2 processes. Wall seconds
    (median of ``repeats``), against the floor: both parts' CPU seconds alone, over the cores."""
    import multiprocessing
    import statistics
    from concurrent.futures import ProcessPoolExecutor

    import cv2
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from pytorch_grad_cam_vlm import QwenVLWrapper
    from pytorch_grad_cam_vlm.demo import load_demo_model, make_demo_samples
    from pytorch_grad_cam_vlm.metrics.deletion_check import ranked_map, target_scores
    from pytorch_grad_cam_vlm.metrics.perturbation import road_masks
    from pytorch_grad_cam_vlm.metrics.road import PERCENTILES

    sample = make_demo_samples(1)[0]
    wrapper = QwenVLWrapper(*load_demo_model(), prompt=sample.prompt)
    x = wrapper.preprocess(sample.image)
    rng = np.random.default_rng(0)
    cam = cv2.resize(rng.random((4, 4)).astype(np.float32), (112, 112))
    masks, image, images = road_masks(ranked_map(cam, rng), PERCENTILES), x[0].numpy(), x.repeat(56, 1, 1, 1)

    def forwards() -> None:
        target_scores(wrapper, images, ClassifierOutputTarget(0), 16)

    def imputation(pool) -> None:
        for future in [pool.submit(impute_linear, mask, image) for mask in masks]:
            future.result()

    def both(pool) -> None:
        futures = [pool.submit(impute_linear, mask, image) for mask in masks]
        forwards()
        for future in futures:
            future.result()

    def median(work) -> tuple:
        work()  # warm-up
        walls, cpus = [], []
        for _ in range(repeats):
            start, cpu = time.perf_counter(), time.process_time()
            work()
            walls.append(time.perf_counter() - start)
            cpus.append(time.process_time() - cpu)
        return statistics.median(walls), statistics.median(cpus)

    cores = len(os.sched_getaffinity(0))
    forward_wall, forward_cpu = median(forwards)
    serial_wall, serial_cpu = median(lambda: [impute_linear(mask, image) for mask in masks])
    print(f"torch {torch.get_num_threads()} thread(s); {cores} cores\n\n| work | wall (s) |\n|---|---|")
    print(f"| 56 images through the model | {forward_wall:.3f} |\n| 18 systems, serial | {serial_wall:.3f} |")
    print(f"| floor of both side by side (CPU seconds / {cores} cores) | {(forward_cpu + serial_cpu) / cores:.3f} |")
    pools = {"2 threads": lambda: ThreadPoolExecutor(2),
             "2 processes": lambda: ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"))}
    for name, make_pool in pools.items():
        with make_pool() as pool:
            print(f"| 18 systems, {name} | {median(lambda: imputation(pool))[0]:.3f} |")
            print(f"| both side by side, systems on {name} | {median(lambda: both(pool))[0]:.3f} |", flush=True)


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


def gpu_imputation(device: torch.device, sizes, serial: bool = True) -> None:
    """One row's 18 imputations: the direct solver on the CPU against conjugate gradients on ``device``, for a smooth
    map (one blob: ROAD's high percentiles remove one wide region) and a token-grid map of random values (kept
    pixels scattered)."""
    import cv2

    from pytorch_grad_cam_vlm.metrics.perturbation import road_masks
    from pytorch_grad_cam_vlm.metrics.road import PERCENTILES
    from pytorch_grad_cam_vlm.metrics.road_cg import impute_cg

    cores = len(os.sched_getaffinity(0))
    print(f"| image | map | direct, 1 thread (s) | direct, {cores} threads (s) | CG on {device.type} (s) | ratio to 1 "
          f"thread | ratio to {cores} threads | largest difference |\n|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    rows, columns = np.mgrid[0:16, 0:16]
    blob = np.exp(-((rows - 5) ** 2 + (columns - 10) ** 2) / 8.0).astype(np.float32)
    for size in sizes:
        maps = {"smooth": cv2.resize(blob, (size, size)),
                "token-random": cv2.resize(rng.random((size // 28, size // 28)).astype(np.float32), (size, size),
                                           interpolation=cv2.INTER_NEAREST)}
        for name, cam in maps.items():
            masks = road_masks(cam, PERCENTILES)
            image = rng.normal(size=(3, size, size)).astype(np.float32)
            start = time.perf_counter()
            direct = [impute_linear(mask, image) for mask in masks] if serial else None
            one = time.perf_counter() - start
            with ThreadPoolExecutor(cores) as executor:
                start = time.perf_counter()
                direct = list(executor.map(lambda m: impute_linear(m, image), masks))
                threaded = time.perf_counter() - start
            on_device = torch.from_numpy(image).to(device)
            impute_cg(on_device, torch.from_numpy(np.stack(masks[:2])))  # warm-up
            seconds = []
            for _ in range(3):
                sync(device)
                start = time.perf_counter()
                grids = impute_cg(on_device, torch.from_numpy(np.stack(masks)))
                sync(device)
                seconds.append(time.perf_counter() - start)
            grids = grids.cpu().numpy().reshape(len(masks), 3, -1)
            worst = max(float(np.abs(grid[:, unknown].T - values).max()) if len(unknown) else 0.0
                        for grid, (values, unknown) in zip(grids, direct))
            cg = sorted(seconds)[1]
            print(f"| {size}x{size} | {name} | {f'{one:.2f}' if serial else '-'} | {threaded:.2f} | {cg:.3f} | "
                  f"{f'{one / cg:.1f}x' if serial else '-'} | {threaded / cg:.1f}x | {worst:.1e} |", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gpu_rows(config: str, device: torch.device, rows: int, before_rows: int, profile: bool = False) -> None:
    """``rows`` benchmark rows of a random model of bench_gpu.py's ``config`` on ``device``, before and after
    (``profile``: the after run under cProfile, its 30 most expensive calls printed)."""
    from bench_gpu import CONFIGS, build_model

    folder = tempfile.mkdtemp(prefix="bench_benchmark_gpu_")
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    model, processor = build_model(config, device, getattr(torch, dtype))
    model.save_pretrained(os.path.join(folder, "model"))
    processor.save_pretrained(os.path.join(folder, "model"))
    del model
    per_sample = len(METHODS.split(",")) + 1  # RandomCAM is always added
    data = upscaled_demo_data(os.path.join(folder, "data"), -(-rows // per_sample))
    layer = str(CONFIGS[config]["text"]["num_hidden_layers"] // 2)
    print(f"\n{config} model (bf16 on CUDA, else float32), demo samples at 448x448, layer {layer}, {per_sample} rows "
          "per sample\n")
    print("| run | rows | wall (s) | s / row | ratio |\n|---|---|---|---|---|")
    results = {}
    runs = [("before", -(-before_rows // per_sample), dict(batch_size=1, imputation_threads=1, solver="direct")),
            ("after", -(-rows // per_sample), {})]
    for label, limit, extra in runs[0 if before_rows else 1:]:
        options = BenchmarkOptions(model=os.path.join(folder, "model"), data=data, out=os.path.join(folder, label),
                                   methods=METHODS, layers=layer, limit=limit, device=str(device), dtype=dtype,
                                   **extra)
        profiler = cProfile.Profile() if profile and label == "after" else None
        with profiler or contextlib.nullcontext():
            wall, _, table = timed_run(options)
        if profiler is not None:
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(30)
        results[label] = (wall / len(table), table)
        ratio = f"{results['before'][0] / results[label][0]:.2f}x" if label == "after" and before_rows else ""
        print(f"| {label} | {len(table)} | {wall:.1f} | {wall / len(table):.2f} | {ratio} |", flush=True)
    if before_rows:
        before, after = results["before"][1], results["after"][1][:len(results["before"][1])]
        print(f"\nlargest difference of the {len(before)} rows both runs scored: "
              f"{largest_difference(before, after):.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="demo,mid", help="demo, mid or both")
    parser.add_argument("--n", type=int, default=16, help="demo samples (README's example: 16)")
    parser.add_argument("--mid-n", type=int, default=1, help="samples on the mid-size model")
    parser.add_argument("--mid-layers", default="6", help="layers on the mid-size model")
    parser.add_argument("--gil", action="store_true", help="measure whether SuperLU releases the GIL, and exit")
    parser.add_argument("--overlap", action="store_true", help="one row's imputation beside its forward passes, on "
                        "threads and in processes, and exit")
    parser.add_argument("--batch-sizes", help="measure these forward batch sizes, e.g. 1,4,8,16,32,64, and exit")
    parser.add_argument("--mid-images", type=int, default=16, help="images per batch-size measurement, mid-size")
    parser.add_argument("--mid-sizes", default="448", help="image sides of the mid-size batch-size measurement")
    parser.add_argument("--gpu", help="3b, 7b or tiny: the GPU measurements (imputation, benchmark rows), and exit")
    parser.add_argument("--device", default="cuda", help="--gpu's device")
    parser.add_argument("--rows", type=int, default=100, help="--gpu's benchmark rows")
    parser.add_argument("--before-rows", type=int, default=5, help="--gpu's rows of the one-at-a-time run (0: none)")
    parser.add_argument("--sizes", default="448,1024", help="--gpu's imputation image sides")
    parser.add_argument("--profile", action="store_true", help="--gpu: profile the after run (cProfile)")
    parser.add_argument("--no-serial", action="store_true", help="--gpu: leave out the one-thread direct solver")
    parser.add_argument("--whole-processes", action="store_true", help="time each run as the benchmark command in a "
                        "process of its own, the model load included")
    parser.add_argument("--against", help="a git commit: README's example here and there, taking turns, and exit")
    parser.add_argument("--repeats", type=int, default=2, help="--against's runs of each checkout")
    args = parser.parse_args()
    if args.gpu:
        device = torch.device(args.device)
        gpu_imputation(device, [int(v) for v in args.sizes.split(",")], serial=not args.no_serial)
        gpu_rows(args.gpu, device, args.rows, args.before_rows, args.profile)
    elif args.against:
        against(args)
    elif args.gil:
        gil()
    elif args.overlap:
        overlap()
    elif args.batch_sizes:
        batch_sizes([int(b) for b in args.batch_sizes.split(",")], args.mid_images,
                    [int(v) for v in args.mid_sizes.split(",")])
    else:
        speed(args)


if __name__ == "__main__":
    main()
