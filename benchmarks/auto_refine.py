"""Does a refinement around the best layer pay, when ``auto`` tries a spread of layers rather than all of them (models
with more than CANDIDATE_LAYERS usable decoder layers)? Measured on the trained demo models by trying a coarser spread
than their depth: the default methods' maps at the projector and every usable decoder layer, each checked once; then,
per image, the pointing game of the map of the highest check total among

- every layer (what ``auto`` does on these models),
- the projector and a spread of S decoder layers (``candidate_layers(..., spread=S)``),
- that spread refined: the layers between the best spread layer and its neighbours in the spread added, the best of
  all kept (no refinement when the projector wins),

with the number of maps each checks (the cost: one sweep per method whatever the layers, one check per map).

    python benchmarks/auto_refine.py crosses 200          # model, held-out samples[, seed]
Results: benchmarks/auto_refine.md.
"""
import sys

import numpy as np
import torch
from tqdm import tqdm

from auto_layer import held_out, method_maps, sample_case
from pytorch_grad_cam_vlm import QwenVLWrapper, pointing_hit
from pytorch_grad_cam_vlm.layers import PROJECTOR
from pytorch_grad_cam_vlm.methods.auto import AUTO_METHODS, candidate_layers
from pytorch_grad_cam_vlm.metrics.deletion_check import check_maps


def refined(spread: list, best) -> list:
    """The layers strictly between ``best`` and its neighbours in ``spread`` (none when the projector is best)."""
    if best == PROJECTOR:
        return []
    layers = [k for k in spread if k != PROJECTOR]
    i = layers.index(best)
    low, high = layers[max(i - 1, 0)], layers[min(i + 1, len(layers) - 1)]
    return [k for k in range(low + 1, high) if k not in layers]


def main() -> None:
    name, n = sys.argv[1], int(sys.argv[2])
    seed = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    torch.set_num_threads(1)
    model, processor, samples = held_out(name, n, seed)
    n_layers = len(QwenVLWrapper(model, processor, samples[0].prompt).decoder_layers)
    every = candidate_layers(n_layers, projector=True, spread=n_layers)
    spreads = range(2, len(every) - 1)
    results = {}
    for sample in tqdm(samples, desc=name, unit="sample"):
        wrapper, x, target = sample_case(model, processor, sample)
        maps = np.concatenate([method_maps(wrapper, x, target, method, every) for method in AUTO_METHODS])
        checks = check_maps(wrapper, x, maps, target)  # one call for every map of the image, as explain makes it
        scored = {(m, k): (maps[i * len(every) + j], checks[i * len(every) + j])
                  for i, m in enumerate(AUTO_METHODS) for j, k in enumerate(every)}

        def best_of(layers):
            candidates = [(m, k) for m in AUTO_METHODS for k in layers]
            totals = np.nan_to_num([scored[c][1].total for c in candidates], nan=-np.inf)
            return candidates[int(np.argmax(totals))]

        def add(rule, layers):
            m, k = best_of(layers)
            row = results.setdefault(rule, [0, 0, 0])
            row[0] += pointing_hit(scored[(m, k)][0], sample.evidence_box, 14)
            row[1] += any(pointing_hit(scored[(m, k)][0], box, 14) for box in sample.distractor_boxes)
            row[2] += len(layers) * len(AUTO_METHODS)
            return k

        add(f"every layer ({len(every) - 1} decoder layers)", every)
        for spread in spreads:
            layers = candidate_layers(n_layers, projector=True, spread=spread)
            best = add(f"spread of {spread}: {','.join(map(str, layers))}", layers)
            add(f"spread of {spread}, refined around the best", layers + refined(layers, best))
    for rule, (hits, distractors, maps) in results.items():
        print(f"{name} (seed {seed}) | {rule} | {hits / n:.3f} | {distractors / n:.3f} | {maps / n:.1f}")


if __name__ == "__main__":
    main()
