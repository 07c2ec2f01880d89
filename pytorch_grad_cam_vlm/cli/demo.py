"""``pytorch-grad-cam-vlm demo``: figures and the localization table of the embedded demo model."""
from __future__ import annotations

import argparse
import os

from pytorch_grad_cam_vlm.cli.common import (_positive_int, choose_layers, explain_image, method_name,
                                             write_report)
from pytorch_grad_cam_vlm.methods.auto import candidate_methods
from pytorch_grad_cam_vlm.methods.catalog import uses_gradients
from pytorch_grad_cam_vlm.models.registry import make_subject
from pytorch_grad_cam_vlm.output import check_out_dir, staged_output


DEMO_TABLE_METHODS = ("Occlusion", "auto", "GradCAM", "GradCAMPlusPlus", "LayerCAM", "HiResCAM", "EigenCAM",
                      "Attention")


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
    from tqdm import tqdm

    from pytorch_grad_cam_vlm.demo import load_demo_model, make_demo_samples
    from pytorch_grad_cam_vlm.benchmark.localization import localization_table, write_table

    methods = candidate_methods(args.method)
    name = method_name(args.method, methods)
    gradients = all(uses_gradients(cls, {}) for cls in methods)
    check_out_dir(args.out)
    model, processor = load_demo_model()
    samples = make_demo_samples(args.n, seed=args.seed, split="test")
    rows = []
    with staged_output(args.out) as staging:
        for i, sample in enumerate(tqdm(samples[:args.figures], desc="demo figures", unit="sample")):
            subject = make_subject("qwen2_5_vl", model, processor, sample.prompt, None)
            Image.fromarray(sample.image).save(os.path.join(staging, f"sample{i}.png"))
            for mode, spec, stem in (("single", "auto", f"sample{i}"), ("grid", "all", f"sample{i}_layers")):
                layers = choose_layers(methods, "qwen2_5_vl", len(subject.layers), spec, mode, gradients)
                row = explain_image(subject, sample.image, stem, mode, methods, name, layers, {}, staging,
                                    f"sample{i}.png")
                rows.append(dict(row, prompt=sample.prompt, answer=sample.answer))
        table = localization_table(subject.wrapper, samples, demo_methods(), progress=True)
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
    parser.add_argument("--method", default="auto", help="method of the figures (default auto: chosen per image by "
                                                         "the deletion check)")
    parser.add_argument("--n", type=_positive_int, default=8, help="held-out samples in the localization table")
    parser.add_argument("--figures", type=_positive_int, default=2, help="samples drawn as figures")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out samples")
    parser.set_defaults(run=run_demo)
    return parser
