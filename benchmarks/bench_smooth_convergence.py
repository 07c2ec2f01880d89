"""How fast SmoothGradCAM converges with each noise kind: the error against a 512-copy i.i.d. reference, per n.

For each model and each of --images images, the reference is SmoothGradCAM with 512 i.i.d. copies (seed 1000,
apart from the seeds measured). For each noise kind, each seed 0..4 and n in 4, 8, 16, 24, 32, 50, 64, the n-copy
map is compared with the reference: the L2 error (root mean square over the pixels of the difference of the two [0, 1]
maps) and 1 - Spearman's rho over the pixels (rho = 0 when a map is constant: it ranks nothing). Each error is
averaged over the images for each seed; the table gives the mean and the standard deviation over the seeds.

Nesting: with "iid", "antithetic" and "sobol", the first n copies of one seed's 64-copy run are that seed's n-copy
run (the noise is drawn copy after copy and its set-up does not depend on n), so one run per seed gives every n;
the benchmark keeps each copy's per-layer map, averages the first n, and checks the identity against direct n-copy
runs on the first image. "latin" draws its strata for n copies: one run per n.

Decision: a kind halves the samples if its measured error at n = 24 is at most the i.i.d. error at n = 50, on every
model and for both errors (means over the seeds). Printed with it: the n at which the kind reaches the i.i.d. error
at n = 50 (log-log interpolation between the measured n) and 50 / n, the factor of samples saved.

Models: the demo model (decoder layer 0), the crosses model if it is shipped (its auto layer), and a random
Qwen2.5-VL, 8 decoder layers of width 256 and 8 vision blocks of width 128 (decoder layer 6), on 112x112 demo images.
The error of the reference itself (512 copies) adds the same amount to every kind's squared L2 error: it shrinks
the ratios between kinds at large n, not the n at which a kind matches i.i.d. at 50.

    python benchmarks/bench_smooth_convergence.py                 # 10 images per model: 610 s on 1 CPU thread
    python benchmarks/bench_smooth_convergence.py --images 20     # the issue's full size, about twice as long
    python benchmarks/bench_smooth_convergence.py --kinds sobol --sobol-dimension 21201 --out /tmp/sobol21201

Writes benchmarks/smooth_convergence.csv (one row per model, kind, n and seed) and docs/images/smooth_convergence.png
(error against n, log-log, per model and error).
"""
from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from scipy.stats import ConstantInputWarning, spearmanr
from tqdm import tqdm

from pytorch_grad_cam_vlm import QwenVLWrapper, build_tiny_model, load_demo_model, make_demo_samples
from pytorch_grad_cam_vlm.methods import noise
from pytorch_grad_cam_vlm.methods.noise import NOISE_KINDS
from pytorch_grad_cam_vlm.methods.smooth_grad import SmoothGradCAM
from pytorch_grad_cam_vlm.methods.sweep import auto_layer

MATCHED = 50  # the i.i.d. sample count every kind is compared with: SmoothGrad's default n_samples
HALF = 24  # at most half of MATCHED, and even: antithetic copies all paired
SAMPLES = (4, 8, 16, HALF, 32, MATCHED, 64)
NESTED = ("iid", "antithetic", "sobol")  # kinds whose first n copies are their n-copy run
REFERENCE_SEED = 1000
HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class Subject:
    """A model to measure: its wrapper, target layer, images and a name for the table."""

    name: str
    wrapper: QwenVLWrapper
    layer: int
    images: List[np.ndarray]


class CopyMapsCAM(SmoothGradCAM):
    """SmoothGradCAM that also keeps each copy's per-layer map, the values it averages, in copy order."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.copy_maps: List[torch.Tensor] = []

    def _run_batch(self, chunk, targets, eigen_smooth, graph_from, first_layer):
        values, as_list = super()._run_batch(chunk, targets, eigen_smooth, graph_from, first_layer)
        self.copy_maps.append(values[0].double())
        return values, as_list

    def prefix_maps(self, counts: Sequence[int]) -> Dict[int, np.ndarray]:
        """The map of the first ``n`` copies for each ``n`` in ``counts``: their mean, aggregated as SmoothGrad does."""
        maps = torch.cat(self.copy_maps)
        return {n: self.aggregate_multi_layers([maps[:n].mean(0, keepdim=True).float().numpy()])[0] for n in counts}


def subjects(names: Sequence[str], n_images: int) -> List[Subject]:
    """The models named in ``names`` that exist here (a missing crosses model is reported and skipped)."""
    found = []
    for name in names:
        if name == "demo":
            model, processor = load_demo_model()
            samples = make_demo_samples(n_images)
            found.append(Subject("demo", QwenVLWrapper(model, processor, samples[0].prompt), 0,
                                 [s.image for s in samples]))
        elif name == "crosses":
            try:
                from pytorch_grad_cam_vlm.demo.crosses import PROMPT, load_crosses_model, make_crosses_samples
                model, processor = load_crosses_model()
            except (ImportError, FileNotFoundError) as error:
                print(f"crosses model: not measured ({error})")
                continue
            wrapper = QwenVLWrapper(model, processor, PROMPT)
            found.append(Subject("crosses", wrapper, auto_layer(wrapper),
                                 [s.image for s in make_crosses_samples(n_images)]))
        elif name == "random":
            model, processor = build_tiny_model(tempfile.mkdtemp(prefix="bench_convergence_"), seed=0, text_layers=8,
                                                text_width=256, vision_blocks=8, vision_width=128, window_size=56,
                                                fullatt_block_indexes=(3, 7), heads=8, vision_heads=4)
            wrapper = QwenVLWrapper(model, processor, "What color is the circle?")
            found.append(Subject("random", wrapper, 6, [s.image for s in make_demo_samples(n_images, seed=1)]))
        else:
            raise ValueError(f"Unknown model {name!r}: use demo, crosses or random.")
    return found


def errors(estimate: np.ndarray, reference: np.ndarray) -> Tuple[float, float]:
    """The L2 error (root mean square over the pixels) and 1 - Spearman's rho (rho = 0 for a constant map)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConstantInputWarning)  # a constant map: rho is nan, counted as 0
        rho = spearmanr(estimate.ravel(), reference.ravel()).statistic
    return float(np.sqrt(np.mean((estimate - reference) ** 2))), 1.0 - (0.0 if np.isnan(rho) else float(rho))


def measure(subject: Subject, kinds: Sequence[str], seeds: Sequence[int], reference_n: int,
            batch_size: int) -> Dict[Tuple[str, int, int], np.ndarray]:
    """(kind, n, seed) -> the (L2, 1 - rho) errors of each image, shape (images, 2)."""
    wrapper = subject.wrapper
    options = dict(model=wrapper, target_layers=[wrapper.decoder_layers[subject.layer]],
                   reshape_transform=wrapper.reshape_transform, batch_size=batch_size)
    results: Dict[Tuple[str, int, int], List[Tuple[float, float]]] = {}
    runs = len(subject.images) * (1 + sum(len(seeds) * (1 if k in NESTED else len(SAMPLES)) for k in kinds))
    with tqdm(total=runs, desc=subject.name, unit="run") as progress:
        for index, image in enumerate(subject.images):
            x = wrapper.preprocess(image)
            with torch.no_grad():
                targets = [ClassifierOutputTarget(int(wrapper(x).argmax(-1)))]

            def smoothed(kind: str, n: int, seed: int, cls=SmoothGradCAM):
                with cls(**options, n_samples=n, seed=seed, noise=kind) as cam:
                    return cam, cam(x, targets)[0]

            reference = smoothed("iid", reference_n, REFERENCE_SEED)[1]
            progress.update()
            for kind in kinds:
                for seed in seeds:
                    if kind in NESTED:
                        cam, _ = smoothed(kind, max(SAMPLES), seed, CopyMapsCAM)
                        maps = cam.prefix_maps(SAMPLES)
                        if index == 0 and seed == seeds[0]:  # the nesting the benchmark relies on
                            for n in (SAMPLES[0], HALF):
                                np.testing.assert_allclose(maps[n], smoothed(kind, n, seed)[1], atol=1e-5)
                        progress.update()
                    else:
                        maps = {}
                        for n in SAMPLES:
                            maps[n] = smoothed(kind, n, seed)[1]
                            progress.update()
                    for n, estimate in maps.items():
                        results.setdefault((kind, n, seed), []).append(errors(estimate, reference))
    return {key: np.array(value) for key, value in results.items()}


def matching_n(counts: Sequence[int], error: Sequence[float], target: float) -> float:
    """The n at which ``error`` (decreasing in n, measured at ``counts``) reaches ``target``, interpolated on the
    log-log curve between the two measured n around it; nan when it never does, ``counts[0]`` when it starts below."""
    if error[0] <= target:
        return float(counts[0])
    for (n0, e0), (n1, e1) in zip(zip(counts, error), zip(counts[1:], error[1:])):
        if e1 <= target:
            fraction = np.log(e0 / target) / np.log(e0 / e1)
            return float(np.exp(np.log(n0) + fraction * np.log(n1 / n0)))
    return float("nan")


def summarise(results: Dict[str, Dict[Tuple[str, int, int], np.ndarray]], kinds: Sequence[str],
              seeds: Sequence[int]) -> Dict[Tuple[str, str, int], np.ndarray]:
    """(model, kind, n) -> per-seed mean errors over the images, shape (seeds, 2)."""
    return {(model, kind, n): np.array([per_key[(kind, n, seed)].mean(0) for seed in seeds])
            for model, per_key in results.items() for kind in kinds for n in SAMPLES}


def print_table(summary, models: Sequence[str], kinds: Sequence[str]) -> None:
    metric_names = ("L2", "1 - rho")
    print(f"\n{'model':8s} {'noise':11s} {'n':>3s}  " + "  ".join(f"{m + ' (mean +- sd over seeds)':>26s}"
                                                            for m in metric_names))
    for model in models:
        for kind in kinds:
            for n in SAMPLES:
                per_seed = summary[(model, kind, n)]
                cells = "  ".join(f"{per_seed[:, i].mean():17.5f} +- {per_seed[:, i].std():6.5f}" for i in range(2))
                print(f"{model:8s} {kind:11s} {n:3d}  {cells}")


def decide(summary, models: Sequence[str], kinds: Sequence[str]) -> List[str]:
    """Print, per model and kind, the n at which the kind reaches i.i.d.'s error at n = 50 (interpolated) and its
    measured error at n = 24; return the kinds whose error at n = 24 is at most i.i.d.'s at n = 50 on every model,
    for both errors (half the samples or fewer)."""
    print(f"\nEach kind against the i.i.d. error at n = {MATCHED}: its measured error at n = {HALF}, and the n at "
          f"which it reaches that error (log-log interpolation between the measured n; factor = {MATCHED} / n):")
    halving = []
    for kind in kinds:
        if kind == "iid":
            continue
        passes, worst = True, 0.0
        for model in models:
            cells = []
            for i, metric in enumerate(("L2", "1 - rho")):
                target = summary[(model, "iid", MATCHED)][:, i].mean()
                at_half = summary[(model, kind, HALF)][:, i].mean()
                n = matching_n(SAMPLES, [summary[(model, kind, n)][:, i].mean() for n in SAMPLES], target)
                passes &= at_half <= target
                worst = max(worst, n) if not np.isnan(n) else float("inf")
                cells.append(f"{metric}: iid@{MATCHED} {target:.5f}, {kind}@{HALF} {at_half:.5f} "
                             f"({'<=' if at_half <= target else '> '}), n = {n:5.1f} (x{MATCHED / n:4.2f})")
            print(f"  {model:8s} {kind:11s} " + " | ".join(cells))
        print(f"  {kind}: {'reaches' if passes else 'does not reach'} i.i.d.'s error at n = {MATCHED} with n = {HALF} "
              f"on every model and both errors; interpolated n at worst {worst:.1f} (x{MATCHED / worst:.2f})")
        if passes:
            halving.append(kind)
    print(f"kinds with at most half the samples on every model and both errors: {halving or 'none'}")
    return halving


def write_csv(path: str, summary, seeds: Sequence[int], n_images: Dict[str, int]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["model", "noise", "n", "seed", "images", "l2", "one_minus_spearman"])
        for (model, kind, n), per_seed in sorted(summary.items()):
            for seed, (l2, rank) in zip(seeds, per_seed):
                writer.writerow([model, kind, n, seed, n_images[model], f"{l2:.6f}", f"{rank:.6f}"])


def plot(path: str, summary, models: Sequence[str], kinds: Sequence[str], n_images: Dict[str, int],
         n_seeds: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, len(models), figsize=(4.2 * len(models), 7), squeeze=False)
    for column, model in enumerate(models):
        for row, metric in enumerate(("L2 error (RMS over pixels)", "1 - Spearman rho")):
            axis = axes[row, column]
            for kind in kinds:
                counts = [n for n in SAMPLES if (model, kind, n) in summary]
                values = np.array([summary[(model, kind, n)][:, row] for n in counts])
                axis.errorbar(counts, values.mean(1), yerr=values.std(1), marker="o", capsize=3, label=kind)
            target = summary[(model, "iid", MATCHED)][:, row].mean()
            axis.axhline(target, color="grey", linestyle=":", label=f"iid at n = {MATCHED}")
            axis.set_xscale("log", base=2)
            axis.set_yscale("log")
            axis.set_xticks(SAMPLES, [str(n) for n in SAMPLES])
            axis.set_xlabel("n_samples (noisy copies)")
            axis.set_ylabel(metric)
            axis.set_title(f"{model} ({n_images[model]} images)")
            axis.grid(True, which="both", alpha=0.3)
    axes[0, 0].legend()
    figure.suptitle(f"SmoothGradCAM: error against a 512-copy i.i.d. reference (mean +- sd over {n_seeds} seeds)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10,
                        help="images per model (10 keeps a run near 10 min on 1 thread; the issue's full size: 20)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--models", default="demo,crosses,random")
    parser.add_argument("--kinds", default=",".join(NOISE_KINDS), help="noise kinds (iid is always measured)")
    parser.add_argument("--reference-samples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16, help="copies per pass (the maps do not depend on it)")
    parser.add_argument("--sobol-dimension", type=int, default=noise.SOBOL_MAX_DIMENSION,
                        help="Sobol dimensions the pixels share (SOBOL_MAX_DIMENSION; SobolEngine allows 21201)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=os.path.join(HERE, "smooth_convergence"), help="path of the .csv and .png")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    noise.SOBOL_MAX_DIMENSION = args.sobol_dimension
    kinds = ["iid"] + [k for k in args.kinds.split(",") if k != "iid"]
    seeds = list(range(args.seeds))
    start = time.time()
    results, n_images = {}, {}
    for subject in subjects(args.models.split(","), args.images):
        print(f"{subject.name}: decoder layer {subject.layer} of {len(subject.wrapper.decoder_layers)}, "
              f"{len(subject.images)} images of {subject.images[0].shape[1]}x{subject.images[0].shape[0]}")
        results[subject.name] = measure(subject, kinds, seeds, args.reference_samples, args.batch_size)
        n_images[subject.name] = len(subject.images)
    models = list(results)
    summary = summarise(results, kinds, seeds)
    print(f"\nSobol dimensions: {args.sobol_dimension}; {torch.get_num_threads()} CPU thread(s); "
          f"{time.time() - start:.0f} s")
    print_table(summary, models, kinds)
    decide(summary, models, kinds)
    write_csv(args.out + ".csv", summary, seeds, n_images)
    figure_path = os.path.join(HERE, os.pardir, "docs", "images", os.path.basename(args.out) + ".png")
    plot(figure_path, summary, models, kinds, n_images, len(seeds))
    print(f"\nwrote {args.out}.csv and {figure_path}")


if __name__ == "__main__":
    main()
