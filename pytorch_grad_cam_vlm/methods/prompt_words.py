"""Did the model answer from the image or from the question? A relevance per word of the prompt, two ways:

- **gradient x input** on the text embeddings: ``sum over the word's tokens and channels of grad * embedding`` of
  the target, from one forward and one backward pass (the first-order estimate of what removing the word does);
- **occlusion**: the drop of the target when the word's token embeddings are replaced by the ``baseline`` (the pad
  token's embedding, zeros where the tokenizer has none), every word in one batched forward pass.

Both are measured against the drop when the word is deleted from the prompt (the prompt retokenised without it) in
``benchmarks/prompt_words.py`` (``benchmarks/prompt_words.md``); :data:`AGREES_BETTER` names the winner, which the
figure, the report and the explorer show.

    words = prompt_word_relevance(wrapper, x)          # the wrapper's prompt; its answer or predicted next token
    words.words, words.occlusion, words.gradient_x_input
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np
import torch

# Which of the two agrees better with the drop when a word is deleted from the prompt (benchmarks/prompt_words.md).
AGREES_BETTER = "occlusion"


@dataclass
class PromptWords:
    """Per word of the prompt (split at whitespace): the target's ``occlusion`` drop and ``gradient_x_input``
    relevance, and the target on the whole prompt (``score``)."""

    words: List[str]
    occlusion: np.ndarray  # (W,) target(prompt) - target(word occluded)
    gradient_x_input: np.ndarray  # (W,)
    score: float

    @property
    def relevance(self) -> np.ndarray:
        """The measure that agrees better with deleting the word (:data:`AGREES_BETTER`)."""
        return getattr(self, AGREES_BETTER)

    def report(self) -> dict:
        """The report's columns: ``prompt_words`` and, per word, ``word_occlusion`` and ``word_gradient_x_input``."""
        return dict(prompt_words=list(self.words), word_occlusion=[round(float(v), 6) for v in self.occlusion],
                    word_gradient_x_input=[round(float(v), 6) for v in self.gradient_x_input])

    @property
    def label(self) -> str:
        """What a figure writes before the coloured words."""
        return f"prompt words ({AGREES_BETTER.replace('_', ' ')}):"


def takes_prompt(wrapper) -> bool:
    """Whether ``wrapper`` asks a prompt whose words can be explained (not CLIP's captions or a classifier)."""
    return isinstance(getattr(wrapper, "prompt", None), str) and hasattr(wrapper, "set_answer")


def word_tokens(wrapper, input_ids: torch.Tensor) -> Tuple[List[str], List[List[int]]]:
    """The prompt's words (split at whitespace) and, per word, the sequence positions of its tokens in
    ``input_ids`` ``(seq,)``. The chat text is tokenised with offsets (images are special tokens, so the text after
    the image tokenises alone as in the processor: LLaMA's tokenizer makes ``"\nWhich"`` into ``"W", "hich"``,
    not ``"▁Which"``), and its tokens from the prompt's start to the end are found at the end of ``input_ids``."""
    prompt, tokenizer = wrapper.prompt, wrapper.processor.tokenizer
    text = wrapper.chat_text()
    if isinstance(wrapper.answer, str):
        text = text[:-len(wrapper.answer)]
    begin = text.rfind(prompt)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    first = next(k for k, (_, end) in enumerate(encoded["offset_mapping"]) if end > begin)
    tail, sequence = encoded["input_ids"][first:], input_ids.tolist()
    starts = [s for s in range(len(sequence) - len(tail), -1, -1) if sequence[s:s + len(tail)] == tail]
    if begin < 0 or not starts:
        raise ValueError(f"The prompt {prompt!r} cannot be found among the model's input tokens: its words cannot be "
                         "told apart.")
    spans, position = [], begin
    for word in prompt.split():
        position = text.index(word, position)
        spans.append((position, position + len(word)))
        position += len(word)
    positions: List[List[int]] = [[] for _ in spans]
    for k, (start, end) in enumerate(encoded["offset_mapping"][first:]):
        while start < end and text[start].isspace():  # BPE tokens hold the space before their word
            start += 1
        for w, (a, b) in enumerate(spans):
            if a <= start < b:
                positions[w].append(starts[0] + k)
    return prompt.split(), positions


@contextmanager
def replaced_embeddings(wrapper, rows: List[Tuple[int, List[int]]], baseline: torch.Tensor) -> Iterator[None]:
    """Inside the block, the input embeddings of batch row ``r`` at positions ``p`` are ``baseline``, for each
    ``(r, p)`` of ``rows``."""
    def replace(module, args, output):
        output = output.clone()
        for row, positions in rows:
            output[row, positions] = baseline.to(output.dtype)
        return output

    handle = wrapper.model.get_input_embeddings().register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()


def baseline_embedding(wrapper) -> torch.Tensor:
    """What an occluded token becomes: the embedding of the tokenizer's pad token, zeros where it has none."""
    embeddings = wrapper.model.get_input_embeddings()
    pad = wrapper.processor.tokenizer.pad_token_id
    if pad is None:
        return torch.zeros(embeddings.weight.shape[1])
    with torch.no_grad():
        return embeddings(torch.tensor([[pad]], device=embeddings.weight.device))[0, 0].float()


def _default_target(wrapper, x: torch.Tensor) -> Callable:
    """The wrapper's answer score, or the logit of the token it predicts next."""
    if wrapper.answer is not None:
        return lambda output: output[0]
    with torch.no_grad():
        token = int(wrapper(x)[0].argmax())
    return lambda output: output[token]


def prompt_word_relevance(wrapper, x: torch.Tensor, target: Optional[Callable] = None,
                          baseline: Optional[torch.Tensor] = None) -> PromptWords:
    """Occlusion and gradient x input of each word of ``wrapper.prompt`` for ``target`` (a grad-cam target on one
    row of the wrapper's output; default: the answer's score when one is set, else the predicted next token's
    logit) on one image ``x`` ``(1, 3, H, W)``. ``baseline`` (default :func:`baseline_embedding`) is what occluded
    tokens become. The model is left as it was."""
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"prompt_word_relevance explains one image (1, 3, H, W), got {tuple(x.shape)}.")
    target = target or _default_target(wrapper, x)
    layout = wrapper.layout_for(x.shape[2], x.shape[3])
    words, positions = word_tokens(wrapper, layout.text_inputs["input_ids"][0])
    baseline = baseline_embedding(wrapper) if baseline is None else baseline
    with torch.no_grad(), replaced_embeddings(wrapper, [(w + 1, p) for w, p in enumerate(positions)], baseline):
        outputs = wrapper(x.expand(len(words) + 1, -1, -1, -1))  # row 0: the whole prompt
    scores = torch.stack([torch.as_tensor(target(row)).float().reshape(()) for row in outputs]).cpu().numpy()
    store = {}

    def keep(module, args, output):
        store["embeddings"] = output.detach().requires_grad_(True)
        return store["embeddings"]

    handle = wrapper.model.get_input_embeddings().register_forward_hook(keep)
    try:
        with torch.enable_grad():
            score = target(wrapper(x)[0])
            grad, = torch.autograd.grad(score, store["embeddings"])
    finally:
        handle.remove()
    per_token = (grad * store["embeddings"].detach())[0].float().sum(-1).cpu().numpy()
    return PromptWords(words=words, occlusion=scores[0] - scores[1:],
                       gradient_x_input=np.array([per_token[p].sum() for p in positions]), score=float(scores[0]))
