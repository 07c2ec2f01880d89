"""How ``auto`` should rank its checked candidates, measured on the trained demo models: by the deletion check's score
(round 1) or by its total (the score plus the drop when the map's peak window is removed), with the fractions
(0.05, 0.1, 0.2) or (0.05, 0.2), over several candidate method lists, at the decoder layers alone or with the
projector (the vision encoder's output as the decoder receives it).

    python benchmarks/auto_rules.py crosses 200          # model, held-out samples[, seed]; prints one line per rule
    python benchmarks/auto_rules.py demo 100 1

For each sample, every method of METHODS gives its maps at every candidate layer (one sweep pass per method), each
checked once by :func:`~pytorch_grad_cam_vlm.metrics.deletion_check.check_maps` with fractions (0.05, 0.1, 0.2) (the
mean fill, the 28-pixel peak window). The (0.05, 0.2) scores are read from the same images: the ranks' tie order
draws one random number per pixel per map whatever the fractions, so the removed pixels are those of a check run
with (0.05, 0.2). A rule keeps per image the candidate of the highest ranking value; each line gives the rule, the
pointing game and the distractor rate (tolerance 14 px), and the share of chosen maps that fail the check. The
"any candidate" line of a list is the share of samples where at least one of its candidates points at the evidence:
what the best possible choice among them would reach.
Results: benchmarks/auto_rules.md.
"""
import sys
from itertools import product

import numpy as np
import torch
from tqdm import tqdm

from auto_layer import held_out, method_maps, sample_case
from pytorch_grad_cam_vlm import QwenVLWrapper, pointing_hit
from pytorch_grad_cam_vlm.layers import PROJECTOR
from pytorch_grad_cam_vlm.methods.auto import candidate_layers
from pytorch_grad_cam_vlm.metrics.deletion_check import check_maps

METHODS = ["HiResCAM", "GradCAMPlusPlus", "LayerCAM", "XGradCAM", "GradCAMElementWise", "GradCAM", "EigenCAM"]
CANDIDATES = {"HiResCAM+GradCAMPlusPlus+LayerCAM+XGradCAM (round 1)": METHODS[:4],
              "GradCAMPlusPlus+LayerCAM+XGradCAM+GradCAMElementWise": METHODS[1:5],
              "HiResCAM+LayerCAM+XGradCAM+GradCAMElementWise": [METHODS[0]] + METHODS[2:5],
              "HiResCAM+GradCAMPlusPlus+XGradCAM+GradCAMElementWise": METHODS[:2] + METHODS[3:5],
              "five: round 1 + GradCAMElementWise": METHODS[:5], "all seven": METHODS,
              # The best lists of auto_layer.md once the projector is a candidate (seed 0), checked here on seed 1.
              "GradCAMPlusPlus+XGradCAM+GradCAMElementWise": METHODS[1:2] + METHODS[3:5],
              "GradCAMPlusPlus+GradCAMElementWise": [METHODS[1], METHODS[4]],
              "GradCAM+GradCAMElementWise": [METHODS[5], METHODS[4]], "GradCAMElementWise": [METHODS[4]]}
FRACTIONS = (0.05, 0.1, 0.2)
SUBSETS = {"(0.05, 0.1, 0.2)": [0, 1, 2], "(0.05, 0.2)": [0, 2]}


def main() -> None:
    name, n = sys.argv[1], int(sys.argv[2])
    seed = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    torch.set_num_threads(1)
    model, processor, samples = held_out(name, n, seed)
    layers = candidate_layers(len(QwenVLWrapper(model, processor, samples[0].prompt).decoder_layers), projector=True)
    layer_sets = {"": [k for k in layers if k != PROJECTOR], " + projector": layers}
    results = {}
    for sample in tqdm(samples, desc=name, unit="sample"):
        wrapper, x, target = sample_case(model, processor, sample)
        scored = {}
        for method in METHODS:
            maps = method_maps(wrapper, x, target, method, layers)
            for k, cam_map, check in zip(layers, maps, check_maps(wrapper, x, maps, target, FRACTIONS)):
                scored[(method, k)] = (cam_map, check)
        for (label, methods), (where, rule_layers) in product(CANDIDATES.items(), layer_sets.items()):
            label += where
            candidates = [scored[(m, k)] for m in methods for k in rule_layers]
            # The ceiling of any rule that keeps one candidate: does any of them point at the evidence?
            row = results.setdefault(f"{label} | any candidate (ceiling)", [0, 0, 0])
            row[0] += any(pointing_hit(cam_map, sample.evidence_box, 14) for cam_map, _ in candidates)
            for fractions, kept in SUBSETS.items():
                scores = np.array([np.mean(np.subtract(c.bottom_removed, c.top_removed)[kept]) if not c.blank
                                   else np.nan for _, c in candidates])
                for ranking, value in (("score", scores), ("total", scores + [c.peak_drop for _, c in candidates])):
                    best = int(np.argmax(np.nan_to_num(value, nan=-np.inf)))
                    cam_map = candidates[best][0]
                    row = results.setdefault(f"{label} | {ranking} {fractions}", [0, 0, 0])
                    row[0] += pointing_hit(cam_map, sample.evidence_box, 14)
                    row[1] += any(pointing_hit(cam_map, box, 14) for box in sample.distractor_boxes)
                    row[2] += not scores[best] > 0
    for rule, (hits, distractors, flagged) in results.items():
        rest = "– | –" if rule.endswith("(ceiling)") else f"{distractors / n:.3f} | {flagged / n:.3f}"
        print(f"{name} | {rule} | {hits / n:.3f} | {rest}")


if __name__ == "__main__":
    main()
