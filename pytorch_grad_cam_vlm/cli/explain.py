"""``pytorch-grad-cam-vlm explain``: maps of a model's prediction, answer or generated tokens for an image or a
folder."""
from __future__ import annotations

import argparse
import os
import warnings
from typing import Sequence

from pytorch_grad_cam_vlm.cli import classify, video
from pytorch_grad_cam_vlm.cli.common import (add_loading_arguments, add_rerun_arguments, _noise_level, _positive_int,
                                             check_note, choose_layers, explain_batch, explain_image, find_images,
                                             margin_cell, method_name, smooth_options)
from pytorch_grad_cam_vlm.cli.several_images import run_several, several_images_argument
from pytorch_grad_cam_vlm.demo import EMBEDDED_MODELS, embedded_model_path
from pytorch_grad_cam_vlm.errors import InputError
from pytorch_grad_cam_vlm.image import load_rgb
from pytorch_grad_cam_vlm.layers import PROJECTOR, layer_depth, layer_modules, layer_name
from pytorch_grad_cam_vlm.methods.auto import AUTO_METHODS, OCCLUSION, candidate_methods, explain
from pytorch_grad_cam_vlm.methods.catalog import cam_options, check_answer_method, uses_gradients
from pytorch_grad_cam_vlm.methods.sweep import LAYER_PRESETS
from pytorch_grad_cam_vlm.models.classifier import is_classifier_spec
from pytorch_grad_cam_vlm.models.registry import (QWEN_MODEL_CLASSES, Subject, check_question, layer_count,
                                                  load_model, make_subject, model_config, resolve_device,
                                                  resolve_dtype)
from pytorch_grad_cam_vlm.output import check_out_dir, earlier_run
from pytorch_grad_cam_vlm.visualize import MODES


def run_explain(args: argparse.Namespace) -> int:
    """Check every input (the model by its config alone), then load the model and explain each image (or the
    video: :func:`~pytorch_grad_cam_vlm.cli.video.run_video`)."""
    if args.images is not None:
        return run_several(args)
    if args.video is not None:
        return video.run_video(args)
    if args.fps is not None or args.max_frames is not None:
        raise InputError("--fps and --max-frames say how to sample a --video; leave them out with --image.")
    if args.per_token and args.mode is not None:
        warnings.warn(f"--mode {args.mode} is left out with --per-token, which draws one figure of every answer "
                      "token's map.")
    args.mode = args.mode or "single"
    if is_classifier_spec(args.model):
        return classify.run_classify(args)
    methods = candidate_methods(args.method)
    smooth = smooth_options(methods, args.n_samples, args.noise_level, args.seed)
    images = find_images(args.image)
    device = resolve_device(args.device)
    model_path = embedded_model_path(args.model)
    config, family = model_config(model_path)
    check_question(family, args.prompt, args.texts, args.answer, args.per_token)
    if args.answer is not None or args.per_token:
        for cls in methods:
            check_answer_method(cls)
    gradients = all(uses_gradients(cls, smooth) for cls in methods)
    layers = choose_layers(methods, family, layer_count(config, family), args.layers, args.mode, gradients)
    check_out_dir(args.out)
    kept, stale = earlier_run(args.out, args.overwrite, args.resume)

    model, processor = load_model(model_path, family, resolve_dtype(args.dtype, device), device, args.allow_pickle,
                                  args.trust_remote_code)
    subject = make_subject(family, model, processor, args.prompt, args.texts)
    if args.per_token:
        return run_per_token(args, subject, methods, smooth, images, layers, kept, stale)
    if args.answer is not None:
        try:
            subject.wrapper.set_answer(args.answer)
        except ValueError as error:
            raise InputError(f"--answer {args.answer!r}: {error}") from error
    name = method_name(args.method, methods)

    def explain_one(image: str, stem: str, staging: str, progress) -> dict:
        return explain_image(subject, image, stem, args.mode, methods, name, layers, smooth, staging, image,
                             "peak" if args.fast else "staged",
                             lambda stage: progress.set_postfix_str(f"{os.path.basename(image)}: {stage}"))

    rows = explain_batch(args.out, images, explain_one, kept, stale)
    kind = "decoder" if family in QWEN_MODEL_CLASSES else "vision"
    chosen = sorted({pair for row in rows for pair in zip(row.get("layer_methods") or [row["method"]] * len(
        row["layers"]), row["layers"])}, key=lambda pair: (pair[0], layer_depth(pair[1])))
    choice = (f" (chosen by the deletion check among {'/'.join(cls.__name__ for cls in methods)} at layers "
              f"{', '.join(map(str, layers))}" + (", occlusion of token cells where none passed" if any(
                  row["method"] == OCCLUSION for row in rows) else "") + ")"
              if args.mode == "single" and len(layers) > 1 or len(methods) > 1 else "")
    where = ", ".join((f"{m} at " if len(methods) > 1 or m == OCCLUSION else "") + layer_name(k, kind)
                      for m, k in chosen)
    print(f"Explained {len(rows)} image(s) with {name}{': ' if len(methods) > 1 else ' at '}{where}{choice}; wrote "
          f"{sum(len(r['files']) for r in rows) + 2} files to {args.out}, listed in "
          f"{os.path.join(args.out, 'report.csv')} and report.json.")
    return 0


def run_per_token(args: argparse.Namespace, subject: Subject, methods: Sequence[type], smooth: dict,
                  images: Sequence[str], layers: Sequence[int], kept: Sequence[dict] = (),
                  stale: Sequence[str] = ()) -> int:
    """``--per-token``: generate the answer (or take ``--answer``) and explain each of its tokens at one layer, with
    the tokens before it teacher-forced; a figure of every token's map and the maps as ``.npy`` per image. With
    several candidate methods or layers (``auto``), the one whose map of the whole answer ranks best on the
    deletion check explains the tokens."""
    from functools import partial

    import numpy as np

    from pytorch_grad_cam_vlm.methods.answers import explain_generated, generate_answer, plot_per_token

    if args.layers.strip().lower() != "auto" and len(layers) > 1:
        raise InputError(f"--per-token draws one layer, got --layers {args.layers}: pass one layer, or auto to "
                         "take the layer whose answer map ranks best on the deletion check.")
    wrapper = subject.wrapper

    def explain_one(image: str, stem: str, staging: str, progress) -> dict:
        picture = load_rgb(image)
        x = wrapper.preprocess(picture)
        try:
            if args.answer is None:
                answer = generate_answer(wrapper, x, args.max_new_tokens)
            else:
                wrapper.set_answer(args.answer)
                answer = wrapper.layout_for(x.shape[2], x.shape[3]).answer_ids.tolist()
            wrapper.set_answer(answer)
            whole = explain(wrapper, x, None, methods, layers, options=smooth)
            wrapper.set_answer(None)
            m, l = whole.candidate_choice(0)  # a gradient method's layer, also where occlusion was chosen
            method_cls, layer, check = methods[m], whole.candidate_layers[l], whole.candidate_checks[0][m][l]
            result = explain_generated(wrapper, x, layer_modules(wrapper, [layer]), answer=answer,
                                       method=partial(method_cls, **cam_options(method_cls, wrapper, smooth)),
                                       image_size=picture.size[::-1])  # drawn and saved on the user's image
        except ValueError as error:
            raise InputError(str(error)) from error
        figure = os.path.join(staging, f"{stem}_{method_cls.__name__}_per_token.png")
        plot_per_token(result, np.asarray(picture, dtype=np.float32) / 255, figure,
                       title=f"{method_cls.__name__} · {layer_name(layer)} · answer {result.text!r} · "
                             f"{check_note(check, whole.reliance[0].clean)}")
        maps = os.path.join(staging, f"{stem}_{method_cls.__name__}_per_token.npy")
        np.save(maps, result.maps)
        return dict(image=image, answer=result.text, tokens=list(result.tokens),
                    probabilities=[round(float(p), 6) for p in result.probabilities],
                    method=method_cls.__name__, mode="per-token", layers=[layer],
                    check=[round(check.score, 6)], peak_drop=[round(check.peak_drop, 6)], verdict=[check.verdict],
                    null_margin=[margin_cell(check)],
                    files=[os.path.basename(figure), os.path.basename(maps)])

    rows = explain_batch(args.out, images, explain_one, kept, stale)
    chosen = sorted({(row["method"], row["layers"][0]) for row in rows},
                    key=lambda pair: (pair[0], layer_depth(pair[1])))
    print(f"Explained the answers of {len(rows)} image(s) token by token with "
          f"{', '.join(f'{m} at {layer_name(k)}' for m, k in chosen)}; wrote {2 * len(rows) + 2} files to "
          f"{args.out}, listed in {os.path.join(args.out, 'report.csv')} and report.json.")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``explain`` options, and :func:`run_explain` as the parser's ``run`` default."""
    parser.add_argument("--model", required=True,
                        help=f"{', '.join(list(EMBEDDED_MODELS)[:-1])} or {list(EMBEDDED_MODELS)[-1]} (the embedded "
                             "demo models, no download), a model folder or a Hugging Face hub id; or an image "
                             "classifier: torchvision:NAME or timm:NAME (with --weights)")
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--image", help="image file, or a folder of images (run as a batch)")
    inputs.add_argument("--video", help="Qwen: a video file, or a folder of its frames (sorted by name); one map per "
                                        "frame pair, a strip figure and an animated GIF")
    several_images_argument(inputs)
    parser.add_argument("--prompt", help="question for Qwen-VL (Qwen2-VL to Qwen3.5) and LLaVA models")
    parser.add_argument("--texts", nargs="+", help="captions for CLIP / SigLIP models")
    parser.add_argument("--method", default="auto",
                         help="grad-cam method by class name, or its Smooth twin (e.g. SmoothGradCAM); default auto: "
                              f"the one of {', '.join(AUTO_METHODS)} whose map ranks best on the deletion check (its "
                              "score plus the drop when the map's peak is removed)")
    parser.add_argument("--layers", default="auto",
                         help=f"{'|'.join(LAYER_PRESETS)} or indices like 3,5,7 (with {PROJECTOR}: the vision "
                              "encoder's output as the decoder receives it); default auto: the projector and every "
                              "usable decoder layer (a spread of 8 for deeper models), the single mode drawing the "
                              "one whose map ranks best on the deletion check")
    parser.add_argument("--fast", action="store_true",
                        help="choose among the candidates by the drop when each map's peak window is removed alone "
                             "and check only the chosen map: about a fifth of the check's forward images, at a few "
                             "points of pointing accuracy (docs/auto.md); single mode")
    parser.add_argument("--mode", choices=MODES, help="figure (default single; --per-token draws its own)")
    parser.add_argument("--out", required=True, help="output folder")
    add_rerun_arguments(parser)
    parser.add_argument("--n-samples", type=_positive_int, help="noisy copies of a Smooth method (default 50)")
    parser.add_argument("--noise-level", type=_noise_level,
                         help="noise std of a Smooth method as a fraction of the input range, 0..1 (default 0.15)")
    parser.add_argument("--seed", type=int, default=0, help="seed of a Smooth method's noise")
    parser.add_argument("--answer", help="Qwen: explain this answer (teacher-forced after the prompt; its score is "
                                          "the sum of its tokens' log-probabilities) instead of the next token")
    parser.add_argument("--per-token", action="store_true",
                         help="Qwen: generate the answer (or take --answer) and draw one map per answer token")
    parser.add_argument("--max-new-tokens", type=_positive_int, default=16,
                         help="longest generated answer of --per-token (default 16)")
    video.add_arguments(parser)
    add_loading_arguments(parser)
    classify.add_arguments(parser)
    parser.set_defaults(run=run_explain)
    return parser
