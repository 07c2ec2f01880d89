"""Retrain the pairs model (``pytorch_grad_cam_vlm/demo/pairs_model``) deterministically on the CPU.

A tiny Qwen2.5-VL (vision encoder: 4 blocks of width 64 with 56-pixel attention windows, blocks 1 and 3 global;
decoder: 4 layers of width 128, as the demo model's, and started from its weights) learns to answer "Which shape do
the red one and the blue one share?" (the shared shape, or "no" when they differ) on the 112x168 canvases of
``pytorch_grad_cam_vlm.demo.pairs``, one in eight of them with the red or the blue object missing (answer "none");
one batch in four asks the demo's question about the red or the blue object instead (a curriculum). It reuses
``train_crosses_model.py``'s model builder, batches and training loop (AdamW, one-cycle schedule; the loss is the
cross-entropy of the answer word at the last prompt position). ``benchmarks/dev_models_gap.py --models pairs`` then
measures occlusion and the default on it.

The defaults (2000 steps of 16, lr 7e-4) reach held-out accuracy 1.000 on 200 samples; the training accuracy over all
batches stays near 0.55 until step 850 and passes 0.9 by step 1350 (``benchmarks/dev_models_training.md``). The
same recipe on the first version of the question, "Are the red one and the blue one the same shape?" (yes / no),
stayed at 0.575.

    python usage_examples/train_pairs_model.py            # writes pytorch_grad_cam_vlm/demo/pairs_model
    python usage_examples/train_pairs_model.py --out DIR --steps 300
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_crosses_model import Batches, build_untrained, fit  # noqa: E402

from pytorch_grad_cam_vlm import QwenVLWrapper  # noqa: E402
from pytorch_grad_cam_vlm.benchmark.localization import answer_accuracy  # noqa: E402
from pytorch_grad_cam_vlm.demo import embedded_model_path, prompt_for  # noqa: E402
from pytorch_grad_cam_vlm.demo.pairs import (FIRST, MISSING_RATE, PAIRS_MODEL_DIR, PROMPT, SECOND,  # noqa: E402
                                             WORDS, make_pairs_sample, make_pairs_samples)


class Curriculum:
    """Batches that take turns: three of the comparison, one of the demo's question about the red object, three
    of the comparison, one of the same about the blue object. Each question's batches are ``train_crosses_model.Batches`` of their own prompt and
    stream of the "train" split (seeds ``seed``, ``seed + 1``, ``seed + 2``); ``wrapper`` and ``grid`` (what
    ``train_demo_model.logits`` reads) are the same for all, one canvas size."""

    def __init__(self, model, processor, seed: int, missing_rate: float):
        comparison = Batches(model, processor, seed, prompt=PROMPT,
                             draw=lambda rng: make_pairs_sample(rng, complete=rng.random() >= missing_rate))
        first, second = (Batches(model, processor, seed + 1 + i, prompt=prompt_for(color),
                                 draw=lambda rng, color=color: make_pairs_sample(rng, asked=color))
                         for i, color in enumerate((FIRST, SECOND)))
        self.turns, self.step = [comparison] * 3 + [first] + [comparison] * 3 + [second], 0
        self.wrapper, self.grid = comparison.wrapper, comparison.grid

    def next(self, batch_size: int):
        batches = self.turns[self.step % len(self.turns)]
        self.step += 1
        return batches.next(batch_size)


def warm_start(model, path: str) -> None:
    """Start ``model`` from the trained model at ``path`` (the same architecture, a vocabulary that the new one
    extends at its end): every weight copied, the embedding and output rows of the words both know."""
    trained = Qwen2_5_VLForConditionalGeneration.from_pretrained(path).state_dict()
    own = model.state_dict()
    with torch.no_grad():
        for name, value in trained.items():
            own[name][:len(value)].copy_(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=PAIRS_MODEL_DIR)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=7e-4)
    parser.add_argument("--warmup", type=float, default=0.1, help="share of the steps spent warming up")
    parser.add_argument("--text-layers", type=int, default=4)
    parser.add_argument("--text-width", type=int, default=128)
    parser.add_argument("--missing-rate", type=float, default=MISSING_RATE,
                        help="share of training canvases with the red or the blue object missing (answer 'none')")
    parser.add_argument("--init", default="demo", help="start from this trained model (a name or a folder; the "
                        "demo model's words come first in the pairs vocabulary); '' starts from random weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    model, processor = build_untrained(args.seed, args.text_layers, args.text_width, WORDS)
    if args.init:
        warm_start(model, embedded_model_path(args.init))
    fit(model, Curriculum(model, processor, args.seed, args.missing_rate), args.steps, args.batch_size, args.lr,
        args.warmup, 0.0)
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.out).eval()
    processor = AutoProcessor.from_pretrained(args.out)
    samples = make_pairs_samples(200, seed=0, split="test")
    accuracy = answer_accuracy(QwenVLWrapper(model, processor, PROMPT), samples)
    print(f"saved to {args.out}; held-out accuracy (200 test samples): {accuracy:.3f}")


if __name__ == "__main__":
    main()
