"""Which per-word relevance of the prompt agrees better with deleting the word: occlusion (the word's token embeddings
replaced by the pad token's, one batched pass) or gradient x input on the text embeddings?

The reference is the drop of the teacher-forced answer's score (the sum of its log-probabilities) when the word is
deleted from the prompt and the prompt retokenised. Per image: Spearman's rank correlation of each estimate with the
reference over the prompt's words; reported as the mean over images, per model, with the share of images where each
estimate agrees better.

    python benchmarks/prompt_words.py 8          # images per model (then "red" on 20 demo samples)
    python benchmarks/prompt_words.py --colour-words 40     # colors and pairs models: colour words against fillers
    python benchmarks/prompt_words.py --colors-agreement 20 # the first table's row for the colors model
Results: benchmarks/prompt_words.md.
"""
import sys
import tempfile

import numpy as np
import torch

from pytorch_grad_cam_vlm import (LlavaWrapper, QwenVLWrapper, build_tiny_llava, build_tiny_model, load_demo_model,
                                  make_demo_samples)
from pytorch_grad_cam_vlm.demo import COLORS
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


# The words of the pairs model's prompts that name no object and no property: what a colour word should outrank.
FILLER_WORDS = ("What", "Which", "is", "do", "the", "one", "and")
# A word matters where occluding it moves the target by more than this (logits): below it, every word ties near 0.
MATTERS = 0.01


def colour_words_above(rows: list, label: str, answer: str) -> None:
    """One table row: of ``rows`` ``(wrapper, sample)`` (the wrapper asking the sample's question, its answer set or
    not), how often every colour word of the prompt has a larger relevance than every filler word, per estimate,
    signed and by magnitude (removing a word can raise the target: the relevance is then negative)."""
    colour_names = set(COLORS)
    above = {(key, size): 0 for key in ("occlusion", "gradient_x_input") for size in (False, True)}
    mattering = []  # per sample where some word's occlusion moves the target by more than MATTERS: colour word first
    for wrapper, sample in rows:
        words = prompt_word_relevance(wrapper, wrapper.preprocess(sample.image))
        colour = [i for i, w in enumerate(words.words) if w in colour_names]
        filler = [i for i, w in enumerate(words.words) if w in FILLER_WORDS]
        for key, size in above:
            values = np.abs(getattr(words, key)) if size else getattr(words, key)
            above[(key, size)] += int(values[colour].min() > values[filler].max())
        size = np.abs(words.occlusion)
        if size.max() > MATTERS:
            mattering.append(size[colour].min() > size[filler].max())
    shares = " | ".join(f"{above[(key, size)] / len(rows):.3f}" for key in ("occlusion", "gradient_x_input")
                        for size in (False, True))
    first = f"{np.mean(mattering):.3f}" if mattering else "-"
    print(f"| {label} | {answer} | {len(rows)} | {shares} | {len(mattering)} | {first} |", flush=True)


def colour_words_first(n: int) -> None:
    """How often the colour words of the question outrank every filler word (:data:`FILLER_WORDS`), per estimate, on
    ``n`` held-out samples: on the colors model (asked about an object of any colour, so its answer needs the colour
    word) and on the pairs model (its comparison, and the demo's question about the red or the blue object, which
    its training also asked, on samples where the two differ in shape)."""
    from pytorch_grad_cam_vlm.demo import load_colors_model, make_colors_samples, prompt_for
    from pytorch_grad_cam_vlm.demo.pairs import DIFFERENT, FIRST, SECOND, load_pairs_model, make_pairs_samples

    print("| model: prompt | target | samples | occlusion: colour words above every filler | by magnitude | "
          "gradient x input: above every filler | by magnitude | samples where a word matters | of those, colour "
          "words above every filler by occlusion's magnitude |\n|---|---|---|---|---|---|---|---|---|")
    model, processor = load_colors_model()
    rows = [(QwenVLWrapper(model, processor, prompt=s.prompt), s) for s in make_colors_samples(n, seed=0)]
    colour_words_above(rows, "colors: What shape is the {colour} object?", "predicted next token")
    model, processor = load_pairs_model()
    samples = make_pairs_samples(n, seed=0)
    rows = [(QwenVLWrapper(model, processor, prompt=s.prompt, answer=s.answer), s) for s in samples]
    colour_words_above(rows, f"pairs: {samples[0].prompt}", "the sample's answer")
    differing = [s for s in samples if s.answer == DIFFERENT]  # where asking about red or blue changes the answer
    for colour in (FIRST, SECOND):
        rows = [(QwenVLWrapper(model, processor, prompt=prompt_for(colour)), s) for s in differing]
        colour_words_above(rows, f"pairs: {prompt_for(colour)}", "predicted next token")


def colors_agreement(n: int) -> None:
    """On the colors model (which reads its question), how well each estimate agrees with deleting the word."""
    from pytorch_grad_cam_vlm.demo import load_colors_model, make_colors_samples

    model, processor = load_colors_model()
    samples = make_colors_samples(n, seed=0)
    rho = {"occlusion": [], "gradient_x_input": []}
    largest = 0.0
    for sample in samples:
        wrapper = QwenVLWrapper(model, processor, prompt=sample.prompt)
        x = wrapper.preprocess(sample.image)
        reference = deletion_drops(wrapper, x, sample.answer)
        largest = max(largest, float(np.abs(reference).max()))
        wrapper.set_answer(sample.answer)
        words = prompt_word_relevance(wrapper, x)
        for key in rho:
            rho[key].append(spearman(getattr(words, key), reference))
    occ, gxi = np.array(rho["occlusion"]), np.array(rho["gradient_x_input"])
    print(f"| colors (reads its colour word) | {n} | {np.nanmean(occ):.3f} | {np.nanmean(gxi):.3f} | "
          f"{np.nanmean(occ > gxi):.2f} | {largest:.3g} |")


def main() -> None:
    if sys.argv[1:2] == ["--colour-words"]:
        colour_words_first(int(sys.argv[2]))
        return
    if sys.argv[1:2] == ["--colors-agreement"]:
        print("| model | images | occlusion ρ | gradient×input ρ | share occlusion better | max |deletion drop| |")
        print("|---|---|---|---|---|---|")
        colors_agreement(int(sys.argv[2]))
        return
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
