"""Cheaper ways for ``auto`` to choose among its candidates, measured against today's full check (every candidate
map checked, the highest total kept) on held-out samples of the development models (issue 29).

    python benchmarks/auto_cheap.py demo 200            # model, held-out samples[, seed]; one model per run
    python benchmarks/auto_cheap.py crosses 200         # appends its rows to benchmarks/auto_cheap.csv, rewrites .md
    python benchmarks/auto_cheap.py pairs 200           # also onevision, internvl: the five development models

Per sample, the default candidates (AUTO_METHODS at the projector and every candidate decoder layer, one sweep pass
per method) are checked in full (the reference choice, ``choice="full"``), and each strategy chooses among the same
maps through :func:`~pytorch_grad_cam_vlm.methods.choice.choose_map`:

- ``full check, another tie seed``: the reference with seed 1: how often the full check agrees with itself when only
  the random order of tied pixels changes (the ceiling of ``same_choice`` for any other strategy);
- ``staged``: every map at fraction 0.05 and its peak window, then the best ``k`` (1 to 4; the default
  :data:`~pytorch_grad_cam_vlm.methods.choice.STAGED_KEPT`) of those partial totals at 0.2;
- ``peak``: the peak windows alone (one image per distinct peak), the best map checked in full (``--fast``);
- ``first-order estimate, best 3``: every map ranked by the first-order estimate of its check total (one input
  gradient: ``gradient x (fill - x)`` summed over the removed pixels, no forward pass per map,
  :func:`~pytorch_grad_cam_vlm.metrics.deletion_check.first_order_checks`), the best 3 by their full checks (read
  from the reference's, so their 12-15 images are not counted).

Columns: agreement with the reference's (method, layer); pointing and distractor rate of the map on the picture
(the model's pointing tolerance: 14 px, 8 px on the tiled models; any evidence box of the two-object model); forward
images per sample through the model after the sweep passes, whose output gives the clean score (counted by a hook on
the wrapper; the input gradient's pass counts one image) and backward passes beyond the sweeps; the Spearman
correlation of the first-order estimated and measured totals (mean over samples).
"""
from __future__ import annotations

import csv
import os
import sys
import time
from collections import Counter

import numpy as np
import torch
from tqdm import tqdm

from auto_layer import geometry, held_out, markdown, method_maps, sample_case
from dev_models_gap import score
from pytorch_grad_cam_vlm.layers import has_projector
from pytorch_grad_cam_vlm.methods.auto import AUTO_METHODS, candidate_layers
from pytorch_grad_cam_vlm.methods import choice
from pytorch_grad_cam_vlm.methods.choice import best_index, choose_map, ranked
from pytorch_grad_cam_vlm.metrics.deletion_check import first_order_checks, target_gradient
from pytorch_grad_cam_vlm.metrics.sanity import spearman

HERE = os.path.dirname(os.path.abspath(__file__))
KEPT = (1, 2, 3, 4)


def kept_spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman correlation (:func:`~pytorch_grad_cam_vlm.metrics.sanity.spearman`) of the pairs where neither is
    NaN (blank maps' totals); NaN below three pairs."""
    keep = ~(np.isnan(a) | np.isnan(b))
    return spearman(a[keep], b[keep]) if keep.sum() >= 3 else float("nan")


def main() -> None:
    name, n = sys.argv[1], int(sys.argv[2])
    seed = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    torch.set_num_threads(1)
    model, processor, samples = held_out(name, n, seed)
    tolerance = geometry(name)[1]
    first = sample_case(model, processor, samples[0])[0]
    layers = candidate_layers(len(first.layers), first.last_layer_blank, has_projector(first))
    candidates = [(m, k) for m in AUTO_METHODS for k in layers]
    stats = {}
    default_kept = choice.STAGED_KEPT
    chosen_by_reference = Counter()
    correlations = []
    start_time = time.perf_counter()
    for sample in tqdm(samples, desc=name, unit="sample"):
        wrapper, x, target = sample_case(model, processor, sample)
        images = [0]
        hook = wrapper.register_forward_pre_hook(lambda module, args: images.__setitem__(0, images[0] + len(args[0])))
        try:
            maps = np.concatenate([method_maps(wrapper, x, target, m, layers) for m in AUTO_METHODS])

            def counted(run):
                before = images[0]
                index, checks = run()
                return index, images[0] - before, checks

            with torch.no_grad():
                clean = float(target(wrapper(x)[0]))  # explain reads it from its sweep pass: not counted
            results = {}
            results["full check (today)"] = counted(lambda: choose_map(wrapper, x, maps, target, "full",
                                                                       clean=clean))
            reference, full = results["full check (today)"][0], results["full check (today)"][2]
            results["full check, another tie seed"] = counted(lambda: choose_map(wrapper, x, maps, target, "full",
                                                                                 seed=1, clean=clean))
            for kept in KEPT:
                choice.STAGED_KEPT = kept
                results[f"staged: 0.05 + peak for all, best {kept} at 0.2"] = counted(
                    lambda: choose_map(wrapper, x, maps, target, "staged", clean=clean))
            choice.STAGED_KEPT = default_kept
            results["peak: peak windows alone, the best checked (--fast)"] = counted(
                lambda: choose_map(wrapper, x, maps, target, "peak", clean=clean))

            def first_order():
                clean, gradient = target_gradient(wrapper, x, target)
                estimates = np.array([c.total for c in first_order_checks(x, gradient, clean, maps)])
                correlations.append(kept_spearman(estimates, np.array([c.total for c in full])))
                order = ranked(estimates)[:3]  # the best 3 by estimate, their full checks read from the reference
                return order[best_index([full[i] for i in order])], None

            results["first-order estimate, best 3 (checks not counted)"] = counted(first_order)
        finally:
            hook.remove()
        chosen_by_reference[candidates[reference]] += 1
        frame = wrapper.image_frame(sample.image.shape[:2], tuple(x.shape[2:]))
        for label, (index, cost, _) in results.items():
            row = stats.setdefault(label, dict(same=0, pointing=0, distractor=0, images=0))
            hits = score(frame.to_image(maps[index]), sample, tolerance)
            row["same"] += index == reference
            row["pointing"] += hits["pointing"]
            row["distractor"] += hits["distractor"]
            row["images"] += cost
    table = [dict(model=name, seed=seed, n=n, strategy=label, same_choice=row["same"] / n,
                  pointing=row["pointing"] / n, distractor=row["distractor"] / n, forward_images=row["images"] / n,
                  backward_passes=int(label.startswith("first-order")),
                  estimate_spearman=float(np.nanmean(correlations)),
                  reference_choices="; ".join(f"{m} at {k}: {c}" for (m, k), c in chosen_by_reference.most_common())
                  if label == "full check (today)" else "")
             for label, row in stats.items()]
    path = os.path.join(HERE, "auto_cheap.csv")
    old = [r for r in csv.DictReader(open(path))] if os.path.exists(path) else []
    old = [r for r in old if (r["model"], r["seed"]) != (name, str(seed))]
    rows = old + [{k: v for k, v in r.items()} for r in table]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(rows)
    shown = [{k: (float(v) if k in ("same_choice", "pointing", "distractor", "forward_images", "estimate_spearman")
                  else v) for k, v in r.items()} for r in rows]
    header = ("# auto's choice at fewer forward images (issue 29)\n\n"
              "Written by `python benchmarks/auto_cheap.py MODEL N [SEED]` (CPU, 1 thread); see its docstring. "
              "Candidates: " + "+".join(AUTO_METHODS) + " at the projector and every candidate decoder layer. "
              "`same_choice`: share of samples where the strategy keeps the same (method, layer) as the full check; "
              "`forward_images`: images per sample through the model after the sweep passes (the input gradient's "
              "pass counts one, plus one backward pass).")
    with open(os.path.join(HERE, "auto_cheap.md"), "w") as f:
        f.write(markdown(shown, header))
    print(markdown(shown, header), f"{time.perf_counter() - start_time:.0f} s")


if __name__ == "__main__":
    main()
