"""Retrain the crosses model (``pytorch_grad_cam_vlm/demo/crosses_model``) deterministically on the CPU.

A tiny Qwen2.5-VL (vision encoder: 4 blocks of width 64 with 56-pixel attention windows, blocks 1 and 3 global;
decoder: 8 layers of width 112) learns to answer "What colour is the cross?" on the synthetic 112x168 canvases
(a 4x6 token grid) of ``pytorch_grad_cam_vlm.demo.crosses`` (1500 steps of 16 fresh samples, one in eight without a
cross and answered "none", AdamW with a one-cycle schedule up to 1e-3, about 5 minutes on one CPU core). The loss is
the cross-entropy of the answer word at the last prompt position, as in ``train_demo_model.py``, whose ``logits``
this recipe reuses. ``benchmarks/measure_crosses_occlusion.py`` then checks that occlusion points at the cross.

Trained without the canvases without a cross, the model made one colour (blue) its default answer, given whenever
it saw no other colour on a cross, and occlusion found no evidence for it; with the demo's learning rate of 3e-3 the
8-layer decoder stayed at chance for 600 steps.

    python usage_examples/train_crosses_model.py            # writes pytorch_grad_cam_vlm/demo/crosses_model
    python usage_examples/train_crosses_model.py --out DIR --steps 300
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Optional

import numpy as np
import torch
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_demo_model import logits  # noqa: E402  (the forward pass QwenVLWrapper.forward computes)

from pytorch_grad_cam_vlm import DemoSample, QwenVLWrapper  # noqa: E402
from pytorch_grad_cam_vlm.demo.crosses import (CANVAS_HEIGHT, CANVAS_WIDTH, CROSSES_MODEL_DIR,  # noqa: E402
                                               NO_CROSS_RATE, PROMPT, SPLITS, WORDS, make_crosses_sample,
                                               make_crosses_samples)
from pytorch_grad_cam_vlm.models.tiny.qwen_vl import build_processor, tiny_config  # noqa: E402


def build_untrained(seed: int, text_layers: int = 8, text_width: int = 112, words=WORDS):
    """A fresh crosses-sized model and its processor (over ``words``); the processor keeps a CANVAS_HEIGHT x
    CANVAS_WIDTH image at that size (min_pixels = max_pixels = its area)."""
    pixels = CANVAS_HEIGHT * CANVAS_WIDTH
    processor = build_processor(words, min_pixels=pixels, max_pixels=pixels)
    config = tiny_config(processor.tokenizer, text_layers=text_layers, text_width=text_width, vision_blocks=4,
                         vision_width=64, window_size=56, fullatt_block_indexes=(1, 3), heads=4, vision_heads=2)
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config), processor


class Batches:
    """Training batches of the "train" split, a share ``no_cross_rate`` of them without a cross (answer "none"):
    the text inputs of the one prompt (built once by the processor), images normalised like the processor does,
    answers as token ids. Has the ``wrapper`` and ``grid`` that ``train_demo_model.logits`` reads.

    Another task on a canvas of this size passes its ``prompt`` and ``draw``, which makes one training sample from
    the generator (``train_pairs_model.py``)."""

    def __init__(self, model, processor, seed: int, no_cross_rate: float = NO_CROSS_RATE, prompt: str = PROMPT,
                 draw: Optional[Callable[[np.random.Generator], DemoSample]] = None):
        self.draw = draw or (lambda rng: make_crosses_sample(rng, cross=rng.random() >= no_cross_rate))
        self.rng = np.random.default_rng([SPLITS["train"], seed])  # split "train" of make_crosses_samples
        self.wrapper = QwenVLWrapper(model, processor, prompt)
        layout = self.wrapper.layout_for(CANVAS_HEIGHT, CANVAS_WIDTH)
        self.text_inputs, self.grid = layout.text_inputs, layout.grid_thw
        self.token_id = processor.tokenizer.convert_tokens_to_ids

    def next(self, batch_size: int):
        samples = [self.draw(self.rng) for _ in range(batch_size)]
        images = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float() / 255
        x = (images - self.wrapper.image_mean) / self.wrapper.image_std
        inputs = {k: v.repeat(batch_size, 1) for k, v in self.text_inputs.items()}
        answers = torch.tensor([self.token_id(s.answer) for s in samples])
        return x, inputs, answers


def train(out: str, steps: int, batch_size: int, lr: float, seed: int, label_smoothing: float,
          text_layers: int, text_width: int, warmup: float, no_cross_rate: float) -> None:
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    model, processor = build_untrained(seed, text_layers, text_width)
    fit(model, Batches(model, processor, seed, no_cross_rate), steps, batch_size, lr, warmup, label_smoothing)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    print(f"saved to {out}")


def fit(model, batches, steps: int, batch_size: int, lr: float, warmup: float, label_smoothing: float,
        forward: Callable = logits) -> None:
    """Train ``model`` on ``steps`` batches of ``batches.next(batch_size)`` ``(x, inputs, answers)``: the
    cross-entropy of ``forward(model, batches, x, inputs)`` (next-token logits ``(B, vocab)``) against the answer
    ids, AdamW with a one-cycle schedule up to ``lr``; the model is left in eval mode."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=warmup)
    model.train()
    start = time.time()
    running = []
    for step in range(steps):
        x, inputs, answers = batches.next(batch_size)
        out_logits = forward(model, batches, x, inputs)
        loss = torch.nn.functional.cross_entropy(out_logits, answers, label_smoothing=label_smoothing)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        running.append((out_logits.argmax(-1) == answers).float().mean().item())
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  train acc (last 50) {np.mean(running[-50:]):.3f}  "
                  f"{time.time() - start:.0f}s", flush=True)
    model.eval()
    print(f"trained in {time.time() - start:.0f}s")


def accuracy(model, processor, n: int = 200) -> float:
    """Share of ``n`` held-out ("test" split) samples whose answer is the model's next token (argmax)."""
    wrapper = QwenVLWrapper(model, processor, PROMPT)
    correct = 0
    with torch.no_grad():
        for sample in make_crosses_samples(n, seed=0, split="test"):
            predicted = int(wrapper(wrapper.preprocess(sample.image)).argmax(-1))
            correct += predicted == processor.tokenizer.convert_tokens_to_ids(sample.answer)
    return correct / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=CROSSES_MODEL_DIR)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=float, default=0.1, help="share of the steps spent warming up")
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    parser.add_argument("--text-layers", type=int, default=8)
    parser.add_argument("--text-width", type=int, default=112)
    parser.add_argument("--no-cross-rate", type=float, default=NO_CROSS_RATE,
                        help="share of training canvases without a cross (answer 'none')")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train(args.out, args.steps, args.batch_size, args.lr, args.seed, args.label_smoothing, args.text_layers,
          args.text_width, args.warmup, args.no_cross_rate)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.out).eval()
    processor = AutoProcessor.from_pretrained(args.out)
    print(f"held-out accuracy (200 test samples): {accuracy(model, processor):.3f}")


if __name__ == "__main__":
    main()
