"""``pytorch-grad-cam-vlm rank``: rank images by a caption (yes/no) or by an answer's probability, or the reverse
(captions or answers for one image), with a map per item; writes ranking.csv, ranking.json, ranking.png and the maps.

    pytorch-grad-cam-vlm rank --model demo --image shapes/ --prompt "What shape is the red object?" --answer circle
    pytorch-grad-cam-vlm rank --model M --image photos/ --caption "a dog on a beach" --out ranked/
    pytorch-grad-cam-vlm rank --model M --image one.png --caption "a dog" "a cat" "a car" --out ranked/
"""
from __future__ import annotations

import argparse
import os

import numpy as np

from pytorch_grad_cam_vlm.cli.common import (_positive_int, add_loading_arguments, find_images, output_stems,
                                             write_report)
from pytorch_grad_cam_vlm.cli.several_images import check_several_family
from pytorch_grad_cam_vlm.demo import embedded_model_path
from pytorch_grad_cam_vlm.errors import InputError
from pytorch_grad_cam_vlm.methods.auto import candidate_methods, is_auto
from pytorch_grad_cam_vlm.methods.rank import DEFAULT_TEMPLATE, YES_NO, rank_captions, rank_images, yes_no_prompt
from pytorch_grad_cam_vlm.models.registry import (PROMPT_FAMILIES, load_model, make_subject, model_config,
                                                  resolve_device, resolve_dtype)
from pytorch_grad_cam_vlm.output import check_out_dir, staged_output


def check_arguments(args: argparse.Namespace) -> None:
    """One scoring (``--caption``, or ``--prompt`` with ``--answer``), a template with its placeholder, and one
    image when several captions or answers are ranked."""
    if (args.caption is None) == (args.answer is None):
        raise InputError("Rank by --caption (yes/no scoring) or by --prompt with --answer: give one of them.")
    if args.caption is not None and args.prompt is not None:
        raise InputError("--prompt goes with --answer; a --caption is asked through --template.")
    if args.answer is not None and not args.prompt:
        raise InputError("--answer needs --prompt, the question it answers.")
    items = args.caption or args.answer
    if any(not item.strip() for item in items):
        raise InputError("A caption or answer is empty.")
    if args.caption is not None:
        try:
            yes_no_prompt(args.caption[0], args.template)
        except ValueError as error:
            raise InputError(f"--template: {error}") from error
    if len(items) > 1 and args.query_image:
        raise InputError("--query-image goes beside each image ranked for one caption or answer, not with several.")
    if args.query_image and not os.path.isfile(args.query_image):
        raise InputError(f"--query-image must be one image file, got {args.query_image}.")
    if len(items) > 1 and not os.path.isfile(args.image):
        raise InputError(f"Several {'captions' if args.caption else 'answers'} rank the captions for one image: "
                         f"--image must be one file, got {args.image}.")


def run_rank(args: argparse.Namespace) -> int:
    """Check every input (the model by its config alone), load the model, rank, then write the files."""
    check_arguments(args)
    images = find_images(args.image)
    methods = candidate_methods(args.method)
    device = resolve_device(args.device)
    model_path = embedded_model_path(args.model)
    _, family = model_config(model_path)
    if family not in PROMPT_FAMILIES:
        raise InputError(f"rank asks a question, and a {family} model takes none: use a "
                         f"{', '.join(sorted({row.name for row in PROMPT_FAMILIES.values()}))} model.")
    if args.query_image:
        check_several_family(family, "--query-image")
    check_out_dir(args.out)
    model, processor = load_model(model_path, family, resolve_dtype(args.dtype, device), device, args.allow_pickle,
                                  args.trust_remote_code)
    asked = args.prompt or yes_no_prompt(args.caption[0], args.template)
    wrapper = make_subject(family, model, processor, asked, None).wrapper
    options = dict(method=methods, layers=args.layers, seed=args.seed, fallback=is_auto(args.method))
    stems = output_stems(images)
    try:
        if len(args.caption or args.answer) > 1:
            ranking = rank_captions(wrapper, images[0], captions=args.caption, question=args.prompt,
                                    answers=args.answer, template=args.template, yes_no=args.yes_no, **options)
            stems = [f"{stems[0]}_{i}" for i in range(len(ranking.names))]
        else:
            ranking = rank_images(wrapper, images, caption=args.caption and args.caption[0], question=args.prompt,
                                  answer=args.answer and args.answer[0], template=args.template, yes_no=args.yes_no,
                                  names=[os.path.basename(i) for i in images], batch_size=args.batch_size,
                                  query_image=args.query_image and find_images(args.query_image)[0], **options)
    except ValueError as error:
        raise InputError(str(error)) from error
    rows = ranking.rows()
    with staged_output(args.out) as staging:
        np.savez(os.path.join(staging, "ranking_maps.npz"), **{stems[r["index"]]: ranking.maps[r["index"]]
                                                               for r in rows})
        for row in rows:
            row["map"] = stems[row["index"]]
        ranking.plot(os.path.join(staging, "ranking.png"))
        write_report(rows, staging, name="ranking")
    best = rows[0]
    print(f"Ranked {len(rows)} {'images' if len(images) > 1 or len(rows) == 1 else 'items'} by "
          f"{ranking.scoring}: best {best['name']!r} (score {best['score']:.4g}, entropy {best['entropy']:.3g} bits); "
          f"wrote ranking.csv, ranking.json, ranking.png and ranking_maps.npz to {args.out}.")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``rank`` options, and :func:`run_rank` as the parser's ``run`` default."""
    parser.add_argument("--model", required=True, help="model folder or Hugging Face hub id (a prompt-taking VLM)")
    parser.add_argument("--image", required=True, help="image file, or a folder of images to rank")
    parser.add_argument("--caption", nargs="+", help="yes/no scoring: the caption asked through --template; several "
                                                     "captions rank the captions for one --image")
    parser.add_argument("--prompt", help="answer scoring: the question that --answer answers")
    parser.add_argument("--answer", nargs="+", help="answer scoring: the answer whose probability scores each image; "
                                                    "several answers rank the answers for one --image")
    parser.add_argument("--query-image", help="an image asked beside each ranked image, first in the prompt (the "
                                              "families that take several images in one prompt)")
    parser.add_argument("--template", default=DEFAULT_TEMPLATE,
                        help=f"the yes/no question around {{caption}} (default {DEFAULT_TEMPLATE!r})")
    parser.add_argument("--yes-no", nargs=2, default=list(YES_NO), metavar=("YES", "NO"),
                        help=f"the model's yes and no words, one token each (default {' '.join(YES_NO)})")
    parser.add_argument("--method", default="auto", help="grad-cam method(s) for the maps, as in explain (default "
                                                         "auto)")
    parser.add_argument("--layers", default="auto", help="candidate layers for the maps, as in explain (default auto)")
    parser.add_argument("--batch-size", type=_positive_int,
                        help="images per forward pass (default: the deletion check's batch rule)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the deletion check's tie order")
    parser.add_argument("--out", default="rank_out", help="output folder (default rank_out)")
    add_loading_arguments(parser)
    parser.set_defaults(run=run_rank)
    return parser

