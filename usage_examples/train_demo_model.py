"""Retrain the embedded demo model (``pytorch_grad_cam_vlm/demo_model``) deterministically on the CPU.

A tiny Qwen2.5-VL (vision encoder: 4 blocks of width 64 with 56-pixel attention windows, blocks 1 and 3 global;
decoder: 4 layers of width 128) learns to answer "What shape is the red object?" on the synthetic 112x112 canvases of
``pytorch_grad_cam_vlm.demo`` (400 steps of 16 fresh samples, AdamW with a one-cycle schedule, about 4 minutes on
one CPU core). The loss is the cross-entropy of the answer word at the last prompt position, which is
exactly what ``QwenVLWrapper.forward`` returns and what every map in this package explains.

    python usage_examples/train_demo_model.py            # writes pytorch_grad_cam_vlm/demo_model
    python usage_examples/train_demo_model.py --out DIR --steps 300
    python usage_examples/train_demo_model.py --asked-colors all --init demo --out DIR   # reads its colour word
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from pytorch_grad_cam_vlm import QwenVLWrapper, patchify
from pytorch_grad_cam_vlm.demo import (ASKED_COLORS, CANVAS, COLORS, DEMO_MODEL_DIR, WORDS, embedded_model_path,
                                       make_demo_samples, make_sample, prompt_for)
from pytorch_grad_cam_vlm.benchmark.localization import answer_accuracy
from pytorch_grad_cam_vlm.models.tiny.qwen_vl import build_processor, tiny_config


def build_untrained(seed: int):
    """A fresh demo-sized model and its processor; the processor keeps a CANVAS x CANVAS image at that size."""
    processor = build_processor(WORDS, min_pixels=CANVAS * CANVAS, max_pixels=CANVAS * CANVAS)
    config = tiny_config(processor.tokenizer, text_layers=4, text_width=128, vision_blocks=4, vision_width=64,
                         window_size=56, fullatt_block_indexes=(1, 3), heads=4, vision_heads=2)
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config), processor


class Batches:
    """Training batches: text inputs per asked colour (built once by the processor), images normalised like the
    processor does, answers as token ids."""

    def __init__(self, model, processor, seed: int, asked_colors=ASKED_COLORS):
        self.rng = np.random.default_rng([0, seed])  # split "train" of demo.make_demo_samples
        self.asked_colors = asked_colors
        wrappers = [QwenVLWrapper(model, processor, prompt_for(color)) for color in asked_colors]
        self.text = {w.prompt: w.layout_for(CANVAS, CANVAS) for w in wrappers}
        self.grid = wrappers[0].layout_for(CANVAS, CANVAS).grid_thw
        self.wrapper = wrappers[0]
        self.token_id = processor.tokenizer.convert_tokens_to_ids

    def next(self, batch_size: int):
        samples = [make_sample(self.rng, self.asked_colors) for _ in range(batch_size)]
        images = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float() / 255
        x = (images - self.wrapper.image_mean) / self.wrapper.image_std
        keys = self.text[samples[0].prompt].text_inputs.keys()
        inputs = {k: torch.cat([self.text[s.prompt].text_inputs[k] for s in samples]) for k in keys}
        answers = torch.tensor([self.token_id(s.answer) for s in samples])
        return x, inputs, answers


def logits(model, batches: Batches, x: torch.Tensor, inputs) -> torch.Tensor:
    """Next-token logits after the prompt, as ``QwenVLWrapper.forward`` computes them (with gradients)."""
    w = batches.wrapper
    pixel_values = patchify(x, w.patch_size, w.merge_size, w.temporal_patch_size)
    out = model(**inputs, pixel_values=pixel_values, image_grid_thw=batches.grid.repeat(len(x), 1),
                logits_to_keep=1, use_cache=False)
    return out.logits[:, -1]


def train(out: str, steps: int, batch_size: int, lr: float, seed: int, label_smoothing: float,
          asked_colors=ASKED_COLORS, init: str = "") -> None:
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    model, processor = build_untrained(seed)
    if init:  # a warm start: a trained model's weights (the demo model's knows shapes and where objects lie)
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(embedded_model_path(init))
    batches = Batches(model, processor, seed, asked_colors)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    start = time.time()
    for step in range(steps):
        x, inputs, answers = batches.next(batch_size)
        loss = torch.nn.functional.cross_entropy(logits(model, batches, x, inputs), answers,
                                                 label_smoothing=label_smoothing)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - start:.0f}s", flush=True)
    model.eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    print(f"trained in {time.time() - start:.0f}s, saved to {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=DEMO_MODEL_DIR)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--init", default="", help="start from this model's weights (e.g. demo) instead of random ones")
    parser.add_argument("--asked-colors", default=",".join(ASKED_COLORS),
                        help="comma-separated colours a question may name, or 'all' (default: the demo's, red)")
    args = parser.parse_args()
    asked = tuple(COLORS) if args.asked_colors == "all" else tuple(args.asked_colors.split(","))
    torch.set_num_threads(args.threads)
    train(args.out, args.steps, args.batch_size, args.lr, args.seed, args.label_smoothing, asked, args.init)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.out).eval()
    processor = AutoProcessor.from_pretrained(args.out)
    samples = make_demo_samples(200, seed=0, split="test", asked_colors=asked)
    accuracy = answer_accuracy(QwenVLWrapper(model, processor, samples[0].prompt), samples)
    print(f"held-out accuracy (200 test samples): {accuracy:.3f}")


if __name__ == "__main__":
    main()
