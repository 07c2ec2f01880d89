"""``pytorch-grad-cam-vlm demo``: figures and the localization table of the embedded demo model."""
from __future__ import annotations

import argparse
import os

from pytorch_grad_cam_vlm.cli.common import (_positive_int, choose_layers, explain_image, staged_output,
                                             write_report)
from pytorch_grad_cam_vlm.errors import InputError
from pytorch_grad_cam_vlm.methods.catalog import cam_options, resolve_method, uses_gradients
from pytorch_grad_cam_vlm.methods.sweep import auto_single_layer, layer_sweep
from pytorch_grad_cam_vlm.models.registry import make_subject


DEMO_TABLE_METHODS = ("Occlusion", "GradCAM", "GradCAMPlusPlus", "LayerCAM", "EigenCAM", "Attention")


def demo_methods() -> dict:
    """The localization table's methods for the demo: the cheap ones of
    :func:`pytorch_grad_cam_vlm.metrics.localization.default_methods`, and SmoothGradCAM with 8 noisy copies (not 50),
    so that the demo runs in about a minute on a laptop CPU."""
    from functools import partial

    from pytorch_grad_cam_vlm.benchmark.localization import default_methods, grad_cam_method
    from pytorch_grad_cam_vlm.methods.smooth_grad import SmoothGradCAM

    methods = {name: method for name, method in default_methods().items() if name in DEMO_TABLE_METHODS}
    methods["SmoothGradCAM"] = (grad_cam_method(partial(SmoothGradCAM, n_samples=8, seed=0)), True)
    return methods


def run_demo(args: argparse.Namespace) -> int:
    """The embedded demo model on held-out samples: a single-layer figure and a layer grid for the first samples,
    and the localization table of the methods against occlusion on all of them."""
    from PIL import Image

    from pytorch_grad_cam_vlm.demo import load_demo_model, make_demo_samples
    from pytorch_grad_cam_vlm.benchmark.localization import localization_table, write_table

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
                    or [auto_single_layer(subject, gradients)]
                with layer_sweep(method_cls)(model=subject.wrapper, target_layers=[subject.layers[k] for k in layers],
                                             **cam_options(method_cls, subject.wrapper, {})) as cam:
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


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``demo`` options, and :func:`run_demo` as the parser's ``run`` default."""
    parser.add_argument("--out", default="pytorch_grad_cam_vlm_demo", help="output folder")
    parser.add_argument("--method", default="GradCAM", help="method of the figures (default GradCAM)")
    parser.add_argument("--n", type=_positive_int, default=8, help="held-out samples in the localization table")
    parser.add_argument("--figures", type=_positive_int, default=2, help="samples drawn as figures")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out samples")
    parser.set_defaults(run=run_demo)
    return parser
