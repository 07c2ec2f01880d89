"""What the subcommands share: finding the images, choosing layers and Smooth options from the flags, and writing
output atomically with a report."""
from __future__ import annotations

import argparse
import contextlib
import io
import csv
import json
import math
import os
import sys
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from pytorch_grad_cam_vlm.errors import InputError
from pytorch_grad_cam_vlm.image import load_rgb, upscale_warning
from pytorch_grad_cam_vlm.layers import Layer
from pytorch_grad_cam_vlm.methods.auto import Explanation, candidate_layers, explain, is_auto
from pytorch_grad_cam_vlm.methods.catalog import is_smooth
from pytorch_grad_cam_vlm.methods.prompt_words import prompt_word_relevance, takes_prompt
from pytorch_grad_cam_vlm.methods.sweep import check_sweep, select_layers
from pytorch_grad_cam_vlm.metrics.deletion_check import DEFAULT_FRACTIONS
from pytorch_grad_cam_vlm.metrics.map_check import MapCheck
from pytorch_grad_cam_vlm.models.registry import QWEN_MODEL_CLASSES, Subject, skip_last
from pytorch_grad_cam_vlm.output import row_files, staged_output
from pytorch_grad_cam_vlm.visualize import append_words, mode_layers, render

PROG = "pytorch-grad-cam-vlm"
MAX_ASPECT_RATIO = 200  # Qwen's smart_resize refuses more
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C


def find_images(path: str) -> List[str]:
    """The image files of ``path``: the file itself, or a folder's files with an image extension (sorted, not
    recursive). Each one is decoded once here, so that an unreadable image fails before anything is written."""
    from PIL import Image

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
            width, height = load_rgb(image).size
        except (ValueError, OSError) as error:
            raise InputError(str(error).split("\n")[0]) from error
        if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
            raise InputError(f"{image} is {width}x{height} pixels: an aspect ratio over {MAX_ASPECT_RATIO} cannot be "
                             "resized onto the model's token grid; crop it first.")
    return images


def output_stems(images: Sequence[str]) -> List[str]:
    """File name prefixes, one per image: its name without extension, or with the extension where two names
    would clash (``a.png`` and ``a.jpg``)."""
    stems = [os.path.splitext(os.path.basename(image))[0] for image in images]
    return [os.path.basename(image).replace(".", "_") if stems.count(stem) > 1 else stem
            for image, stem in zip(images, stems)]


def smooth_options(methods: Sequence[type], n_samples: Optional[int], noise_level: Optional[float],
                   seed: Optional[int]) -> dict:
    """The Smooth methods' keywords that were given; refused unless every method is a Smooth one."""
    plain = [cls.__name__ for cls in methods if not is_smooth(cls)]
    if plain:
        if n_samples is not None or noise_level is not None:
            raise InputError(f"--n-samples and --noise-level apply to Smooth methods only, not {plain[0]}: try "
                             f"--method Smooth{plain[0]}.")
        return {}
    return {k: v for k, v in dict(n_samples=n_samples, noise_level=noise_level, seed=seed).items() if v is not None}


def choose_layers(methods: Sequence[type], family: str, n_layers: int, spec: str, mode: str,
                  gradients: bool) -> List[Layer]:
    """The candidate layers of ``--layers spec``: ``auto`` is :func:`~pytorch_grad_cam_vlm.methods.auto.
    candidate_layers` (with the projector on a vision-language model); the single mode draws the one of them whose
    map ranks best on the deletion check, the other modes draw what :func:`~pytorch_grad_cam_vlm.visualize.
    mode_layers` takes of them."""
    try:
        last_blank, projector = skip_last(family, gradients), family in QWEN_MODEL_CLASSES
        if spec.strip().lower() == "auto":
            layers = candidate_layers(n_layers, last_blank, projector)
        else:
            layers = select_layers(n_layers, spec, last_blank, projector)
        if mode != "single":
            mode_layers(mode, layers)  # refuses a mode that cannot draw these layers
        for cls in methods:
            check_sweep(cls, len(layers))
        return layers
    except ValueError as error:
        raise InputError(f"--layers {spec}: {error}") from error


def load_subject(args: argparse.Namespace, methods: Sequence[type], smooth: dict,
                 check_family: Callable[[str], None]) -> Tuple[Subject, List[Layer], List[dict], List[str]]:
    """What ``explain --images`` and ``explain --video`` share once their own inputs are checked: the model's family
    read from its config alone and refused by ``check_family`` where it cannot take the input, the question, the
    methods for an ``--answer``, the candidate layers (drawn as the single mode draws them), the output folder and
    an earlier run's results in it; then the model loaded and wrapped, its answer set. Returns ``(subject, layers,
    kept rows, stale files)`` (:func:`~pytorch_grad_cam_vlm.output.earlier_run`)."""
    from pytorch_grad_cam_vlm.demo import embedded_model_path
    from pytorch_grad_cam_vlm.methods.catalog import check_answer_method, uses_gradients
    from pytorch_grad_cam_vlm.models.registry import (check_question, layer_count, load_model, make_subject,
                                                      model_config, resolve_device, resolve_dtype)
    from pytorch_grad_cam_vlm.output import check_out_dir, earlier_run

    device = resolve_device(args.device)
    model_path = embedded_model_path(args.model)
    config, family = model_config(model_path)
    check_family(family)
    check_question(family, args.prompt, args.texts, args.answer)
    if args.answer is not None:
        for cls in methods:
            check_answer_method(cls)
    layers = choose_layers(methods, family, layer_count(config, family), args.layers, "single",
                           all(uses_gradients(cls, smooth) for cls in methods))
    check_out_dir(args.out)
    kept, stale = earlier_run(args.out, args.overwrite, args.resume)

    model, processor = load_model(model_path, family, resolve_dtype(args.dtype, device), device, args.allow_pickle,
                                  args.trust_remote_code)
    subject = make_subject(family, model, processor, args.prompt, None)
    if args.answer is not None:
        try:
            subject.wrapper.set_answer(args.answer)
        except ValueError as error:
            raise InputError(f"--answer {args.answer!r}: {error}") from error
    return subject, layers, kept, stale


def write_report(rows: Sequence[dict], out_dir: str, name: str = "report") -> List[str]:
    """``report.json`` (lists as lists) and ``report.csv`` (lists joined by ``;``) of the explained images, with
    the columns of the first row (those of :func:`explain_image` and, for the demo, the prompt and answer); ``name``
    replaces ``report`` in the file names."""
    json_path, csv_path = os.path.join(out_dir, f"{name}.json"), os.path.join(out_dir, f"{name}.csv")
    rows = [{k: json_safe(v) for k, v in row.items()} for row in rows]
    with open(json_path, "w") as f:
        json.dump(rows, f, indent=2, allow_nan=False)
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ";".join(map(str, v)) if isinstance(v, list) else v for k, v in row.items()})
    return [json_path, csv_path]


def json_safe(value):
    """NaN and infinities (in lists too) as ``None``: JSON has no NaN (``JSON.parse`` refuses it), null it reads."""
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def explain_batch(out_dir: str, images: Sequence[str], explain_one: Callable[..., dict],
                  kept: Sequence[dict] = (), stale: Sequence[str] = ()) -> List[dict]:
    """``explain_one(image, stem, staging, progress)`` (a report row; ``progress``: the tqdm bar, for a postfix) for
    each of ``images`` that the ``kept`` rows of an
    earlier run (``--resume``) do not list, into a staging folder that moves into ``out_dir`` with the report of
    the kept and the new rows (``stale``: an earlier run's files, which ``--overwrite`` replaces). Returns the new
    rows. Ctrl-C keeps what finished: the images done so far and their report, one line saying how to resume, exit
    code 130 (nothing is written when no image had finished)."""
    from tqdm import tqdm

    done = {row["image"] for row in kept}
    todo = [(image, stem) for image, stem in zip(images, output_stems(images)) if image not in done]
    rows: List[dict] = []
    interrupted = False
    with staged_output(out_dir, stale) as staging:
        try:
            progress = tqdm(todo, desc=PROG, unit="image", disable=len(todo) < 2)
            for image, stem in progress:
                rows.append(explain_one(image, stem, staging, progress))
        except KeyboardInterrupt:
            if not rows:
                raise
            interrupted = True
            listed = {name for row in rows for name in row_files(row)}
            for name in set(os.listdir(staging)) - listed:  # the unfinished image's files
                os.remove(os.path.join(staging, name))
        write_report(list(kept) + rows, staging)
    if interrupted:
        print(f"{PROG}: interrupted after {len(rows)} of {len(todo)} images: their maps and report are in "
              f"{out_dir}; to explain the other {len(todo) - len(rows)}, rerun the same command with --resume.",
              file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED)
    return rows


def explain_image(subject: Subject, image, stem: str, mode: str, methods: Sequence[type], method_name: str,
                  layers: Sequence[Layer], options: dict, out_dir: str, source: str, choice: str = "staged",
                  stage: Optional[Callable[[str], None]] = None) -> dict:
    """Maps of the candidate ``methods`` x ``layers`` for the predicted token of one image, each scored by the
    deletion check (:func:`~pytorch_grad_cam_vlm.methods.auto.explain`); the best map (single mode) or the best
    method's layers (other modes) drawn as ``mode`` into ``out_dir``, one warning line on stderr for each drawn map
    that fails the check. ``choice`` and ``stage`` go to ``explain`` (modes that draw several layers check every
    candidate in full). Returns the report row."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from pytorch_grad_cam_vlm.metrics.answer_change import answer_change

    picture = load_rgb(image)
    x = subject.wrapper.preprocess(picture)
    index, label, probability = subject.predict(x)
    with inner_progress_silenced(methods):
        result = explain(subject.wrapper, x, [ClassifierOutputTarget(index)], methods, layers, options=options,
                         choice=choice if mode == "single" else "full", stage=stage, image_size=picture.size[::-1],
                         fallback=method_name == "auto")
    drawn = [result.layers[0]] if mode == "single" else mode_layers(mode, result.candidate_layers, result.layers[0])
    model_maps, checks, drawn_methods = drawn_maps(result, drawn)
    reliance = result.reliance[0]
    warnings = [w for w in [result.layer_warning(source, k) for k in drawn]
                + result.fallback_lines(source, gradient_drawn=result.gradient_layer() in drawn)
                + [reliance.warning(source)]
                + [upscale_warning(source, picture.size[::-1], x.shape[2:])] if w]
    for line in warnings:
        print(f"{PROG}: warning: {line}", file=sys.stderr)
    rgb = np.asarray(picture, dtype=np.float32) / 255  # drawn on the user's image, the maps carried onto it
    named = list(dict.fromkeys(drawn_methods))[::-1]  # the chosen map's first: the occlusion fallback beside layers
    chosen = f"{method_name} → {' + '.join(named)}" if [method_name] != named else method_name
    files = render(out_dir, stem, mode, rgb, result.frames[0].to_image(model_maps), drawn,
                   method_name, label, notes=[check_note(c, reliance.clean) for c in checks], chosen=result.layers[0],
                   legend=CHECK_LEGEND,
                   title=chosen + (" · answer from the prompt: no map to trust" if reliance.prompt_only else ""))
    words = prompt_word_relevance(subject.wrapper, x, ClassifierOutputTarget(index)) \
        if takes_prompt(subject.wrapper) else None
    if words is not None:
        append_words(files[0], words.words, words.relevance, words.label)
    return dict(image=source, **target_cells(subject.wrapper, label, probability),
                method=result.methods[0], mode=mode, layers=list(drawn), layer_methods=drawn_methods,
                check=[round(c.score, 6) for c in checks],
                peak_drop=[round(c.peak_drop, 6) for c in checks], clean_score=round(reliance.clean, 6),
                top_change=[round(check_change(c, reliance.clean)[0], 4) for c in checks],
                bottom_change=[round(check_change(c, reliance.clean)[1], 4) for c in checks],
                answer_change=[answer_change(subject.wrapper, x, cam).share for cam in model_maps],
                verdict=[c.verdict for c in checks], null_margin=[margin_cell(c) for c in checks],
                stability=[None if c.stability is None else round(c.stability, 3) for c in checks],
                candidates=f"{'/'.join(result.candidate_methods)} x layers "
                f"{','.join(map(str, result.candidate_layers))}", visual_reliance=round(reliance.share, 6),
                blur_reliance=round(reliance.blur_share, 6), image_drop=round(reliance.drop, 6),
                warning=" ".join(warnings), note=image_note(image), **(words.report() if words else {}),
                files=[os.path.basename(f) for f in files])


def drawn_maps(result: Explanation, layers: Sequence[Layer]) -> Tuple[np.ndarray, List[MapCheck], List[str]]:
    """The maps ``(L, H, W)`` on the model's input, checks and methods of image 0 at ``layers``: the chosen map at
    its layer (the occlusion fallback's at ``INPUT``), the candidate method the check ranked best at the others."""
    m, _ = result.candidate_choice(0)
    at = [None if k == result.layers[0] else result.candidate_layers.index(k) for k in layers]
    return (np.stack([result.model_maps[0] if l is None else result.candidate_maps[0, m, l] for l in at]),
            [result.checks[0] if l is None else result.candidate_checks[0][m][l] for l in at],
            [result.methods[0] if l is None else result.candidate_methods[m] for l in at])


def target_cells(wrapper, label: str, probability: float) -> dict:
    """A report row's target: the predicted token and its probability, or the given answer and its probability."""
    answered = getattr(wrapper, "answer", None) is not None
    return {"answer" if answered else "predicted_token": label,
            "answer_probability" if answered else "probability": round(probability, 6)}


def inner_progress_silenced(methods: Sequence[type]):
    """grad-cam's ScoreCAM draws a progress bar per batch of channels, hundreds per image: silence stderr while a
    ScoreCAM-based method runs, so that the command's own bar (created before, on the real stderr) is the one shown.
    Exceptions still propagate."""
    from pytorch_grad_cam import ScoreCAM

    if any(issubclass(cls, ScoreCAM) for cls in methods):
        return contextlib.redirect_stderr(io.StringIO())
    return contextlib.nullcontext()


def image_note(image) -> str:
    """What the report says about how an image file was read: an animation's first frame is explained."""
    from pytorch_grad_cam_vlm.image import frame_count

    frames = frame_count(image) if isinstance(image, str) else 1
    return f"animated: the first of {frames} frames explained" if frames > 1 else ""


def method_name(spec: str, methods: Sequence[type]) -> str:
    """``auto`` for ``--method auto``, else the method's class name."""
    return "auto" if is_auto(spec) else methods[0].__name__


CHECK_LEGEND = ("top (bottom) 20% off: the target's change, as a share of its clean score, when the map's top "
                "(bottom) 20 % of pixels are removed; trust a map whose top costs more. Colours: each map scaled to "
                "[0, 1].")


def check_change(check: MapCheck, clean: float) -> tuple:
    """``(top, bottom)``: the target's change when the map's top (bottom) share of pixels at the check's largest
    fraction is removed, as a share of the clean score's size (as ``VisualReliance.share``; NaN when it is 0)."""
    if check.blank or not clean:
        return float("nan"), float("nan")
    return (check.top_removed[-1] - clean) / abs(clean), (check.bottom_removed[-1] - clean) / abs(clean)


def check_note(check: MapCheck, clean: float) -> str:
    """The deletion check as a panel label says it, on the clean score's scale with fixed precision: ``top 20% off:
    -34.2% · bottom: -2.0%``, then the verdict where it is not "ok" (:attr:`MapCheck.verdict`: ``· untestable``
    when the check cannot tell maps apart on the image, ``· incomplete`` when the bottom holds evidence too,
    ``· inverted`` when the bottom costs more, ``· chance`` when the map does not beat the null, ...); ``blank``."""
    if check.blank:
        return "blank"
    fraction = DEFAULT_FRACTIONS[len(check.top_removed) - 1]
    top, bottom = (round(100 * v, 1) + 0 for v in check_change(check, clean))  # + 0: no "-0.0"
    return f"top {fraction:.0%} off: {top:+.1f}% · bottom: {bottom:+.1f}%" + (
        "" if check.verdict == "ok" else f" · {check.verdict}")


def margin_cell(check: MapCheck) -> Optional[float]:
    """A report's ``null_margin``: how many of the null's spreads the map's check total lies above chance (NaN when
    blank, None when no null was measured)."""
    return None if check.null_margin is None else round(check.null_margin, 3)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text}")
    return value


def _noise_level(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected the noise's standard deviation as a fraction of the image's "
                                         f"range, 0..1 (0.15 by default; 0.1-0.2 works best), got {text}")
    return value


def add_rerun_arguments(parser: argparse.ArgumentParser) -> None:
    """``--overwrite`` and ``--resume``: what a run does when ``--out`` holds the results of an earlier one (without
    either it refuses; see :func:`~pytorch_grad_cam_vlm.output.earlier_run`)."""
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results --out already holds (their report and the files it lists)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the results --out already holds and explain only the images its report does not "
                             "list (after an interrupted run)")


def add_loading_arguments(parser: argparse.ArgumentParser, device_help: str = "auto, cpu, cuda or cuda:N") -> None:
    """How the model is loaded: ``--dtype``, ``--device``, and ``--allow-pickle`` and ``--trust-remote-code`` (both
    off, because each lets a checkpoint run code)."""
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="model dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--device", default="auto", help=device_help)
    parser.add_argument("--allow-pickle", action="store_true",
                        help="load a pickle checkpoint (pytorch_model.bin), which can run code: only from a source "
                             "you trust (default: safetensors only)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the checkpoint's own Python code (transformers' trust_remote_code; default off)")
