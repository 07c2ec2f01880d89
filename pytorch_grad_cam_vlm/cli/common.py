"""What the subcommands share: finding the images, choosing layers and Smooth options from the flags, and writing
output atomically with a report."""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from typing import Iterator, List, Optional, Sequence

from pytorch_grad_cam_vlm.errors import InputError
from pytorch_grad_cam_vlm.methods.catalog import is_smooth
from pytorch_grad_cam_vlm.methods.sweep import check_sweep, default_single_layer, select_layers
from pytorch_grad_cam_vlm.models.registry import Subject, skip_last
from pytorch_grad_cam_vlm.visualize import mode_layers, render

PROG = "pytorch-grad-cam-vlm"
EXIT_BAD_INPUT = 2


def find_images(path: str) -> List[str]:
    """The image files of ``path``: the file itself, or a folder's files with an image extension (sorted, not
    recursive). Each one is decoded once here, so that an unreadable image fails before anything is written."""
    from PIL import Image

    from pytorch_grad_cam_vlm.image import load_rgb

    if os.path.isdir(path):
        extensions = {ext.lower() for ext in Image.registered_extensions()}
        images = sorted(os.path.join(path, name) for name in os.listdir(path) if not name.startswith(".")
                        and os.path.splitext(name)[1].lower() in extensions
                        and os.path.isfile(os.path.join(path, name)))
        if not images:
            raise InputError(f"No image files in folder {path}.")
    elif os.path.isfile(path):
        images = [path]
    else:
        raise InputError(f"Image file or folder not found: {path}")
    for image in images:
        try:
            load_rgb(image)
        except (ValueError, OSError) as error:
            raise InputError(str(error).split("\n")[0]) from error
    return images


def output_stems(images: Sequence[str]) -> List[str]:
    """File name prefixes, one per image: its name without extension, or with the extension where two names
    would clash (``a.png`` and ``a.jpg``)."""
    stems = [os.path.splitext(os.path.basename(image))[0] for image in images]
    return [os.path.basename(image).replace(".", "_") if stems.count(stem) > 1 else stem
            for image, stem in zip(images, stems)]


def smooth_options(method_cls: type, n_samples: Optional[int], noise_level: Optional[float],
                   seed: Optional[int]) -> dict:
    """The Smooth methods' keywords that were given; refused for other methods."""
    if not is_smooth(method_cls):
        if n_samples is not None or noise_level is not None:
            raise InputError(f"--n-samples and --noise-level apply to Smooth methods only, not "
                             f"{method_cls.__name__}: try --method Smooth{method_cls.__name__}.")
        return {}
    return {k: v for k, v in dict(n_samples=n_samples, noise_level=noise_level, seed=seed).items() if v is not None}


def choose_layers(method_cls: type, family: str, n_layers: int, spec: str, mode: str,
                  gradients: bool) -> Optional[List[int]]:
    """The layer indices a mode draws for ``--layers spec``; ``None`` for ``--mode single --layers auto``, whose
    layer :func:`~pytorch_grad_cam_vlm.methods.sweep.auto_single_layer` picks once the model is loaded."""
    try:
        if mode == "single" and spec.strip().lower() == "auto":
            default_single_layer(n_layers, skip_last(family, gradients))  # refuses a model without a usable layer
            return None
        layers = mode_layers(mode, select_layers(n_layers, spec, skip_last(family, gradients)))
        check_sweep(method_cls, len(layers))
        return layers
    except ValueError as error:
        raise InputError(f"--layers {spec}: {error}") from error


@contextmanager
def staged_output(out_dir: str) -> Iterator[str]:
    """A staging folder beside ``out_dir``; on success its files move into ``out_dir`` (created if needed,
    files of the same name replaced), on any error it is deleted."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{PROG}-staging-{uuid.uuid4().hex[:12]}")
    os.mkdir(staging)  # not tempfile.mkdtemp: its 0700 mode would stay on the output folder
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not os.path.exists(out_dir):
        os.rename(staging, out_dir)
        return
    for name in os.listdir(staging):
        os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
    os.rmdir(staging)


def write_report(rows: Sequence[dict], out_dir: str) -> List[str]:
    """``report.json`` (lists as lists) and ``report.csv`` (lists joined by ``;``) of the explained images, with
    the columns of the first row (those of :func:`explain_image` and, for the demo, the prompt and answer)."""
    json_path, csv_path = os.path.join(out_dir, "report.json"), os.path.join(out_dir, "report.csv")
    with open(json_path, "w") as f:
        json.dump(list(rows), f, indent=2)
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ";".join(map(str, v)) if isinstance(v, list) else v for k, v in row.items()})
    return [json_path, csv_path]


def explain_image(subject: Subject, cam, image, stem: str, mode: str, layers: Sequence[int], method: str,
                  out_dir: str, source: str) -> dict:
    """Maps of ``layers`` for the predicted token of one image, drawn as ``mode`` into ``out_dir``; the report row."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    x = subject.wrapper.preprocess(image)
    index, label, probability = subject.predict(x)
    maps = cam(x, targets=[ClassifierOutputTarget(index)])[0]
    rgb = subject.wrapper.to_rgb(x)[0]
    files = render(out_dir, stem, mode, rgb, maps, layers, method, label)
    return dict(image=source, predicted_token=label, probability=round(probability, 6), method=method, mode=mode,
                layers=list(layers), files=[os.path.basename(f) for f in files])


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value
