"""Which per-word relevance of the prompt agrees better with deleting the word: occlusion (the word's token embeddings
replaced by the pad token's, one batched pass) or gradient x input on the text embeddings?

The reference is the drop of the teacher-forced answer's score (the sum of its log-probabilities) when the word is
deleted from the prompt and the prompt retokenised. Per image: Spearman's rank correlation of each estimate with the
reference over the prompt's words; reported as the mean over images, per model, with the share of images where each
estimate agrees better.

    python benchmarks/prompt_words.py 8          # images per model (then "red" on 20 demo samples)
Results: benchmarks/prompt_words.md.
"""
import sys
import tempfile

import numpy as np
import torch

from pytorch_grad_cam_vlm import (LlavaWrapper, QwenVLWrapper, build_tiny_llava, build_tiny_model, load_demo_model,
                                  make_demo_samples)
from pytorch_grad_cam_vlm.methods.prompt_words import prompt_word_relevance
from pytorch_grad_cam_vlm.methods.rank import Query, asking

PROMPT = "Which object is on the left of the big red circle ?"


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1]) if np.std(ra) and np.std(rb) else float("nan")


def deletion_drops(wrapper, x: torch.Tensor, answer: str) -> np.ndarray:
    """The answer's score with the whole prompt minus its score with each word deleted."""
    words = wrapper.prompt.split()
    prompts = [wrapper.prompt] + [" ".join(words[:i] + words[i + 1:]) for i in range(len(words))]
    scores = []
    for prompt in prompts:
        with asking(wrapper, Query(prompt, answer)), torch.no_grad():
            scores.append(float(wrapper(x)[0, 0]))
    return scores[0] - np.array(scores[1:])


def measure(name: str, wrapper, images, answer: str) -> None:
    rho, largest = {"occlusion": [], "gradient_x_input": []}, 0.0
    for image in images:
        x = wrapper.preprocess(image)
        reference = deletion_drops(wrapper, x, answer)
        largest = max(largest, float(np.abs(reference).max()))
        wrapper.set_answer(answer)
        words = prompt_word_relevance(wrapper, x)
        wrapper.set_answer(None)
        for key in rho:
            rho[key].append(spearman(getattr(words, key), reference))
    occ, gxi = np.array(rho["occlusion"]), np.array(rho["gradient_x_input"])
    print(f"| {name} | {len(images)} | {np.nanmean(occ):.3f} | {np.nanmean(gxi):.3f} | "
          f"{np.nanmean(occ > gxi):.2f} | {largest:.3g} |")


def red_first(n: int) -> None:
    """How often "red" ranks first among the demo question's words (next-token target), per estimate."""
    model, processor = load_demo_model()
    samples = make_demo_samples(n, seed=1)
    wrapper = QwenVLWrapper(model, processor, prompt=samples[0].prompt)
    first = {"occlusion": 0, "gradient_x_input": 0}
    for sample in samples:
        words = prompt_word_relevance(wrapper, wrapper.preprocess(sample.image))
        for key in first:
            first[key] += int(np.argmax(getattr(words, key)) == words.words.index("red"))
    print(f"demo, {n} samples: 'red' ranks first by occlusion {first['occlusion'] / n:.2f}, by gradient x input "
          f"{first['gradient_x_input'] / n:.2f} (chance {1 / len(words.words):.2f})")


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    torch.manual_seed(0)
    print("| model | images | occlusion ρ | gradient×input ρ | share occlusion better | max |deletion drop| |")
    print("|---|---|---|---|---|---|")
    rng = np.random.RandomState(0)
    images = [(rng.rand(56, 84, 3) * 255).astype(np.uint8) for _ in range(n)]
    with tempfile.TemporaryDirectory() as folder:
        model, processor = build_tiny_model(f"{folder}/qwen", seed=0)
        measure("tiny random Qwen2.5-VL", QwenVLWrapper(model, processor, prompt=PROMPT), images, "red")
        model, processor = build_tiny_llava(f"{folder}/llava", seed=0)
        measure("tiny random LLaVA 1.5", LlavaWrapper(model, processor, prompt=PROMPT), images, "red")
    model, processor = load_demo_model()
    samples = make_demo_samples(n, seed=0)
    wrapper = QwenVLWrapper(model, processor, prompt=samples[0].prompt)
    measure("demo (trained on one question)", wrapper, [s.image for s in samples], "circle")
    red_first(20)


if __name__ == "__main__":
    main()
