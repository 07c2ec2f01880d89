"""``explain --images a.png b.png``: the images asked in one prompt, one map split between them (each image's
share of its mass and its own deletion check), drawn as one overlay per image."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional, Sequence

import numpy as np

from pytorch_grad_cam_vlm.cli.common import (CHECK_LEGEND, PROG, check_change, check_note, explain_batch,
                                             find_images, inner_progress_silenced, load_subject, margin_cell,
                                             method_name, output_stems, smooth_options, target_cells)
from pytorch_grad_cam_vlm.errors import InputError
from pytorch_grad_cam_vlm.image import load_rgb, upscale_warning
from pytorch_grad_cam_vlm.layers import Layer, layer_name
from pytorch_grad_cam_vlm.methods.auto import candidate_methods, explain
from pytorch_grad_cam_vlm.models.classifier import is_classifier_spec
from pytorch_grad_cam_vlm.models.multi_image import SEVERAL_IMAGES_FAMILIES, SEVERAL_IMAGES_MODEL_TYPES, MultiImage
from pytorch_grad_cam_vlm.models.registry import Subject
from pytorch_grad_cam_vlm.visualize import save_images_figure, save_maps, save_overlay


def run_several(args: argparse.Namespace) -> int:
    """Check the images, the flags and the model's family (by its config alone), then load the model and explain
    the images in one prompt."""
    if is_classifier_spec(args.model):
        raise InputError("--images asks several images in one prompt of a vision-language model; an image "
                         "classifier takes --image.")
    if args.per_token:
        raise InputError("--per-token explains one image's answer token by token; leave it out with --images.")
    if args.mode not in (None, "single"):
        raise InputError(f"--images draws the chosen map as one overlay per image; leave out --mode {args.mode}.")
    if len(args.images) < 2:
        raise InputError("--images takes two or more image files asked in one prompt, got one: pass it with --image.")
    for path in args.images:
        if not os.path.isfile(path):
            raise InputError(f"--images takes image files, got {path}: "
                             + ("pass the folder's images by name." if os.path.isdir(path) else "no such file."))
    paths = [find_images(path)[0] for path in args.images]  # each decoded once, its aspect ratio checked
    methods = candidate_methods(args.method)
    smooth = smooth_options(methods, args.n_samples, args.noise_level, args.seed)
    subject, layers, kept, stale = load_subject(args, methods, smooth, check_several_family)
    name = method_name(args.method, methods)
    stem = "_".join(output_stems(paths))

    def explain_one(key: str, _stem: str, staging: str, progress) -> dict:
        return explain_prompt(subject, paths, stem, methods, name, layers, smooth, staging,
                              "peak" if args.fast else "staged",
                              lambda stage: progress.set_postfix_str(f"{len(paths)} images: {stage}"))

    rows = explain_batch(args.out, [";".join(paths)], explain_one, kept, stale)
    for row in rows:
        shares = ", ".join(f"{os.path.basename(p)} {s:.1%}" for p, s in zip(row["images"], row["image_shares"]))
        print(f"Explained {len(paths)} images in one prompt with {row['method']} at {layer_name(row['layers'][0])}: "
              f"the map's mass {shares}; wrote {len(row['files']) + 2} files to {args.out}, listed in "
              f"{os.path.join(args.out, 'report.csv')} and report.json.")
    return 0


def check_several_family(family: str, option: str = "--images") -> None:
    """Refuse ``option`` (several images in one prompt) on a family that takes one image per prompt."""
    if family not in SEVERAL_IMAGES_MODEL_TYPES:
        raise InputError(f"{option}: a {family} model takes one image per prompt; several images in one prompt work "
                         f"with {SEVERAL_IMAGES_FAMILIES}.")


def explain_prompt(subject: Subject, paths: Sequence[str], stem: str, methods: Sequence[type], method: str,
                   layers: Sequence[Layer], options: dict, out_dir: str, choice: str = "staged",
                   stage: Optional[Callable[[str], None]] = None) -> dict:
    """The predicted token (or the answer) of the images at ``paths`` asked in one prompt, explained by
    :func:`~pytorch_grad_cam_vlm.methods.auto.explain`: the figure (one overlay per image, its share of the map's
    mass and its check in its label), each image's overlay and map (``.npy``, the image's size) into ``out_dir``,
    a warning line on stderr for each failed check. Returns the report row."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    wrapper = subject.wrapper
    pictures = [load_rgb(path) for path in paths]
    try:
        x = wrapper.preprocess(pictures)
    except ValueError as error:
        raise InputError(str(error)) from error
    index, label, probability = subject.predict(x)
    with inner_progress_silenced(methods):
        result = explain(wrapper, MultiImage(pictures), [ClassifierOutputTarget(index)], methods, layers,
                         options=options, choice=choice, stage=stage, fallback=method == "auto")
    split, reliance, check, layer = result.split[0], result.reliance[0], result.checks[0], result.layers[0]
    names = [os.path.basename(path) for path in paths]
    warnings = [result.layer_warning(" + ".join(names), layer), *result.fallback_lines(" + ".join(names)),
                reliance.warning(" + ".join(names))]
    warnings += split.warnings(names)
    warnings += [upscale_warning(path, picture.size[::-1], (h, w))
                 for path, picture, (_, _, h, w) in zip(paths, pictures, split.boxes.boxes)]
    warnings = [line for line in warnings if line]
    for line in warnings:
        print(f"{PROG}: warning: {line}", file=sys.stderr)
    chosen = f"{method} → {result.methods[0]}" if method != result.methods[0] else method
    rgbs = [np.asarray(picture, dtype=np.float32) / 255 for picture in pictures]
    labels = [f"{name} · {share:.1%} of the map · {check_note(c, reliance.clean)}"
              for name, share, c in zip(names, split.shares, split.checks)]
    prefix = os.path.join(out_dir, f"{stem}_{result.methods[0]}")
    files = [save_images_figure(f"{prefix}_images.png", rgbs, split.maps, labels,
                                f"{chosen} · {layer_name(layer)} · target {label!r} · whole map: "
                                f"{check_note(check, reliance.clean)}", CHECK_LEGEND)]
    for i, (rgb, cam, text) in enumerate(zip(rgbs, split.maps, labels)):
        files += [save_overlay(f"{prefix}_image{i + 1}_overlay.png", rgb, cam, text),
                  save_maps(f"{prefix}_image{i + 1}_map.npy", cam)]
    changes = [check_change(c, reliance.clean) for c in split.checks]
    return dict(image=";".join(paths), images=list(paths), **target_cells(wrapper, label, probability),
                method=result.methods[0], mode="single", layers=[layer], check=[round(check.score, 6)],
                peak_drop=[round(check.peak_drop, 6)], clean_score=round(reliance.clean, 6),
                verdict=[check.verdict], null_margin=[margin_cell(check)],
                image_shares=[round(float(s), 6) for s in split.shares],
                image_check=[round(c.score, 6) for c in split.checks],
                image_top_change=[round(top, 4) for top, _ in changes],
                image_bottom_change=[round(bottom, 4) for _, bottom in changes],
                image_verdict=[c.verdict for c in split.checks],
                image_null_margin=[margin_cell(c) for c in split.checks],
                visual_reliance=round(reliance.share, 6), warning=" ".join(warnings),
                files=[os.path.basename(f) for f in files])


def several_images_argument(group) -> None:
    """``--images``, in the group of ``explain``'s inputs (one of ``--image``, ``--images``, ...)."""
    group.add_argument("--images", nargs="+", metavar="IMAGE",
                       help="two or more image files asked in one prompt (Qwen families, GLM-4V, InternVL, Idefics3, "
                            "Gemma 3): one map split between them, each image's share of its mass and its own "
                            "deletion check, one overlay per image")
