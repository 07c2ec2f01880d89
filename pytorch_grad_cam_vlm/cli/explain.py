"""``pytorch-grad-cam-vlm explain``: maps of a model's prediction, answer or generated tokens for an image or a
folder."""
from __future__ import annotations

import argparse
import os
from typing import Sequence

from pytorch_grad_cam_vlm.cli.common import (PROG, _non_negative_float, _positive_int, choose_layers, explain_image,
                                             find_images, output_stems, smooth_options, staged_output, write_report)
from pytorch_grad_cam_vlm.demo import embedded_model_path
from pytorch_grad_cam_vlm.errors import InputError
from pytorch_grad_cam_vlm.methods.catalog import cam_options, resolve_method, uses_gradients
from pytorch_grad_cam_vlm.methods.sweep import LAYER_PRESETS, auto_single_layer, layer_sweep
from pytorch_grad_cam_vlm.models.registry import (QWEN_MODEL_CLASSES, Subject, check_question, layer_count, load_model, make_subject,
                                                  model_config, resolve_device, resolve_dtype)
from pytorch_grad_cam_vlm.visualize import MODES


def run_explain(args: argparse.Namespace) -> int:
    """Check every input (the model by its config alone), then load the model and explain each image."""
    from tqdm import tqdm

    method_cls = resolve_method(args.method)
    smooth = smooth_options(method_cls, args.n_samples, args.noise_level, args.seed)
    images = find_images(args.image)
    device = resolve_device(args.device)
    model_path = embedded_model_path(args.model)
    config, family = model_config(model_path)
    check_question(family, args.prompt, args.texts, args.answer, args.per_token)
    gradients = uses_gradients(method_cls, smooth)
    layers = choose_layers(method_cls, family, layer_count(config, family), args.layers, args.mode, gradients)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise InputError(f"--out {args.out} is a file, not a folder.")

    model, processor = load_model(model_path, family, resolve_dtype(args.dtype, device), device)
    subject = make_subject(family, model, processor, args.prompt, args.texts)
    layers = layers or [auto_single_layer(subject, gradients)]
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
                                     **cam_options(method_cls, subject.wrapper, smooth)) as cam:
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

    from pytorch_grad_cam_vlm.methods.answers import explain_generated, plot_per_token

    method = partial(method_cls, **cam_options(method_cls, subject.wrapper, smooth))
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


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``explain`` options, and :func:`run_explain` as the parser's ``run`` default."""
    parser.add_argument("--model", required=True, help="model folder or Hugging Face hub id")
    parser.add_argument("--image", required=True, help="image file, or a folder of images (run as a batch)")
    parser.add_argument("--prompt", help="question for Qwen2.5-VL / Qwen2-VL models")
    parser.add_argument("--texts", nargs="+", help="captions for CLIP / SigLIP models")
    parser.add_argument("--method", default="GradCAM",
                         help="grad-cam method by class name, or its Smooth twin (e.g. SmoothGradCAM)")
    parser.add_argument("--layers", default="auto",
                         help=f"{'|'.join(LAYER_PRESETS)} or indices like 3,5,7 (default auto: 6 layers spread over "
                              "depth; with --mode single, one measured layer)")
    parser.add_argument("--mode", choices=MODES, default="grid", help="figure (default grid)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                         help="model dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--n-samples", type=_positive_int, help="noisy copies of a Smooth method (default 50)")
    parser.add_argument("--noise-level", type=_non_negative_float,
                         help="noise std of a Smooth method as a fraction of the input range (default 0.15)")
    parser.add_argument("--seed", type=int, default=0, help="seed of a Smooth method's noise")
    parser.add_argument("--answer", help="Qwen: explain this answer (teacher-forced after the prompt; its score is "
                                          "the sum of its tokens' log-probabilities) instead of the next token")
    parser.add_argument("--per-token", action="store_true",
                         help="Qwen: generate the answer (or take --answer) and draw one map per answer token")
    parser.add_argument("--max-new-tokens", type=_positive_int, default=16,
                         help="longest generated answer of --per-token (default 16)")
    parser.set_defaults(run=run_explain)
    return parser
