"""``pytorch-grad-cam-vlm benchmark``: the options of :func:`pytorch_grad_cam_vlm.benchmark.runner.run`."""
from __future__ import annotations

import argparse

from dataclasses import fields

from pytorch_grad_cam_vlm.benchmark.eagle_table import eagle_table
from pytorch_grad_cam_vlm.benchmark.report import compare_runs
from pytorch_grad_cam_vlm.benchmark.runner import BenchmarkOptions, run
from pytorch_grad_cam_vlm.cli.common import add_loading_arguments
from pytorch_grad_cam_vlm.errors import InputError
from pytorch_grad_cam_vlm.methods.sweep import LAYER_PRESETS
from pytorch_grad_cam_vlm.metrics.deletion_check import CPU_BATCH_PIXELS, DEFAULT_BATCH_SIZE
from pytorch_grad_cam_vlm.benchmark.intervals import DEFAULT_RESAMPLES
from pytorch_grad_cam_vlm.metrics.auc_protocols import CANVASES, DEFAULT_PROTOCOL, PROTOCOLS, TIES
from pytorch_grad_cam_vlm.metrics.perturbation import AUC_SCORES, SOLVERS
from pytorch_grad_cam_vlm.metrics.road import PERCENTILES


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``benchmark`` options, and ``run`` as the parser's ``run`` default (as the CLI's subcommands have)."""
    parser.add_argument("--model", help="Qwen2.5-VL / Qwen2-VL / CLIP / SigLIP folder or hub id; 'demo' for the "
                                        "embedded demo model (required, as --data and --out, unless --compare)")
    parser.add_argument("--texts", nargs="+", help="CLIP / SigLIP: the captions to score (a row's answer names "
                                                   "the one to explain; default the best-scoring)")
    parser.add_argument("--data", help="JSONL (image, prompt, answer, boxes, distractor_boxes, masks per line) or "
                                       "COCO-style .json with boxes (and segmentations as masks)")
    parser.add_argument("--methods", default="GradCAM", help="comma-separated grad-cam method names; RandomCAM is "
                                                              "always added as the baseline")
    parser.add_argument("--layers", default="auto", help=f"decoder layers (CLIP: vision layers): "
                                                         f"{'|'.join(LAYER_PRESETS)} or indices like 3,5,7")
    parser.add_argument("--out", help="output folder; a run started again there resumes")
    parser.add_argument("--percentiles", default=",".join(map(str, PERCENTILES)),
                        help="ROAD percentiles (default 10..90)")
    parser.add_argument("--tolerance", type=float, help="pointing-game tolerance in pixels (default: half a token "
                                                        "cell, 14 px for Qwen)")
    parser.add_argument("--limit", type=int, help="score only the first N samples")
    parser.add_argument("--seed", type=int, default=0, help="seed of RandomCAM, ROAD's noise and the randomized "
                                                            "model")
    parser.add_argument("--sanity", action=argparse.BooleanOptionalAction, default=True,
                        help="run the model-parameter randomization check (needs a second copy of the model)")
    parser.add_argument("--road-ties", choices=("random", "threshold"), default="random",
                        help="ROAD's removal order among equal map values: random (seeded; every percentile removes "
                             "its exact share) or threshold (grad-cam's: a map that is 0 over more than p%% of the "
                             "image loses every pixel at percentile p)")
    parser.add_argument("--coco-prompt", default="Is there a {category} in this image?",
                        help="question asked of COCO-style data, {category} filled in")
    parser.add_argument("--coco-answer",
                        help="COCO-style data: the answer to explain, {category} filled in (default: the model's "
                             "next token); e.g. '{category}' explains the word, as EAGLE does")
    parser.add_argument("--batch-size", type=int,
                        help=f"perturbed images (ROAD, deletion, insertion) per forward pass (default: "
                             f"{DEFAULT_BATCH_SIZE} on CUDA; on the CPU as many as fit in {CPU_BATCH_PIXELS} pixels, "
                             f"at most {DEFAULT_BATCH_SIZE}; measured in benchmarks/benchmark_speed.md)")
    parser.add_argument("--auc-protocol", choices=tuple(PROTOCOLS), default=DEFAULT_PROTOCOL,
                        help="deletion / insertion as published: black (black canvas for both curves, 20 steps; the "
                             "default, chosen in benchmarks/auc_canvas.md), rise (deletion to zeros, insertion from "
                             "RISE's 11-px sigma-5 blur, 8 image rows per step), eagle (black canvas for both, 64 "
                             "steps), blur (the former default: sigma-8 blur for both, 20 steps; it saturates)")
    parser.add_argument("--deletion-canvas", choices=CANVASES,
                        help="what deleted pixels become (default: the protocol's): black, zeros (the processor's "
                             "mean colour), rise-blur, blur (sigma 8)")
    parser.add_argument("--insertion-canvas", choices=CANVASES,
                        help="what insertion starts from (default: the protocol's)")
    parser.add_argument("--auc-steps", type=int,
                        help="deletion / insertion steps, evenly spaced (default: the protocol's)")
    parser.add_argument("--auc-ties", choices=TIES, default="protocol",
                        help="order of equal map values in the curves: the protocol's (RISE and EAGLE: by position, "
                             "stable sort; black and blur: seeded random) or random (seeded)")
    parser.add_argument("--bootstrap", type=int, default=DEFAULT_RESAMPLES,
                        help=f"bootstrap resamples of the samples for the 95 %% intervals (default "
                             f"{DEFAULT_RESAMPLES}; 0: none)")
    parser.add_argument("--auc-score", choices=AUC_SCORES, default="probability",
                        help="the deletion / insertion curve: the target's softmax probability or its logit")
    parser.add_argument("--imputation-threads", type=int,
                        help="threads solving ROAD's imputations on the CPU (default: this process's cores)")
    parser.add_argument("--solver", choices=SOLVERS, default="auto",
                        help="ROAD's imputation solver: direct (sparse LU, CPU), cg (conjugate gradients in torch, "
                             "on the model's device), auto (cg on CUDA, else direct)")
    parser.add_argument("--table", choices=("eagle",),
                        help="eagle: also write eagle_table.md, laid out as EAGLE's Table 2 (insertion, deletion, "
                             "pointing by box and by mask, peak GPU memory); needs --auc-protocol eagle")
    parser.add_argument("--eagle-table", nargs="+", metavar="RUN",
                        help="print EAGLE's Table 2 of finished --table eagle runs (one per model) and exit")
    parser.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"),
                        help="print the difference B - A of two finished runs' summaries and exit")
    add_loading_arguments(parser, "auto (the process's device under accelerate), cpu, cuda:N")
    parser.set_defaults(run=run_benchmark)
    return parser



def options_from(args: argparse.Namespace) -> BenchmarkOptions:
    """The runner's options from the parsed command line."""
    return BenchmarkOptions(**{f.name: getattr(args, f.name) for f in fields(BenchmarkOptions)})


def run_benchmark(args: argparse.Namespace) -> int:
    """Run :func:`pytorch_grad_cam_vlm.benchmark.runner.run` with the parsed options, or with ``--compare`` print
    :func:`pytorch_grad_cam_vlm.benchmark.report.compare_runs`, with ``--eagle-table``
    :func:`pytorch_grad_cam_vlm.benchmark.eagle_table.eagle_table`."""
    if args.compare:
        print(compare_runs(*args.compare), end="")
        return 0
    if args.eagle_table:
        print(eagle_table(args.eagle_table), end="")
        return 0
    missing = [f"--{name}" for name in ("model", "data", "out") if getattr(args, name) is None]
    if missing:
        raise InputError(f"the following arguments are required: {', '.join(missing)} (or --compare RUN_A RUN_B, "
                         "or --eagle-table RUN ...).")
    return run(options_from(args))
