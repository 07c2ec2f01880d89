"""The ``pytorch-grad-cam-vlm`` command (also ``python -m pytorch_grad_cam_vlm``).

    pytorch-grad-cam-vlm demo --out demo_out
    pytorch-grad-cam-vlm explain --model Qwen/Qwen2.5-VL-3B-Instruct --image photos/ --prompt "What is this?" \\
        --method SmoothGradCAM --layers auto --mode grid --out maps/

Every input is checked before anything is written; files are written into a staging folder beside ``--out`` and
moved into ``--out`` at the end, so a failed run leaves nothing behind. Bad input prints one ``error:`` line and
exits with code 2.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from pytorch_grad_cam_vlm.sweep import (LAYER_PRESETS, check_sweep, default_single_layer, layer_sweep,
                                        select_layers)
from pytorch_grad_cam_vlm.visualize import MODES, mode_layers, render

PROG = "pytorch-grad-cam-vlm"
EXIT_BAD_INPUT = 2
QWEN_MODEL_CLASSES = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "qwen2_vl": "Qwen2VLForConditionalGeneration"}
CLIP_FAMILIES = ("clip", "siglip", "siglip2")
UNSUPPORTED_METHODS = {
    "FullGrad": "it sums bias gradients of Conv2d/BatchNorm2d layers, which transformers do not have",
    "SmoothFullGrad": "it sums bias gradients of Conv2d/BatchNorm2d layers, which transformers do not have",
}
DEMO_TABLE_METHODS = ("Occlusion", "GradCAM", "GradCAMPlusPlus", "LayerCAM", "EigenCAM", "Attention")


class InputError(Exception):
    """Bad input: reported as one line, exit code 2."""


# ------------------------------------------------------------------------------------------------ methods
def method_classes() -> Dict[str, type]:
    """Every grad-cam method by class name (``BaseCAM`` subclasses; ShapleyCAM in this package's token-aware
    version) and their Smooth twins, less the ones that cannot run on transformers."""
    import pytorch_grad_cam
    from pytorch_grad_cam.base_cam import BaseCAM

    from pytorch_grad_cam_vlm import smooth_grad
    from pytorch_grad_cam_vlm.shapley_cam import ShapleyCAM

    classes = {name: cls for name, cls in vars(pytorch_grad_cam).items()
               if isinstance(cls, type) and issubclass(cls, BaseCAM)}
    classes["ShapleyCAM"] = ShapleyCAM
    classes.update({name: cls for name, cls in vars(smooth_grad).items() if isinstance(cls, type)
                    and issubclass(cls, smooth_grad.SmoothGrad) and cls is not smooth_grad.SmoothGrad})
    return {name: cls for name, cls in sorted(classes.items()) if name not in UNSUPPORTED_METHODS}


def resolve_method(name: str) -> type:
    """The method class called ``name`` (case-insensitive)."""
    if name in UNSUPPORTED_METHODS:
        raise InputError(f"Method {name} is not supported on vision-language models: {UNSUPPORTED_METHODS[name]}.")
    classes = method_classes()
    by_lower = {known.lower(): cls for known, cls in classes.items()}
    if name.lower() not in by_lower:
        raise InputError(f"Unknown method {name!r}: use one of {', '.join(classes)}.")
    return by_lower[name.lower()]


def is_smooth(method_cls: type) -> bool:
    from pytorch_grad_cam_vlm.smooth_grad import SmoothGrad

    return issubclass(method_cls, SmoothGrad)


# ------------------------------------------------------------------------------------------------ images
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


# ------------------------------------------------------------------------------------------------ models
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise InputError(f"Unknown device {name!r}: use auto, cpu, cuda or cuda:N.") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"Device {name} is not available here: CUDA is missing; use --device cpu.")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on CUDA, float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def model_config(name: str):
    """``(config, family)`` of a model folder or hub id, read from its config alone and checked to be supported."""
    from transformers import AutoConfig

    if os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name):
        if not os.path.isfile(os.path.join(os.path.expanduser(name), "config.json")):
            raise InputError(f"Model folder not found or without config.json: {name}")
    try:
        config = AutoConfig.from_pretrained(os.path.expanduser(name))
    except Exception as error:  # noqa: BLE001 (hub, parsing and unknown-architecture errors alike)
        reason = str(error).strip().split("\n")[0]
        raise InputError(f"Cannot read the model config of {name!r}: {reason}") from error
    family = getattr(config, "model_type", None)
    if family not in QWEN_MODEL_CLASSES and family not in CLIP_FAMILIES:
        raise InputError(f"Model family {family!r} is not supported: use a Qwen2.5-VL, Qwen2-VL, CLIP, SigLIP or "
                         "SigLIP 2 model.")
    return config, family


def layer_count(config, family: str) -> int:
    """How many layers the CLI picks from: Qwen's decoder layers, CLIP's vision layers."""
    if family in QWEN_MODEL_CLASSES:
        return getattr(config, "text_config", config).num_hidden_layers  # transformers 4.x: on the config itself
    return config.vision_config.num_hidden_layers


def check_question(family: str, prompt: Optional[str], texts: Optional[Sequence[str]], answer: Optional[str] = None,
                   per_token: bool = False) -> None:
    """Qwen models take a ``--prompt`` (and may take ``--answer`` / ``--per-token``), CLIP models ``--texts``."""
    if (answer is not None or per_token) and family not in QWEN_MODEL_CLASSES:
        raise InputError(f"--answer and --per-token explain a Qwen model's answer; a {family} model takes --texts.")
    if answer is not None and not answer.strip():
        raise InputError("--answer is empty: give the answer text to explain, or leave it out.")
    if family in QWEN_MODEL_CLASSES:
        if not prompt:
            raise InputError(f"A {family} model needs --prompt, the question to explain.")
        if texts:
            raise InputError("--texts is for CLIP and SigLIP models; a Qwen model takes --prompt.")
        return
    if not texts:
        raise InputError(f"A {family} model needs --texts, the captions to score the image against.")
    if prompt:
        raise InputError(f"--prompt is for Qwen models; a {family} model takes --texts.")
    if len(set(texts)) != len(texts):
        raise InputError(f"--texts must be distinct, got {list(texts)}.")


def skip_last(family: str, gradients: bool) -> bool:
    """Whether the last layer's image positions get no gradient: Qwen's decoder, and CLIP, which pools its class
    token (SigLIP pools every patch)."""
    return gradients and (family in QWEN_MODEL_CLASSES or family == "clip")


def load_model(name: str, family: str, dtype: torch.dtype, device: torch.device):
    """``(model, processor)`` of a supported family, in eval mode on ``device``."""
    import transformers

    model_cls = getattr(transformers, QWEN_MODEL_CLASSES[family]) if family in QWEN_MODEL_CLASSES \
        else transformers.AutoModel
    path = os.path.expanduser(name)
    model = model_cls.from_pretrained(path, dtype=dtype).to(device)
    return model.eval(), transformers.AutoProcessor.from_pretrained(path)


@dataclass
class Subject:
    """A wrapped model as the CLI explains it: its wrapper, the layers to pick from, and how it predicts."""

    wrapper: torch.nn.Module
    layers: List[torch.nn.Module]
    family: str

    def predict(self, x: torch.Tensor) -> Tuple[int, str, float]:
        """The predicted class of the clean image, ``(index, label, probability)``: the next token and its
        softmax probability for Qwen; the best text and its probability (softmax over the texts for CLIP, sigmoid
        for SigLIP) for CLIP models."""
        with torch.no_grad():
            logits = self.wrapper(x)[0].float()
        index = int(logits.argmax())
        if getattr(self.wrapper, "answer", None) is not None:  # the answer's score: sum of its log-probabilities
            return 0, str(self.wrapper.answer), float(logits[0].exp())
        if self.family in QWEN_MODEL_CLASSES:
            return index, self.wrapper.processor.tokenizer.decode([index]), float(logits.softmax(-1)[index])
        probabilities = logits.softmax(-1) if self.family == "clip" else logits.sigmoid()
        return index, self.wrapper.texts[index], float(probabilities[index])

    def auto_single_layer(self, gradients: bool) -> int:
        """The layer of ``--mode single --layers auto``: for Qwen the demo model's measured best relative depth
        (:func:`pytorch_grad_cam_vlm.localization.auto_layer`), for CLIP models two thirds of the depth."""
        if self.family in QWEN_MODEL_CLASSES:
            from pytorch_grad_cam_vlm.localization import auto_layer

            return auto_layer(self.wrapper)
        return default_single_layer(len(self.layers), skip_last(self.family, gradients))


def make_subject(family: str, model, processor, prompt: Optional[str], texts: Optional[Sequence[str]]) -> Subject:
    """The wrapper of a loaded model (:func:`check_question` has checked ``prompt`` and ``texts``)."""
    if family in QWEN_MODEL_CLASSES:
        from pytorch_grad_cam_vlm.qwen_vl import QwenVLWrapper

        wrapper = QwenVLWrapper(model, processor, prompt=prompt)
        return Subject(wrapper, wrapper.decoder_layers, family)
    from pytorch_grad_cam_vlm.clip import CLIPWrapper

    wrapper = CLIPWrapper(model, processor, texts=list(texts))
    return Subject(wrapper, wrapper.vision_layers, family)


# ------------------------------------------------------------------------------------------------ cams
def smooth_options(method_cls: type, n_samples: Optional[int], noise_level: Optional[float],
                   seed: Optional[int]) -> dict:
    """The Smooth methods' keywords that were given; refused for other methods."""
    if not is_smooth(method_cls):
        if n_samples is not None or noise_level is not None:
            raise InputError(f"--n-samples and --noise-level apply to Smooth methods only, not "
                             f"{method_cls.__name__}: try --method Smooth{method_cls.__name__}.")
        return {}
    return {k: v for k, v in dict(n_samples=n_samples, noise_level=noise_level, seed=seed).items() if v is not None}


def uses_gradients(method_cls: type, options: dict) -> bool:
    """Whether the method backpropagates: grad-cam sets it in each constructor, so it is read from an instance on
    a one-weight stand-in model, before the real model is loaded."""
    stand_in = torch.nn.Sequential(torch.nn.Linear(1, 1))
    cam = method_cls(model=stand_in, target_layers=[stand_in[0]], **options)
    cam.activations_and_grads.release()
    return cam.uses_gradients


def choose_layers(method_cls: type, family: str, n_layers: int, spec: str, mode: str,
                  gradients: bool) -> Optional[List[int]]:
    """The layer indices a mode draws for ``--layers spec``; ``None`` for ``--mode single --layers auto``, whose
    layer :meth:`Subject.auto_single_layer` picks once the model is loaded."""
    try:
        if mode == "single" and spec.strip().lower() == "auto":
            default_single_layer(n_layers, skip_last(family, gradients))  # refuses a model without a usable layer
            return None
        layers = mode_layers(mode, select_layers(n_layers, spec, skip_last(family, gradients)))
        check_sweep(method_cls, len(layers))
        return layers
    except ValueError as error:
        raise InputError(f"--layers {spec}: {error}") from error


def cam_options(method_cls: type, subject: Subject, smooth: dict) -> dict:
    """Constructor keywords for ``method_cls`` on ``subject`` beyond model and layers."""
    from pytorch_grad_cam import AblationCAM

    options = dict(smooth, reshape_transform=subject.wrapper.reshape_transform)
    if issubclass(method_cls, AblationCAM):
        options["ablation_layer"] = subject.wrapper.ablation_layer()
    return options


# ------------------------------------------------------------------------------------------------ output
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


# ------------------------------------------------------------------------------------------------ commands
def run_explain(args: argparse.Namespace) -> int:
    """Check every input (the model by its config alone), then load the model and explain each image."""
    from tqdm import tqdm

    method_cls = resolve_method(args.method)
    smooth = smooth_options(method_cls, args.n_samples, args.noise_level, args.seed)
    images = find_images(args.image)
    device = resolve_device(args.device)
    config, family = model_config(args.model)
    check_question(family, args.prompt, args.texts, args.answer, args.per_token)
    gradients = uses_gradients(method_cls, smooth)
    layers = choose_layers(method_cls, family, layer_count(config, family), args.layers, args.mode, gradients)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise InputError(f"--out {args.out} is a file, not a folder.")

    model, processor = load_model(args.model, family, resolve_dtype(args.dtype, device), device)
    subject = make_subject(family, model, processor, args.prompt, args.texts)
    layers = layers or [subject.auto_single_layer(gradients)]
    if args.per_token:
        return run_per_token(args, subject, method_cls, smooth, images, layers[-1])
    if args.answer is not None:
        try:
            subject.wrapper.set_answer(args.answer)
        except ValueError as error:
            raise InputError(f"--answer {args.answer!r}: {error}") from error
    rows = []
    with staged_output(args.out) as staging:
        with layer_sweep(method_cls)(model=subject.wrapper, target_layers=[subject.layers[i] for i in layers],
                                     **cam_options(method_cls, subject, smooth)) as cam:
            progress = tqdm(images, desc=PROG, unit="image", disable=len(images) < 2)
            for image, stem in zip(progress, output_stems(images)):
                rows.append(explain_image(subject, cam, image, stem, args.mode, layers, method_cls.__name__,
                                          staging, image))
        write_report(rows, staging)
    kind = "decoder" if family in QWEN_MODEL_CLASSES else "vision"
    print(f"Explained {len(rows)} image(s) with {method_cls.__name__} at {kind} layer(s) "
          f"{', '.join(map(str, layers))}; wrote {sum(len(r['files']) for r in rows) + 2} files to {args.out}, "
          f"listed in {os.path.join(args.out, 'report.csv')} and report.json.")
    return 0


def run_per_token(args: argparse.Namespace, subject: Subject, method_cls: type, smooth: dict,
                  images: Sequence[str], layer: int) -> int:
    """``--per-token``: generate the answer (or take ``--answer``) and explain each of its tokens at one layer, with
    the tokens before it teacher-forced; a figure of every token's map and the maps as ``.npy`` per image."""
    from functools import partial

    import numpy as np
    from tqdm import tqdm

    from pytorch_grad_cam_vlm.answers import explain_generated, plot_per_token

    method = partial(method_cls, **cam_options(method_cls, subject, smooth))
    rows = []
    with staged_output(args.out) as staging:
        progress = tqdm(images, desc=PROG, unit="image", disable=len(images) < 2)
        for image, stem in zip(progress, output_stems(images)):
            x = subject.wrapper.preprocess(image)
            try:
                result = explain_generated(subject.wrapper, x, [subject.layers[layer]], method=method,
                                           max_new_tokens=args.max_new_tokens, answer=args.answer)
            except ValueError as error:
                raise InputError(str(error)) from error
            figure = os.path.join(staging, f"{stem}_{method_cls.__name__}_per_token.png")
            plot_per_token(result, subject.wrapper.to_rgb(x)[0], figure,
                           title=f"{method_cls.__name__} · layer {layer} · answer {result.text!r}")
            maps = os.path.join(staging, f"{stem}_{method_cls.__name__}_per_token.npy")
            np.save(maps, result.maps)
            rows.append(dict(image=image, answer=result.text, tokens=list(result.tokens),
                             probabilities=[round(float(p), 6) for p in result.probabilities],
                             method=method_cls.__name__, mode="per-token", layers=[layer],
                             files=[os.path.basename(figure), os.path.basename(maps)]))
        write_report(rows, staging)
    print(f"Explained the answers of {len(rows)} image(s) token by token with {method_cls.__name__} at decoder "
          f"layer {layer}; wrote {2 * len(rows) + 2} files to {args.out}, listed in "
          f"{os.path.join(args.out, 'report.csv')} and report.json.")
    return 0


def demo_methods() -> dict:
    """The localization table's methods for the demo: the cheap ones of
    :func:`pytorch_grad_cam_vlm.localization.default_methods`, and SmoothGradCAM with 8 noisy copies (not 50),
    so that the demo runs in about a minute on a laptop CPU."""
    from functools import partial

    from pytorch_grad_cam_vlm.localization import default_methods, grad_cam_method
    from pytorch_grad_cam_vlm.smooth_grad import SmoothGradCAM

    methods = {name: method for name, method in default_methods().items() if name in DEMO_TABLE_METHODS}
    methods["SmoothGradCAM"] = (grad_cam_method(partial(SmoothGradCAM, n_samples=8, seed=0)), True)
    return methods


def run_demo(args: argparse.Namespace) -> int:
    """The embedded demo model on held-out samples: a single-layer figure and a layer grid for the first samples,
    and the localization table of the methods against occlusion on all of them."""
    from PIL import Image

    from pytorch_grad_cam_vlm.demo import load_demo_model, make_demo_samples
    from pytorch_grad_cam_vlm.localization import localization_table, write_table

    method_cls = resolve_method(args.method)
    gradients = uses_gradients(method_cls, {})
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise InputError(f"--out {args.out} is a file, not a folder.")
    model, processor = load_demo_model()
    samples = make_demo_samples(args.n, seed=args.seed, split="test")
    rows = []
    with staged_output(args.out) as staging:
        for i, sample in enumerate(samples[:args.figures]):
            subject = make_subject("qwen2_5_vl", model, processor, sample.prompt, None)
            Image.fromarray(sample.image).save(os.path.join(staging, f"sample{i}.png"))
            for mode, spec, stem in (("single", "auto", f"sample{i}"), ("grid", "all", f"sample{i}_layers")):
                layers = choose_layers(method_cls, "qwen2_5_vl", len(subject.layers), spec, mode, gradients) \
                    or [subject.auto_single_layer(gradients)]
                with layer_sweep(method_cls)(model=subject.wrapper, target_layers=[subject.layers[k] for k in layers],
                                             **cam_options(method_cls, subject, {})) as cam:
                    row = explain_image(subject, cam, sample.image, stem, mode, layers, method_cls.__name__,
                                        staging, f"sample{i}.png")
                rows.append(dict(row, prompt=sample.prompt, answer=sample.answer))
        table = localization_table(subject.wrapper, samples, demo_methods())
        header = (f"Localization on {len(samples)} held-out demo samples (seed {args.seed}): the share of maps whose "
                  "maximum lies on the asked object (pointing) or on another object (distractor); SmoothGradCAM "
                  "with 8 noisy copies.\n\n")
        table_path = os.path.join(args.out, os.path.basename(write_table(table, staging, header)[0]))
        write_report(rows, staging)
        written = sorted(os.listdir(staging))
    print(f"Demo: figures of {len(rows) // 2} held-out sample(s), the localization table of {len(samples)}; wrote "
          f"{len(written)} files to {args.out}:")
    for name in written:
        print(f"  {os.path.join(args.out, name)}")
    with open(table_path) as f:
        print("\n" + f.read())
    return 0


# ------------------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Grad-CAM and friends for vision-language models.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run on the embedded demo model (no download)",
                               description="Overlays, a layer grid and the localization table of the embedded "
                                           "demo model on held-out samples.")
    demo.add_argument("--out", default="pytorch_grad_cam_vlm_demo", help="output folder")
    demo.add_argument("--method", default="GradCAM", help="method of the figures (default GradCAM)")
    demo.add_argument("--n", type=_positive_int, default=8, help="held-out samples in the localization table")
    demo.add_argument("--figures", type=_positive_int, default=2, help="samples drawn as figures")
    demo.add_argument("--seed", type=int, default=0, help="seed of the held-out samples")
    demo.set_defaults(run=run_demo)

    from pytorch_grad_cam_vlm import benchmark  # imported here: benchmark imports this module

    benchmark.add_arguments(commands.add_parser(
        "benchmark", help="faithfulness benchmark: ROAD, pointing and sanity over methods x layers"))

    explain = commands.add_parser("explain", help="explain a model's prediction on images",
                                  description="Maps of the predicted next token (Qwen) or best-matching text "
                                              "(CLIP, SigLIP) for one image or a folder of images.")
    explain.add_argument("--model", required=True, help="model folder or Hugging Face hub id")
    explain.add_argument("--image", required=True, help="image file, or a folder of images (run as a batch)")
    explain.add_argument("--prompt", help="question for Qwen2.5-VL / Qwen2-VL models")
    explain.add_argument("--texts", nargs="+", help="captions for CLIP / SigLIP models")
    explain.add_argument("--method", default="GradCAM",
                         help="grad-cam method by class name, or its Smooth twin (e.g. SmoothGradCAM)")
    explain.add_argument("--layers", default="auto",
                         help=f"{'|'.join(LAYER_PRESETS)} or indices like 3,5,7 (default auto: 6 layers spread over "
                              "depth; with --mode single, one measured layer)")
    explain.add_argument("--mode", choices=MODES, default="grid", help="figure (default grid)")
    explain.add_argument("--out", required=True, help="output folder")
    explain.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                         help="model dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    explain.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    explain.add_argument("--n-samples", type=_positive_int, help="noisy copies of a Smooth method (default 50)")
    explain.add_argument("--noise-level", type=_non_negative_float,
                         help="noise std of a Smooth method as a fraction of the input range (default 0.15)")
    explain.add_argument("--seed", type=int, default=0, help="seed of a Smooth method's noise")
    explain.add_argument("--answer", help="Qwen: explain this answer (teacher-forced after the prompt; its score is "
                                          "the sum of its tokens' log-probabilities) instead of the next token")
    explain.add_argument("--per-token", action="store_true",
                         help="Qwen: generate the answer (or take --answer) and draw one map per answer token")
    explain.add_argument("--max-new-tokens", type=_positive_int, default=16,
                         help="longest generated answer of --per-token (default 16)")
    explain.set_defaults(run=run_explain)
    return parser


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


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit code (argparse's own errors included)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return args.run(args)
    except SystemExit as exit_:  # argparse: --help, or a usage error it has already printed
        return exit_.code if isinstance(exit_.code, int) else EXIT_BAD_INPUT
    except (InputError, ValueError, FileNotFoundError, NotImplementedError) as error:
        print(f"{PROG}: error: {str(error).splitlines()[0] if str(error) else type(error).__name__}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
