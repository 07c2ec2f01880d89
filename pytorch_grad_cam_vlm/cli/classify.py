"""``explain --model torchvision:NAME | timm:NAME --weights PATH``: maps of an image classifier's predicted class for
an image or a folder, an overlay and the map per image, and a report (``report.csv``, ``report.json``)."""
from __future__ import annotations

import argparse
import os
import sys

from pytorch_grad_cam_vlm.cli.common import PROG, choose_layers, explain_batch, find_images, smooth_options
from pytorch_grad_cam_vlm.errors import InputError
from pytorch_grad_cam_vlm.layers import layer_name
from pytorch_grad_cam_vlm.methods.auto import candidate_methods, is_auto
from pytorch_grad_cam_vlm.methods.catalog import uses_gradients
from pytorch_grad_cam_vlm.methods.classify import classify_and_explain
from pytorch_grad_cam_vlm.metrics.map_check import failure_warning
from pytorch_grad_cam_vlm.models.classifier import ClassifierWrapper, build_classifier, read_class_names
from pytorch_grad_cam_vlm.models.registry import resolve_device
from pytorch_grad_cam_vlm.output import check_out_dir, earlier_run
from pytorch_grad_cam_vlm.visualize import save_maps, save_overlay

VLM_OPTIONS = ("prompt", "texts", "answer")


def run_classify(args: argparse.Namespace) -> int:
    """Check the inputs, build the classifier (refused without ``--weights`` unless ``--random-weights``) and write
    an overlay, the map and a report row per image: image, class index and name, confidence, method, layer, map and
    overlay files, deletion check score and verdict."""
    for option in VLM_OPTIONS:
        if getattr(args, option):
            raise InputError(f"--{option} is for vision-language models; a classifier explains its predicted class.")
    if args.per_token or args.mode != "single":
        raise InputError("A classifier is explained in the single mode: leave out --per-token and --mode.")
    methods = candidate_methods(args.method)
    smooth = smooth_options(methods, args.n_samples, args.noise_level, args.seed)
    images = find_images(args.image)
    names = read_class_names(args.classes) if args.classes else None
    model, arch = build_classifier(args.model, args.weights, args.random_weights,
                                   None if names is None else len(names))
    wrapper = ClassifierWrapper(model.to(resolve_device(args.device)),
                                name=arch if args.model.startswith("torchvision:") else None, class_names=names)
    gradients = all(uses_gradients(cls, smooth) for cls in methods)
    layers = choose_layers(methods, "classifier", len(wrapper.layers), args.layers, "single", gradients)
    check_out_dir(args.out)
    kept, stale = earlier_run(args.out, args.overwrite, args.resume)

    def explain_one(image: str, stem: str, staging: str, progress) -> dict:
        result = classify_and_explain(wrapper, image, method=methods, layers=layers, options=smooth,
                                      fallback=is_auto(args.method))
        check = result["check"]
        warning = failure_warning(image, f"{result['method']} at {layer_name(result['layer'])}", check) or ""
        if warning:
            print(f"{PROG}: warning: {warning}", file=sys.stderr)
        prefix = f"{stem}_{result['method']}_layer{result['layer']}"
        overlay_path = save_overlay(os.path.join(staging, f"{prefix}_overlay.png"),
                                    result["image"], result["map"])
        map_path = save_maps(os.path.join(staging, f"{prefix}_map.npy"), result["map"])
        return dict(image=image, class_index=result["class_index"], class_name=result["class_name"],
                    confidence=round(result["confidence"], 6), method=result["method"], layer=result["layer"],
                    map=os.path.basename(map_path), overlay=os.path.basename(overlay_path),
                    check=None if check.blank else round(check.score, 6),
                    peak_drop=None if check.blank else round(check.peak_drop, 6), verdict=check.verdict,
                    warning=warning)

    rows = explain_batch(args.out, images, explain_one, kept, stale)
    print(f"Explained {len(rows)} image(s) of {args.model}; wrote {2 * len(rows) + 2} files to {args.out}, listed in "
          f"{os.path.join(args.out, 'report.csv')} and report.json.")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--weights``, ``--classes`` and ``--random-weights`` for ``--model torchvision:NAME`` / ``timm:NAME``."""
    parser.add_argument("--weights", help="classifiers (--model torchvision:NAME or timm:NAME): the state dict, "
                                          ".safetensors or .pth (read with torch.load(weights_only=True))")
    parser.add_argument("--classes", help="classifiers: a text file of class names, one per line, in output order")
    parser.add_argument("--random-weights", action="store_true",
                        help="classifiers: run without --weights on random weights (tests and demos only)")
