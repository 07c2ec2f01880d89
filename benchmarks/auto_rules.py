"""How ``auto`` should turn its checked candidates into one map, measured on the trained demo models: the best-checked
map (today's rule) against the mean of the top k checked maps, and with more candidate methods.

    python benchmarks/auto_rules.py crosses 200          # model, held-out samples[, seed]; prints one line per rule
    python benchmarks/auto_rules.py demo 200

For each sample, every method of METHODS gives its maps at every candidate layer (one sweep pass per method), each
checked once by the deletion check (defaults: fractions 0.05, 0.1, 0.2, mean fill). A rule is a candidate list
("auto4": methods.auto.AUTO_METHODS; "+eigen": with EigenCAM; "+elementwise": with GradCAMElementWise; "all8": all
of METHODS; "all7-nogradcam": all but GradCAM) and a way to draw: the best-checked map, the mean of the top 2, 3 or 4
checked maps (grad-cam's maps, each already in [0, 1]), or the mean of the passing maps weighted by their scores.
Each line: the rule, the pointing game and the distractor rate (tolerance 14 px), as in benchmarks/auto_layer.py.
Results: benchmarks/auto_rules.md.
"""
import sys

import numpy as np
import torch
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from auto_layer import tasks
from pytorch_grad_cam_vlm import QwenVLWrapper, pointing_hit
from pytorch_grad_cam_vlm.methods.auto import candidate_layers
from pytorch_grad_cam_vlm.methods.catalog import resolve_method
from pytorch_grad_cam_vlm.methods.sweep import layer_sweep
from pytorch_grad_cam_vlm.metrics.deletion_check import check_maps

METHODS = ["HiResCAM", "GradCAMPlusPlus", "LayerCAM", "XGradCAM", "EigenCAM", "EigenGradCAM", "GradCAMElementWise",
           "GradCAM"]
CANDIDATES = {"auto4": METHODS[:4], "auto4+eigen": METHODS[:5], "auto4+eigen+eigengrad": METHODS[:6],
              "auto4+elementwise": METHODS[:4] + ["GradCAMElementWise"], "all8": METHODS,
              "all7-nogradcam": METHODS[:7]}


def main() -> None:
    name, n = sys.argv[1], int(sys.argv[2])
    seed = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    torch.set_num_threads(1)
    load, make = tasks()[name]
    model, processor = load()
    samples = make(n, seed=seed, split="test")
    layers = candidate_layers(len(QwenVLWrapper(model, processor, samples[0].prompt).decoder_layers))
    results = {}
    for sample in samples:
        wrapper = QwenVLWrapper(model, processor, sample.prompt)
        x = wrapper.preprocess(sample.image)
        target = ClassifierOutputTarget(processor.tokenizer.convert_tokens_to_ids(sample.answer))
        scored = {}
        for method in METHODS:
            with layer_sweep(resolve_method(method))(model=wrapper, target_layers=[wrapper.decoder_layers[k]
                                                                                   for k in layers],
                                                     reshape_transform=wrapper.reshape_transform) as cam:
                maps = cam(input_tensor=x, targets=[target])[0]
            for k, cam_map, check in zip(layers, maps, check_maps(wrapper, x, maps, target)):
                scored[(method, k)] = (cam_map, check.score)

        def score(rule: str, cam_map: np.ndarray) -> None:
            row = results.setdefault(rule, [0, 0])
            row[0] += pointing_hit(cam_map, sample.evidence_box, 14)
            row[1] += any(pointing_hit(cam_map, box, 14) for box in sample.distractor_boxes)

        for label, methods in CANDIDATES.items():
            candidates = [(m, k) for m in methods for k in layers]
            scores = np.array([scored[c][1] for c in candidates])
            scores = np.where(np.isnan(scores), -np.inf, scores)
            order = np.argsort(-scores)
            score(label, scored[candidates[order[0]]][0])
            for top in (2, 3, 4):
                score(f"{label} mean top{top}", np.mean([scored[candidates[i]][0] for i in order[:top]
                                                          if np.isfinite(scores[i])], axis=0))
            passing = [(scored[candidates[i]][0], scores[i]) for i in order if np.isfinite(scores[i]) and scores[i] > 0]
            score(f"{label} weighted positive", sum(m * v for m, v in passing) / sum(v for _, v in passing)
                  if passing else scored[candidates[order[0]]][0])
    for rule, (hits, distractors) in results.items():
        print(f"{name} {rule:40s} {hits / n:.3f} {distractors / n:.3f}")


if __name__ == "__main__":
    main()
