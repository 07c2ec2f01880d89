"""The ``pytorch-grad-cam-vlm`` command (also ``python -m pytorch_grad_cam_vlm``): argument parsing and printing
only, one module per subcommand; nothing in the package imports it.

    pytorch-grad-cam-vlm demo --out demo_out
    pytorch-grad-cam-vlm explain --model Qwen/Qwen2.5-VL-3B-Instruct --image photos/ --prompt "What is this?" \\
        --method SmoothGradCAM --layers auto --mode grid --out maps/
    pytorch-grad-cam-vlm benchmark --model demo --data data.jsonl --methods GradCAM,LayerCAM --out bench/
    pytorch-grad-cam-vlm app --model demo                      # the explorer, at http://127.0.0.1:7860

Every input is checked before anything is written; files are written into a staging folder and moved into ``--out``
at the end, so a failed run leaves nothing behind. Bad input prints one ``error:`` line and exits with code 2.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from typing import Optional, Sequence

from pytorch_grad_cam_vlm.cli import app, benchmark, demo, explain, rank
from pytorch_grad_cam_vlm.cli.common import EXIT_BAD_INPUT, EXIT_INTERRUPTED, PROG
from pytorch_grad_cam_vlm.errors import InputError


def build_parser() -> argparse.ArgumentParser:
    """The command's parser: one subparser per subcommand, each with its ``run`` default."""
    parser = argparse.ArgumentParser(prog=PROG, description="Grad-CAM and friends for vision-language models.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo.add_arguments(commands.add_parser(
        "demo", help="run on the embedded demo model (no download)",
        description="Overlays, a layer grid and the localization table of the embedded demo model on held-out "
                    "samples."))
    benchmark.add_arguments(commands.add_parser(
        "benchmark", help="faithfulness benchmark: ROAD, deletion / insertion, pointing, sanity over methods x layers",
        description="Score methods x layers on ROAD, deletion and insertion AUC, the pointing game and the "
                    "randomization sanity check; or compare two runs (--compare)."))
    explain.add_arguments(commands.add_parser(
        "explain", help="explain a model's prediction on images",
        description="Maps of the predicted next token (Qwen) or best-matching text (CLIP, SigLIP) for one image, "
                    "a folder of images, or a video (Qwen: one map per frame pair)."))
    rank.add_arguments(commands.add_parser(
        "rank", help="rank images by a caption or an answer, with a map per image",
        description="Score each image by the yes/no answer to a caption (or an answer's probability), rank them, "
                    "and explain each score with a map and its deletion check; or rank captions for one image."))
    app.add_arguments(commands.add_parser(
        "app", help="interactive explorer in the browser (needs the app extra: Gradio)",
        description="A local web page to explain images interactively on one model: methods, layers, the deletion "
                    "check, the layer strip and per-token maps. Listens on 127.0.0.1 only by default."))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit code (argparse's own errors included)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        with warnings.catch_warnings():
            warnings.showwarning = _warning_line
            return args.run(args)
    except SystemExit as exit_:  # argparse: --help, or a usage error it has already printed
        return exit_.code if isinstance(exit_.code, int) else EXIT_BAD_INPUT
    except KeyboardInterrupt:  # Ctrl-C before any result was complete (a batch keeps what finished itself)
        print(f"{PROG}: interrupted; unfinished output was not kept.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (InputError, ValueError, FileNotFoundError, NotImplementedError) as error:
        print(f"{PROG}: error: {str(error).splitlines()[0] if str(error) else type(error).__name__}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """A Python warning as the command's other warnings: one ``warning:`` line on stderr, without file and line."""
    print(f"{PROG}: warning: {str(message).splitlines()[0]}", file=sys.stderr)
